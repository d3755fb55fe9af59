import pytest
import torch

from estinet.blackbox import BlackBox, SumBlackBox, make_black_box
from estinet.errors import ConfigError
from estinet.models import ArgumentExtractor, ExtractorConfig


def test_sum_integer_in_integer_out():
    black_box = SumBlackBox()
    output = black_box(torch.tensor([[1, 2, 3], [9, 9, 9], [0, 0, 0]]))
    assert output.dtype == torch.int64
    assert output.tolist() == [6, 27, 0]


def test_sum_accepts_every_integer_dtype():
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64):
        arguments = torch.full((2, 100), 9, dtype=dtype)
        assert SumBlackBox()(arguments).tolist() == [900, 900]


def test_sum_single_argument_lists():
    assert SumBlackBox()(torch.tensor([[7], [0]])).tolist() == [7, 0]


def test_black_box_interface():
    black_box = make_black_box("sum")
    assert isinstance(black_box, BlackBox)
    assert black_box.name == "sum"
    assert black_box.num_classes == 10


@pytest.mark.parametrize(
    "arguments",
    [
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[0.2, 0.8]], dtype=torch.float64),
        torch.tensor([[True]]),
    ],
    ids=["float32", "float64", "bool"],
)
def test_black_box_rejects_non_integer_input(arguments):
    with pytest.raises(TypeError, match="integer arguments"):
        SumBlackBox()(arguments)


def test_black_box_rejects_probabilities():
    probabilities = torch.softmax(torch.randn(2, 3, 10), dim=-1)
    with pytest.raises(TypeError, match="argmax"):
        SumBlackBox()(probabilities)


def test_black_box_rejects_non_tensor():
    with pytest.raises(TypeError, match="torch.Tensor"):
        SumBlackBox()([[1, 2]])


@pytest.mark.parametrize("shape", [(3,), (2, 3, 10), ()], ids=["1d", "3d", "scalar"])
def test_black_box_rejects_wrong_ndim(shape):
    with pytest.raises(ValueError, match=r"shape \(B, k\)"):
        SumBlackBox()(torch.zeros(shape, dtype=torch.int64))


@pytest.mark.parametrize("value", [-1, 10, 255])
def test_black_box_rejects_out_of_range(value):
    arguments = torch.tensor([[1, 2], [3, value]])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        SumBlackBox()(arguments)


def test_black_box_output_has_no_grad():
    output = SumBlackBox()(torch.tensor([[1, 2]]))
    assert not output.requires_grad
    assert output.grad_fn is None


def test_black_box_cuts_graph_from_extractor():
    extractor = ArgumentExtractor(ExtractorConfig())
    logits = extractor(torch.randn(6, 1, 28, 28)).view(2, 3, 10)
    assert logits.requires_grad  # the extractor's output is part of an autograd graph

    output = SumBlackBox()(logits.argmax(-1))
    assert not output.requires_grad
    assert output.grad_fn is None


def test_make_black_box_unknown_name():
    with pytest.raises(ConfigError, match="unknown black box 'product'. Known black boxes: sum"):
        make_black_box("product")
