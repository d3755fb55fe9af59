import math

import pytest
import torch
import torch.nn.functional as F

from estinet.models.nalu import NAC, NALU


def test_nac_weight_within_unit_interval():
    nac = NAC(4, 3)
    with torch.no_grad():
        nac.weight_hat.copy_(torch.tensor([-100.0, -1.0, 1.0, 100.0]).expand(3, 4))
        nac.mask_hat.fill_(100.0)

    weight = nac.weight
    assert weight.shape == (3, 4)
    assert weight.min() >= -1.0
    assert weight.max() <= 1.0
    assert torch.allclose(weight[:, 0], torch.tensor(-1.0))
    assert torch.allclose(weight[:, 3], torch.tensor(1.0))


def test_nac_gradients_reach_both_parameters():
    torch.manual_seed(0)
    nac = NAC(5, 2)
    nac(torch.randn(8, 5)).square().sum().backward()

    assert nac.weight_hat.grad is not None
    assert nac.mask_hat.grad is not None
    assert nac.weight_hat.grad.abs().sum() > 0
    assert nac.mask_hat.grad.abs().sum() > 0


def test_nac_weight_recomputed_each_forward():
    torch.manual_seed(0)
    nac = NAC(3, 1)
    x = torch.ones(1, 3)
    before = nac(x).clone()

    with torch.no_grad():
        nac.weight_hat.add_(1.0)
    after = nac(x)

    assert not torch.allclose(before, after)
    assert torch.allclose(
        after, F.linear(x, torch.tanh(nac.weight_hat) * torch.sigmoid(nac.mask_hat))
    )


def test_nac_learns_addition():
    torch.manual_seed(0)
    nac = NAC(2, 1)
    optimizer = torch.optim.Adam(nac.parameters(), lr=0.1)
    for _ in range(500):
        x = torch.rand(64, 2) * 20 - 10
        loss = F.mse_loss(nac(x).squeeze(-1), x.sum(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert torch.allclose(nac.weight, torch.ones(1, 2), atol=0.05)
    # Addition learned from inputs in [-10, 10] must extrapolate to inputs 10 to 100 times larger.
    x = torch.rand(100, 2) * 900 + 100
    relative_error = (nac(x).squeeze(-1) - x.sum(-1)).abs() / x.sum(-1)
    assert relative_error.max() < 0.05


@pytest.mark.parametrize(
    "x",
    [
        torch.zeros(4, 3),
        -torch.rand(4, 3) * 10,
        torch.full((4, 3), 1e6),
        torch.tensor([[0.0, -1e6, 1e6]] * 4),
    ],
    ids=["zero", "negative", "large", "mixed"],
)
def test_nalu_finite_outputs_and_gradients(x):
    torch.manual_seed(0)
    nalu = NALU(3, 2)
    x = x.clone().requires_grad_(True)
    y = nalu(x)
    y.sum().backward()

    assert y.shape == (4, 2)
    assert torch.isfinite(y).all()
    assert torch.isfinite(x.grad).all()
    for name, parameter in nalu.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_nalu_gate_per_output_unit():
    nalu = NALU(2, 2)
    assert nalu.gate_weight.shape == (2, 2)
    with torch.no_grad():
        nalu.nac.weight_hat.fill_(100.0)
        nalu.nac.mask_hat.fill_(100.0)  # W = 1 everywhere, so a = x1 + x2 and m = x1 * x2
        nalu.gate_weight.copy_(torch.tensor([[100.0, 100.0], [-100.0, -100.0]]))

    x = torch.tensor([[3.0, 4.0]])
    y = nalu(x)

    assert y[0, 0].item() == pytest.approx(7.0, rel=1e-4)  # gate 1: the additive path
    assert y[0, 1].item() == pytest.approx(12.0, rel=1e-4)  # gate 0: the multiplicative path


def test_nalu_overflow_guard_clamps_exponent():
    nalu = NALU(4, 1, max_exponent=20.0)
    with torch.no_grad():
        nalu.nac.weight_hat.fill_(100.0)
        nalu.nac.mask_hat.fill_(100.0)
        nalu.gate_weight.fill_(-100.0)  # gate 0: y = m only
    # Unclamped, m = exp(4 * log(1e30)) = exp(276) overflows float32 to inf.
    x = torch.full((1, 4), 1e30, requires_grad=True)
    y = nalu(x)
    y.sum().backward()

    assert torch.isfinite(y).all()
    assert y.item() == pytest.approx(math.exp(20.0), rel=1e-4)
    assert torch.isfinite(x.grad).all()


def test_nalu_rejects_invalid_guard_settings():
    with pytest.raises(ValueError, match="max_exponent"):
        NALU(2, 1, max_exponent=100.0)
    with pytest.raises(ValueError, match="eps"):
        NALU(2, 1, eps=0.0)
