"""Neural accumulator (NAC) and neural arithmetic logic unit (NALU).

Both follow Trask et al., "Neural Arithmetic Logic Units", NeurIPS 2018 (arXiv 1808.00508):

    W = tanh(W_hat) * sigmoid(M_hat)            NAC weight, pushed towards {-1, 0, 1}
    a = W x                                      NAC: addition and subtraction
    m = exp(W log(|x| + eps))                    multiplication and division in log space
    g = sigmoid(G x)                             one gate per output unit
    y = g * a + (1 - g) * m                      NALU

The NALU uses the same W for a and m. W is rebuilt from W_hat and M_hat on every forward pass,
because the trainable parameters are W_hat and M_hat and a W computed once at construction would
never change during training.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# eps keeps log(|x| + eps) finite at x = 0. With 1e-7 a zero input contributes log(1e-7) = -16.1
# per unit of weight, so exp() sends it close to 0, which is what a product with a zero factor
# should be.
DEFAULT_EPS = 1e-7

# Upper bound on the log-space pre-activation W log(|x| + eps) before exp(). Without it, a few
# large inputs or weights overflow float32 (exp(89) = inf), and one inf turns the loss and every
# later gradient into NaN: the classic NALU training failure. exp(20) = 4.9e8 is far above any
# value that a sum of digits reaches here. Above the bound the gradient through m is zero, so the
# gate and the additive path still learn.
DEFAULT_MAX_EXPONENT = 20.0


class NAC(nn.Module):
    """Neural accumulator: a linear layer whose weight is biased towards -1, 0 and 1, no bias."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_hat = nn.Parameter(torch.empty(out_features, in_features))  # W_hat
        self.mask_hat = nn.Parameter(torch.empty(out_features, in_features))  # M_hat
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight_hat)
        nn.init.xavier_uniform_(self.mask_hat)

    @property
    def weight(self) -> torch.Tensor:
        """Effective weight W = tanh(W_hat) * sigmoid(M_hat), in (-1, 1), shape (out, in)."""
        return torch.tanh(self.weight_hat) * torch.sigmoid(self.mask_hat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., in) -> (..., out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class NALU(nn.Module):
    """Neural arithmetic logic unit: a gated mix of a NAC and the same NAC in log space."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        eps: float = DEFAULT_EPS,
        max_exponent: float = DEFAULT_MAX_EXPONENT,
    ) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"NALU eps must be positive, got {eps}")
        if not 0 < max_exponent < math.log(torch.finfo(torch.float32).max):
            raise ValueError(
                f"NALU max_exponent must be in (0, 88.7) so that exp() stays finite in float32, "
                f"got {max_exponent}"
            )
        self.in_features = in_features
        self.out_features = out_features
        self.eps = eps
        self.max_exponent = max_exponent
        self.nac = NAC(in_features, out_features)
        self.gate_weight = nn.Parameter(torch.empty(out_features, in_features))  # G, no bias
        nn.init.xavier_uniform_(self.gate_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.nac.weight  # (out, in), shared by both paths
        additive = F.linear(x, weight)  # (..., out)
        log_magnitude = torch.log(torch.abs(x) + self.eps)  # (..., in)
        exponent = F.linear(log_magnitude, weight).clamp(max=self.max_exponent)
        multiplicative = torch.exp(exponent)  # (..., out), always positive
        gate = torch.sigmoid(F.linear(x, self.gate_weight))  # (..., out)
        return gate * additive + (1 - gate) * multiplicative

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"eps={self.eps}, max_exponent={self.max_exponent}"
        )
