import pytest
import torch

from estinet.errors import ConfigError
from estinet.models import (
    ArgumentExtractor,
    BlackBoxEstimator,
    EstimatorConfig,
    ExtractorConfig,
    NaluBaseline,
)


@pytest.mark.parametrize("batch_size", [1, 5])
def test_extractor_logits_shape(batch_size):
    extractor = ArgumentExtractor(ExtractorConfig())
    logits = extractor(torch.randn(batch_size, 1, 28, 28))
    assert logits.shape == (batch_size, 10)


def test_extractor_default_flatten_size():
    extractor = ArgumentExtractor(ExtractorConfig())
    assert extractor.fc1.in_features == 320
    assert extractor.fc1.out_features == 50


def test_extractor_channels_last_matches_contiguous():
    torch.manual_seed(0)
    extractor = ArgumentExtractor(ExtractorConfig())
    contiguous = ArgumentExtractor(ExtractorConfig()).to(memory_format=torch.contiguous_format)
    contiguous.load_state_dict(extractor.state_dict())
    images = torch.randn(8, 1, 28, 28)

    assert extractor.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert extractor.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    assert not contiguous.conv2.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(extractor(images), contiguous(images))


def test_extractor_custom_sizes():
    config = ExtractorConfig(
        conv1_channels=4, conv2_channels=6, kernel_size=3, hidden=16, dropout=0.5
    )
    extractor = ArgumentExtractor(config)
    assert extractor.fc1.in_features == 6 * 5 * 5  # 28 -> 26 -> 13 -> 11 -> 5
    assert extractor(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_extractor_config_rejects_invalid_values():
    with pytest.raises(ConfigError, match="kernel_size"):
        ExtractorConfig(kernel_size=13)
    with pytest.raises(ConfigError, match="dropout"):
        ExtractorConfig(dropout=1.0)
    with pytest.raises(ConfigError, match="hiden"):
        ExtractorConfig.from_config({"hiden": 10})


@pytest.mark.parametrize("readout", ["cell", "hidden"])
@pytest.mark.parametrize("batch_size,length", [(1, 1), (3, 1), (4, 10), (2, 100)])
def test_estimator_output_shape(readout, batch_size, length):
    torch.manual_seed(0)
    estimator = BlackBoxEstimator(EstimatorConfig(readout=readout))
    vectors = torch.softmax(torch.randn(batch_size, length, 10), dim=-1)
    output = estimator(vectors)
    assert output.shape == (batch_size,)
    assert torch.isfinite(output).all()


def test_estimator_passes_gradient_to_inputs():
    torch.manual_seed(0)
    estimator = BlackBoxEstimator(EstimatorConfig())
    logits = torch.randn(3, 10, 10, requires_grad=True)
    estimator(torch.softmax(logits, dim=-1)).sum().backward()
    assert logits.grad is not None
    assert logits.grad.abs().sum() > 0


def test_estimator_layer_widths_from_config():
    estimator = BlackBoxEstimator(EstimatorConfig(lstm_hidden=8, nalu_hidden=12, nalu_layers=3))
    widths = [(nalu.in_features, nalu.out_features) for nalu in estimator.nalus]
    assert widths == [(8, 12), (12, 12), (12, 1)]


def test_forget_bias_sets_forget_gate():
    torch.manual_seed(0)
    default = BlackBoxEstimator(EstimatorConfig(lstm_hidden=6))
    torch.manual_seed(0)
    biased = BlackBoxEstimator(EstimatorConfig(lstm_hidden=6, forget_bias=3.0))
    for name in ("bias_ih_l0", "bias_hh_l0"):
        before, after = getattr(default.lstm, name), getattr(biased.lstm, name)
        assert torch.equal(after[6:12], torch.full((6,), 1.5))  # gates: input, forget, cell, output
        assert torch.equal(after[:6], before[:6])  # input gate untouched
        assert torch.equal(after[12:], before[12:])  # cell and output gates untouched
    total = biased.lstm.bias_ih_l0[6:12] + biased.lstm.bias_hh_l0[6:12]
    assert torch.equal(total, torch.full((6,), 3.0))


def test_null_forget_bias_keeps_torch_init():
    torch.manual_seed(0)
    estimator = BlackBoxEstimator(EstimatorConfig(lstm_hidden=6))
    torch.manual_seed(0)
    plain = torch.nn.LSTM(10, 6, batch_first=True)
    assert torch.equal(estimator.lstm.bias_ih_l0, plain.bias_ih_l0)


def test_estimator_rejects_wrong_input_shape():
    estimator = BlackBoxEstimator(EstimatorConfig())
    with pytest.raises(ValueError, match=r"\(B, k, 10\)"):
        estimator(torch.rand(4, 10))
    with pytest.raises(ValueError, match=r"\(B, k, 10\)"):
        estimator(torch.rand(4, 3, 9))


def test_estimator_config_rejects_invalid_values():
    with pytest.raises(ConfigError, match="readout"):
        EstimatorConfig(readout="mean")
    with pytest.raises(ConfigError, match="nalu_layers"):
        EstimatorConfig(nalu_layers=0)
    with pytest.raises(ConfigError, match="nalu_max_exponent"):
        EstimatorConfig(nalu_max_exponent=100.0)
    with pytest.raises(ConfigError, match="lstm_hidden"):
        EstimatorConfig.from_config({"lstm_hidden": "wide"})


def test_baseline_output_shapes():
    torch.manual_seed(0)
    baseline = NaluBaseline(ExtractorConfig(), EstimatorConfig())
    prediction, logits = baseline(torch.randn(2, 4, 1, 28, 28))
    assert prediction.shape == (2,)
    assert logits.shape == (2, 4, 10)


def test_baseline_trains_extractor_end_to_end():
    torch.manual_seed(0)
    baseline = NaluBaseline(ExtractorConfig(), EstimatorConfig())
    prediction, _ = baseline(torch.randn(2, 3, 1, 28, 28))
    prediction.sum().backward()
    assert baseline.extractor.conv1.weight.grad is not None
    assert baseline.extractor.conv1.weight.grad.abs().sum() > 0


def test_baseline_rejects_single_images():
    baseline = NaluBaseline(ExtractorConfig(), EstimatorConfig())
    with pytest.raises(ValueError, match="image lists"):
        baseline(torch.randn(2, 1, 28, 28))
