"""Tests of the REINFORCE baseline, the supervised oracle and the learning-curve aggregation.

Training runs use the debug preset on the synthetic MNIST of conftest.py and take seconds.
"""

import json

import pytest
import torch
from test_train import compose_train, synthetic_overrides, write_fake_run

from estinet.aggregate import aggregate, find_runs, learning_curve, markdown_table, plot_learning_curves
from estinet.blackbox import SumBlackBox, make_black_box
from estinet.checkpoint import load_checkpoint
from estinet.data import build_addition_data
from estinet.errors import ConfigError
from estinet.evaluation import evaluate_checkpoint
from estinet.methods import OracleMethod, ReinforceMethod, build_method
from estinet.train import run_training


class RecordingSum(SumBlackBox):
    """The sum black box, returning outputs that would collect a gradient if anything used one."""

    def __init__(self) -> None:
        self.arguments: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []

    def __call__(self, arguments: torch.Tensor) -> torch.Tensor:
        output = super().__call__(arguments).float().requires_grad_()
        self.arguments.append(arguments)
        self.outputs.append(output)
        return output


def build(cfg, black_box=None):
    black_box = black_box or make_black_box("sum")
    return build_method(cfg, black_box, torch.device("cpu"), total_steps=8)


def first_batch(cfg, size: int = 8):
    data = build_addition_data(cfg.data)
    rows = torch.arange(size)
    images, sums = data.train_lists.batch(rows)
    return images, sums, data.train_lists.digit_labels(rows)


def test_reinforce_never_differentiates_black_box(synthetic_mnist_root):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + ["model=reinforce"])
    black_box = RecordingSum()
    method = build(cfg, black_box)
    images, sums, _ = first_batch(cfg)
    before = {name: value.clone() for name, value in method.extractor.state_dict().items()}

    method.train()
    result = method.train_step(images, sums, None)

    assert not result.skipped
    assert black_box.outputs, "the black box was never called"
    for arguments in black_box.arguments:
        assert arguments.dtype == torch.int64
        assert arguments.shape == (cfg.model.samples * len(sums), cfg.data.train.k)
    for output in black_box.outputs:
        assert output.grad is None, "backward reached the black-box output"
    changed = [name for name, value in method.extractor.state_dict().items()
               if not torch.equal(value, before[name])]
    assert changed, "the extractor was not updated"


def test_reinforce_rewards_and_leave_one_out(synthetic_mnist_root):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + ["model=reinforce"])
    method = build(cfg)
    arguments = torch.tensor([[[1, 2, 3]], [[0, 0, 0]], [[9, 9, 9]]])  # (S=3, B=1, k=3)
    rewards = method.rewards(arguments, torch.tensor([6]))
    assert rewards.tolist() == [[0.0], [-6.0], [-21.0]]

    advantages = method.advantages(rewards)
    # Each draw minus the mean of the other two draws.
    assert advantages[:, 0].tolist() == pytest.approx([13.5, 4.5, -18.0])


def test_reinforce_moving_average_baseline(synthetic_mnist_root):
    overrides = ["model=reinforce", "model.baseline=ema", "model.baseline_decay=0.5"]
    method = build(compose_train(synthetic_overrides(synthetic_mnist_root) + overrides))
    assert method.reward_baseline is None

    first = method.advantages(torch.tensor([[-2.0, -4.0]]))
    assert first.tolist() == [[1.0, -1.0]]  # the first batch is its own baseline
    assert method.reward_baseline == pytest.approx(-3.0)

    second = method.advantages(torch.tensor([[-1.0, -1.0]]))
    assert second.tolist() == [[2.0, 2.0]]  # measured against the baseline before this batch
    assert method.reward_baseline == pytest.approx(-2.0)


def test_reinforce_samples_come_from_generator(synthetic_mnist_root):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + ["model=reinforce"])
    probabilities = torch.softmax(torch.randn(4, 3, 10), dim=-1)
    first, second = build(cfg), build(cfg)
    draws = first.sample_arguments(probabilities)
    assert draws.shape == (cfg.model.samples, 4, 3)
    assert torch.equal(draws, second.sample_arguments(probabilities))

    state = first.state_dict()
    assert "sampling_generator" in state
    assert "reward_baseline" in state
    second.load_state_dict(state)
    assert torch.equal(first.sample_arguments(probabilities), second.sample_arguments(probabilities))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.baseline=median", "model.baseline=median is invalid"),
        ("model.samples=0", "model.samples=0 is invalid"),
        ("model.samples=1", "leave_one_out needs model.samples >= 2"),
        ("model.baseline_decay=1.0", "model.baseline_decay=1.0 is invalid"),
        ("model.entropy_weight=-1.0", "model.entropy_weight=-1.0 is invalid"),
    ],
    ids=["baseline", "samples", "leave-one-out-one-sample", "decay", "entropy"],
)
def test_reinforce_rejects_invalid_settings(synthetic_mnist_root, override, message):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + ["model=reinforce", override])
    with pytest.raises(ConfigError, match=message):
        build(cfg)


def test_reinforce_resume_matches_uninterrupted(tmp_path, synthetic_mnist_root, monkeypatch):
    """A run killed in its second epoch and resumed ends exactly like an uninterrupted one."""
    overrides = synthetic_overrides(synthetic_mnist_root) + [
        "model=reinforce", "model.baseline=ema", "model.entropy_weight=1.0", "train.epochs=2",
    ]
    cfg = compose_train(overrides)
    uninterrupted = run_training(cfg, tmp_path / "full", progress=False)

    steps_per_epoch = cfg.data.train.num_lists // cfg.train.batch_size
    original_step = ReinforceMethod.train_step
    calls = {"count": 0}

    def step_then_kill(self, images, sums, digit_labels=None):
        calls["count"] += 1
        if calls["count"] == steps_per_epoch + 2:
            raise KeyboardInterrupt("simulated kill in the second epoch")
        return original_step(self, images, sums, digit_labels)

    monkeypatch.setattr(ReinforceMethod, "train_step", step_then_kill)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "killed", progress=False)
    saved = load_checkpoint(tmp_path / "killed" / "last.pt")
    assert saved["state"]["epoch"] == 1
    assert saved["method"]["reward_baseline"] is not None
    monkeypatch.setattr(ReinforceMethod, "train_step", original_step)

    resumed = run_training(compose_train(overrides + ["resume=true"]), tmp_path / "killed",
                           progress=False)

    assert resumed["test_mae_k10"] == uninterrupted["test_mae_k10"]
    assert resumed["test_digit_accuracy"] == uninterrupted["test_digit_accuracy"]
    for resumed_entry, full_entry in zip(resumed["history"], uninterrupted["history"], strict=True):
        assert resumed_entry["train_loss"] == full_entry["train_loss"]
        assert resumed_entry["val_mae"] == full_entry["val_mae"]
    final = load_checkpoint(tmp_path / "killed" / "last.pt")["method"]
    expected = load_checkpoint(tmp_path / "full" / "last.pt")["method"]
    assert final["reward_baseline"] == expected["reward_baseline"]


def test_oracle_needs_digit_labels(synthetic_mnist_root):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + ["model=oracle"])
    method = build(cfg)
    assert isinstance(method, OracleMethod)
    assert method.uses_digit_labels
    images, sums, labels = first_batch(cfg)
    with pytest.raises(ValueError, match="digit labels"):
        method.train_step(images, sums, None)
    assert not method.train_step(images, sums, labels).skipped


def test_only_oracle_uses_digit_labels(synthetic_mnist_root):
    for model in ("estinet", "nalu", "reinforce", "oracle"):
        cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + [f"model={model}",
                                                                          "pretrain.steps=1"])
        assert build(cfg).uses_digit_labels == (model == "oracle"), model


def test_oracle_learns_synthetic_digits(tmp_path, synthetic_mnist_root):
    """Two epochs of 512 lists (32 steps) take the oracle from chance to > 0.9 digit accuracy."""
    overrides = synthetic_overrides(synthetic_mnist_root) + [
        "model=oracle", "train.epochs=2", "data.train.num_lists=512",
    ]
    metrics = run_training(compose_train(overrides), tmp_path / "run", progress=False)
    assert metrics["uses_digit_labels"] is True
    assert metrics["test_digit_accuracy"] > 0.9
    assert metrics["history"][-1]["val_digit_accuracy"] > 0.9


@pytest.mark.parametrize("model", ["reinforce", "oracle"])
def test_baseline_checkpoint_evaluates_like_training(tmp_path, synthetic_mnist_root, model):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + [f"model={model}"])
    metrics = run_training(cfg, tmp_path / "run", progress=False)
    results = evaluate_checkpoint(
        tmp_path / "run" / "best.pt", lengths=None, num_lists=None, data_root=None, device="cpu"
    )
    assert results["model"] == model
    assert results["test_mae_k10"] == pytest.approx(metrics["test_mae_k10"])
    assert results["test_mae_k100"] == pytest.approx(metrics["test_mae_k100"])
    assert results["test_digit_accuracy"] == pytest.approx(metrics["test_digit_accuracy"])


def test_learning_curve_matches_runs_by_lists_seen():
    histories = [
        [{"lists_seen": 100, "val_mae": 4.0, "val_digit_accuracy": 0.2},
         {"lists_seen": 200, "val_mae": 2.0, "val_digit_accuracy": 0.6}],
        [{"lists_seen": 100, "val_mae": 6.0, "val_digit_accuracy": 0.4},
         {"lists_seen": 200, "val_mae": float("nan"), "val_digit_accuracy": 0.8},
         {"lists_seen": 300, "val_mae": 1.0, "val_digit_accuracy": 0.9}],
    ]
    curve = learning_curve(histories)

    assert [point["lists_seen"] for point in curve] == [100, 200, 300]
    assert curve[0]["val_mae_mean"] == pytest.approx(5.0)
    assert curve[0]["val_mae_std"] == pytest.approx(1.4142, abs=1e-4)
    assert curve[0]["runs"] == 2
    assert curve[1]["val_mae_mean"] == pytest.approx(2.0)  # the NaN is left out
    assert curve[1]["val_digit_accuracy_mean"] == pytest.approx(0.7)
    assert curve[2]["runs"] == 1
    assert curve[2]["val_mae_std"] == 0.0


def test_table_and_curves_include_baselines(tmp_path):
    for index, (model, seed, mae) in enumerate(
        [("estinet", 0, 0.5), ("estinet", 1, 0.7), ("reinforce", 0, 6.0), ("oracle", 0, 0.1)]
    ):
        write_fake_run(tmp_path / str(index), model, seed, mae, 10 * mae)
    oracle_metrics = json.loads((tmp_path / "3" / "metrics.json").read_text())
    oracle_metrics["uses_digit_labels"] = True
    (tmp_path / "3" / "metrics.json").write_text(json.dumps(oracle_metrics))

    results = aggregate(find_runs([tmp_path]))
    table = markdown_table(results)
    assert "| REINFORCE | 1 |" in table
    assert "| Oracle (digit labels) | 1 |" in table
    assert results["groups"]["oracle"]["uses_digit_labels"] is True
    assert results["groups"]["estinet"]["learning_curve"][0]["runs"] == 2

    plot_learning_curves(results, tmp_path / "learning_curves.png")
    assert (tmp_path / "learning_curves.png").stat().st_size > 0
