import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize
from omegaconf import OmegaConf

from estinet.blackbox import BlackBox, SumBlackBox
from estinet.errors import CheckpointError, ConfigError
from estinet.models import BlackBoxEstimator, EstimatorConfig
from estinet.pretrain import (
    PretrainConfig,
    evaluate_estimator,
    is_one_hot,
    label_digit_vectors,
    labelled_digit_vector_batches,
    load_estimator,
    make_held_out_sets,
    monte_carlo_black_box,
    pretrain_estimator,
    run_pretraining,
    sample_digit_vectors,
    save_estimator,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_OVERRIDES = [
    "pretrain.steps=80",
    "pretrain.batch_size=16",
    "pretrain.max_length=5",
    "pretrain.mc_samples=8",
    "pretrain.eval_every=40",
    "pretrain.eval_size=64",
    "pretrain.eval_mc_samples=256",
]
METRIC_KEYS = {
    "one_hot_mae_k10",
    "one_hot_mae_k100",
    "soft_mae_k10",
    "soft_argmax_mae_k10",
    "soft_reference_stderr_k10",
    "steps",
    "seconds",
    "nonfinite_steps",
    "train_loss_first",
    "train_loss_last",
}


@pytest.fixture(autouse=True)
def single_thread():
    """Run torch on one thread like conf/pretrain.yaml, because the tiny estimator trains faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_pretrain_config(**overrides) -> PretrainConfig:
    values = {
        "steps": 80,
        "batch_size": 16,
        "max_length": 5,
        "mc_samples": 8,
        "eval_every": 40,
        "eval_size": 64,
        "eval_mc_samples": 256,
    }
    values.update(overrides)
    return PretrainConfig(**values)


def compose_pretrain(overrides: list[str]):
    with initialize(version_base="1.3", config_path="../conf"):
        return compose(config_name="pretrain", overrides=overrides)


class MaxBlackBox(BlackBox):
    """Test-only black box: the largest digit of each list."""

    name = "max"

    def _compute(self, arguments: torch.Tensor) -> torch.Tensor:
        return arguments.max(dim=1).values


class ConstantBlackBox(BlackBox):
    """Test-only black box that returns 7 for every list, to trace where targets come from."""

    name = "constant"

    def _compute(self, arguments: torch.Tensor) -> torch.Tensor:
        return torch.full((arguments.shape[0],), 7, dtype=torch.int64)


# --------------------------------------------------------------------------- synthetic data


def test_sample_digit_vectors_are_distributions():
    generator = torch.Generator().manual_seed(0)
    vectors = sample_digit_vectors(32, 7, PretrainConfig(), num_classes=10, generator=generator)
    assert vectors.shape == (32, 7, 10)
    assert (vectors >= 0).all()
    assert torch.allclose(vectors.sum(-1), torch.ones(32, 7))


def test_sample_digit_vectors_one_hot_fractions():
    generator = torch.Generator().manual_seed(0)
    all_one_hot = sample_digit_vectors(
        50, 4, PretrainConfig(), num_classes=10, generator=generator, one_hot_fraction=1.0
    )
    assert is_one_hot(all_one_hot).all()

    no_one_hot = sample_digit_vectors(
        50,
        4,
        PretrainConfig(element_one_hot_fraction=0.0, temperature_min=1.0),
        num_classes=10,
        generator=generator,
        one_hot_fraction=0.0,
    )
    assert not is_one_hot(no_one_hot).any()


def test_sample_digit_vectors_mixes_elements():
    generator = torch.Generator().manual_seed(0)
    cfg = PretrainConfig(element_one_hot_fraction=0.5, temperature_min=1.0)
    vectors = sample_digit_vectors(
        200, 10, cfg, num_classes=10, generator=generator, one_hot_fraction=0.0
    )
    one_hot_elements = (vectors == 1).any(-1).float().mean()
    assert 0.4 < one_hot_elements < 0.6


def test_one_hot_lists_labelled_exactly():
    vectors = torch.nn.functional.one_hot(torch.tensor([[1, 2, 3], [9, 0, 4]]), 10).float()
    for mode in ("monte_carlo", "argmax"):
        targets = label_digit_vectors(
            vectors, SumBlackBox(), soft_targets=mode, mc_samples=4, generator=torch.Generator()
        )
        assert targets.tolist() == [6.0, 13.0]


def test_monte_carlo_targets_estimate_expectation():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.softmax(torch.randn(20, 5, 10, generator=generator), dim=-1)
    targets = label_digit_vectors(
        vectors, SumBlackBox(), soft_targets="monte_carlo", mc_samples=4000, generator=generator
    )
    # Closed form for this test only: E[sum] = sum over elements of sum_d d * p(d).
    expected = (vectors * torch.arange(10.0)).sum(dim=(1, 2))
    assert (targets - expected).abs().max() < 0.5


def test_monte_carlo_standard_error_shrinks():
    generator = torch.Generator().manual_seed(0)
    vectors = torch.full((4, 10, 10), 0.1)  # uniform digits: standard deviation of the sum is 9.08
    _, small = monte_carlo_black_box(vectors, SumBlackBox(), 100, generator=generator)
    _, large = monte_carlo_black_box(vectors, SumBlackBox(), 10_000, generator=generator)
    assert small.mean() == pytest.approx(0.908, rel=0.2)
    assert large.mean() == pytest.approx(0.0908, rel=0.2)


def test_argmax_targets_use_argmax_digits():
    vectors = torch.tensor([[[0.1, 0.6, 0.3] + [0.0] * 7, [0.0] * 9 + [1.0]]])
    targets = label_digit_vectors(
        vectors, SumBlackBox(), soft_targets="argmax", mc_samples=8, generator=torch.Generator()
    )
    assert targets.tolist() == [10.0]


def test_targets_come_from_black_box():
    generator = torch.Generator().manual_seed(0)
    vectors = sample_digit_vectors(16, 3, PretrainConfig(), num_classes=10, generator=generator)
    for mode in ("monte_carlo", "argmax"):
        targets = label_digit_vectors(
            vectors, ConstantBlackBox(), soft_targets=mode, mc_samples=8, generator=generator
        )
        assert (targets == 7).all()

    max_targets = label_digit_vectors(
        vectors, MaxBlackBox(), soft_targets="argmax", mc_samples=8, generator=generator
    )
    assert max_targets.tolist() == vectors.argmax(-1).max(-1).values.float().tolist()


def test_labelled_batches_lengths_in_range():
    cfg = PretrainConfig(batch_size=8, min_length=2, max_length=4, mc_samples=4)
    batches = labelled_digit_vector_batches(
        cfg, SumBlackBox(), generator=torch.Generator().manual_seed(0)
    )
    lengths = set()
    for _ in range(30):
        vectors, targets = next(batches)
        assert vectors.shape[0] == 8
        assert targets.shape == (8,)
        assert targets.dtype == torch.float32
        lengths.add(vectors.shape[1])
    assert lengths == {2, 3, 4}


def test_pretrain_config_rejects_invalid_values():
    with pytest.raises(ConfigError, match="soft_targets"):
        PretrainConfig(soft_targets="expected")
    with pytest.raises(ConfigError, match="loss"):
        PretrainConfig(loss="huber")
    with pytest.raises(ConfigError, match="max_length"):
        PretrainConfig(min_length=5, max_length=2)
    with pytest.raises(ConfigError, match="step"):
        PretrainConfig.from_config({"step": 10})


# ------------------------------------------------------------------------- training and evaluation


def test_held_out_sets_reproducible():
    cfg = tiny_pretrain_config()
    first = make_held_out_sets(SumBlackBox(), cfg)
    second = make_held_out_sets(SumBlackBox(), cfg)
    assert torch.equal(first.one_hot_k100[0], second.one_hot_k100[0])
    assert torch.equal(first.soft_k10[1], second.soft_k10[1])
    assert first.one_hot_k10[0].shape == (64, 10, 10)
    assert first.one_hot_k100[0].shape == (64, 100, 10)


def test_evaluate_estimator_keys():
    estimator = BlackBoxEstimator(EstimatorConfig())
    metrics = evaluate_estimator(estimator, SumBlackBox(), cfg=tiny_pretrain_config())
    assert set(metrics) == {
        "one_hot_mae_k10",
        "one_hot_mae_k100",
        "soft_mae_k10",
        "soft_argmax_mae_k10",
        "soft_reference_stderr_k10",
    }
    assert estimator.training  # evaluation restores the training mode


def test_pretrain_loss_goes_down():
    estimator, metrics = pretrain_estimator(
        EstimatorConfig(),
        tiny_pretrain_config(),
        SumBlackBox(),
        device="cpu",
        seed=0,
        progress=False,
    )
    assert isinstance(estimator, BlackBoxEstimator)
    assert METRIC_KEYS <= set(metrics)
    assert metrics["steps"] == 80
    assert metrics["nonfinite_steps"] == 0
    assert metrics["train_loss_last"] < metrics["train_loss_first"]


def test_pretrain_skips_nonfinite_steps(monkeypatch):
    class FlakyEstimator(BlackBoxEstimator):
        calls = 0

        def forward(self, digit_vectors):
            output = super().forward(digit_vectors)
            if self.training:
                FlakyEstimator.calls += 1
                if FlakyEstimator.calls % 2 == 0:
                    return output * float("nan")
            return output

    monkeypatch.setattr("estinet.pretrain.BlackBoxEstimator", FlakyEstimator)
    estimator, metrics = pretrain_estimator(
        EstimatorConfig(),
        tiny_pretrain_config(steps=20),
        SumBlackBox(),
        device="cpu",
        seed=0,
        progress=False,
    )
    assert metrics["nonfinite_steps"] == 10
    for name, parameter in estimator.named_parameters():
        assert torch.isfinite(parameter).all(), name


def test_pretrain_rejects_mismatched_input_size():
    with pytest.raises(ConfigError, match="input_size"):
        pretrain_estimator(
            EstimatorConfig(input_size=5),
            tiny_pretrain_config(),
            SumBlackBox(),
            device="cpu",
            seed=0,
        )


# --------------------------------------------------------------------------- entry point


def test_run_pretraining_writes_run_files(tmp_path):
    cfg = compose_pretrain(TINY_OVERRIDES)
    metrics = run_pretraining(cfg, tmp_path, progress=False)

    assert (tmp_path / "estimator.pt").is_file()
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert METRIC_KEYS <= set(saved)
    assert saved["black_box"] == "sum"
    assert saved["soft_targets"] == "monte_carlo"
    assert saved["one_hot_mae_k10"] == pytest.approx(metrics["one_hot_mae_k10"])
    assert saved["train_loss_last"] < saved["train_loss_first"]


def test_run_pretraining_ignores_training_keys(tmp_path):
    cfg = compose_pretrain(TINY_OVERRIDES + ["pretrain.steps=2"])
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["estimator"].update(training="hybrid", checkpoint=None, lr=1e-3)
    run_pretraining(plain, tmp_path, progress=False)
    assert load_estimator(tmp_path / "estimator.pt").config == EstimatorConfig()


def test_checkpoint_round_trip(tmp_path):
    cfg = compose_pretrain(TINY_OVERRIDES + ["estimator.lstm_hidden=16", "estimator.nalu_hidden=8"])
    run_pretraining(cfg, tmp_path, progress=False)

    expected = EstimatorConfig(lstm_hidden=16, nalu_hidden=8)
    loaded = load_estimator(
        tmp_path / "estimator.pt", expected_config=expected, expected_black_box="sum"
    )
    rebuilt = BlackBoxEstimator(expected)
    rebuilt.load_state_dict(torch.load(tmp_path / "estimator.pt", weights_only=True)["state_dict"])

    vectors = torch.softmax(torch.randn(3, 10, 10), dim=-1)
    assert loaded.config == expected
    assert torch.equal(loaded(vectors), rebuilt(vectors))


def test_entry_point_honours_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "pretrain_estimator.py", *TINY_OVERRIDES, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "estimator.pt").is_file()
    assert (run_dir / "metrics.json").is_file()
    assert load_estimator(run_dir / "estimator.pt").config == EstimatorConfig()


# --------------------------------------------------------------------------- checkpoint errors


@pytest.fixture
def checkpoint_path(tmp_path) -> Path:
    path = tmp_path / "estimator.pt"
    save_estimator(path, BlackBoxEstimator(EstimatorConfig()), "sum")
    return path


def test_load_missing_checkpoint(tmp_path):
    path = tmp_path / "absent.pt"
    with pytest.raises(CheckpointError, match="not found") as error:
        load_estimator(path)
    assert str(path) in str(error.value)


def test_load_truncated_checkpoint(checkpoint_path):
    data = checkpoint_path.read_bytes()
    checkpoint_path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="failed to read") as error:
        load_estimator(checkpoint_path)
    assert str(checkpoint_path) in str(error.value)


def test_load_garbage_checkpoint(tmp_path):
    path = tmp_path / "estimator.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError, match="failed to read") as error:
        load_estimator(path)
    assert str(path) in str(error.value)


def test_load_bare_state_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(BlackBoxEstimator(EstimatorConfig()).state_dict(), path)
    with pytest.raises(CheckpointError, match="not an estimator checkpoint") as error:
        load_estimator(path)
    assert str(path) in str(error.value)


def test_load_non_dict_checkpoint(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="not an estimator checkpoint.*Tensor") as error:
        load_estimator(path)
    assert str(path) in str(error.value)


def test_load_mismatched_config(checkpoint_path):
    with pytest.raises(CheckpointError, match=r"lstm_hidden=50 \(expected 64\)") as error:
        load_estimator(checkpoint_path, expected_config=EstimatorConfig(lstm_hidden=64))
    assert str(checkpoint_path) in str(error.value)


def test_load_mismatched_config_mapping(checkpoint_path):
    with pytest.raises(CheckpointError, match=r"readout=cell \(expected hidden\)"):
        load_estimator(checkpoint_path, expected_config={"readout": "hidden"})


def test_load_ignores_initialization_only_settings(checkpoint_path):
    estimator = load_estimator(checkpoint_path, expected_config={"forget_bias": 3.0})
    assert estimator.config.forget_bias is None  # the saved config, not the expected one


def test_load_mismatched_black_box(checkpoint_path):
    with pytest.raises(CheckpointError, match="'sum', expected 'max'") as error:
        load_estimator(checkpoint_path, expected_black_box="max")
    assert str(checkpoint_path) in str(error.value)


def test_load_weights_of_wrong_size(checkpoint_path):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    checkpoint["estimator_config"]["nalu_hidden"] = 7  # config and weights now disagree
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(CheckpointError, match="(?s)invalid weights.*size mismatch") as error:
        load_estimator(checkpoint_path)
    assert str(checkpoint_path) in str(error.value)


def test_load_unknown_format_version(checkpoint_path):
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    checkpoint["format_version"] = 99
    torch.save(checkpoint, checkpoint_path)
    with pytest.raises(CheckpointError, match="format version 99") as error:
        load_estimator(checkpoint_path)
    assert str(checkpoint_path) in str(error.value)
