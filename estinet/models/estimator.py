"""Black-box estimator: a differentiable stand-in for a black box that takes a list of digits.

An LSTM reads the k digit vectors (one-hot digits or the argument extractor's softmax outputs), and
stacked NALU layers map its final state to one scalar. EstiNet trains the argument extractor
through this network and calls the real black box in its place at test time.
"""

import itertools
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from estinet.errors import ConfigError
from estinet.structured import build_structured
from estinet.models.nalu import DEFAULT_EPS, DEFAULT_MAX_EXPONENT, NALU

READOUTS = ("cell", "hidden")


@dataclass
class EstimatorConfig:
    """Sizes of the black-box estimator (conf/estimator/*.yaml)."""

    input_size: int = 10  # length of each digit vector, equal to the black box's num_classes
    lstm_hidden: int = 50
    # Final LSTM state fed to the NALU layers: "cell" (c_k) or "hidden" (h_k = o * tanh(c_k)).
    # h_k is bounded in [-1, 1], so it cannot grow with k. c_k can, and it extrapolated far better
    # from training lists of k <= 20 to k = 100 (docs/estimator.md has the measurements).
    readout: str = "cell"
    # Initial bias of the LSTM's forget gate (split evenly between bias_ih and bias_hh), or None
    # for torch's default uniform initialization. A large value starts the cell state as a
    # running total that keeps what it has added.
    forget_bias: float | None = None
    nalu_hidden: int = 100  # width of every NALU layer except the last, which has one output
    nalu_layers: int = 2
    nalu_eps: float = DEFAULT_EPS
    nalu_max_exponent: float = DEFAULT_MAX_EXPONENT

    def __post_init__(self) -> None:
        for name in ("input_size", "lstm_hidden", "nalu_hidden", "nalu_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"estimator.{name} must be >= 1, got {getattr(self, name)}")
        if self.readout not in READOUTS:
            raise ConfigError(
                f"estimator.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}"
            )
        if not self.nalu_eps > 0:
            raise ConfigError(f"estimator.nalu_eps must be positive, got {self.nalu_eps}")
        if not 0 < self.nalu_max_exponent < 88:
            raise ConfigError(
                "estimator.nalu_max_exponent must be in (0, 88) so that exp() stays finite in "
                f"float32, got {self.nalu_max_exponent}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "EstimatorConfig":
        """Build the config from a mapping or DictConfig, raising ConfigError for invalid keys."""
        return build_structured(cls, cfg, "estimator")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BlackBoxEstimator(nn.Module):
    """LSTM + NALU regressor: digit vectors (B, k, input_size) -> estimated output (B,)."""

    def __init__(self, config: EstimatorConfig) -> None:
        super().__init__()
        self.config = config
        self.lstm = nn.LSTM(config.input_size, config.lstm_hidden, batch_first=True)
        if config.forget_bias is not None:
            hidden = config.lstm_hidden
            with torch.no_grad():  # gate order in torch's LSTM biases: input, forget, cell, output
                for bias in (self.lstm.bias_ih_l0, self.lstm.bias_hh_l0):
                    bias[hidden : 2 * hidden].fill_(config.forget_bias / 2)
        widths = [config.lstm_hidden] + [config.nalu_hidden] * (config.nalu_layers - 1) + [1]
        self.nalus = nn.ModuleList(
            NALU(width_in, width_out, eps=config.nalu_eps, max_exponent=config.nalu_max_exponent)
            for width_in, width_out in itertools.pairwise(widths)
        )

    def forward(self, digit_vectors: torch.Tensor) -> torch.Tensor:
        if digit_vectors.ndim != 3 or digit_vectors.shape[-1] != self.config.input_size:
            raise ValueError(
                f"expected digit vectors of shape (B, k, {self.config.input_size}), "
                f"got {tuple(digit_vectors.shape)}"
            )
        _, (hidden, cell) = self.lstm(digit_vectors)  # each (1, B, lstm_hidden)
        x = cell[-1] if self.config.readout == "cell" else hidden[-1]  # (B, lstm_hidden)
        for nalu in self.nalus:
            x = nalu(x)  # (B, nalu_hidden), then (B, 1) after the last layer
        return x.squeeze(-1)  # (B,)
