"""End-to-end tests of train_addition.py, evaluate.py and the results aggregation.

Fast tests run the debug preset on the synthetic MNIST of conftest.py (seconds each). The slow test
trains the quick preset on the real MNIST.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT
from estinet.aggregate import aggregate, find_runs, markdown_table, needs_log_scale, plot_mae
from estinet.data import build_addition_data
from estinet.errors import ConfigError, DataError
from estinet.evaluation import evaluate_checkpoint
from estinet.train import run_training

REQUIRED_KEYS = (
    "model", "seed", "test_mae_k10", "test_mae_k100", "test_exact_k10", "test_exact_k100",
    "test_digit_accuracy", "history",
)


def synthetic_overrides(root: Path) -> list[str]:
    """Debug preset on the synthetic MNIST: 500/100/200 images, k=10 training lists."""
    return [
        "experiment=debug",
        f"data.root={root}",
        "data.verify=false",
        "data.validation_images=100",
        "data.train.num_lists=128",
        "data.validation.num_lists=32",
        "data.test.num_lists=32",
        "num_threads=1",
        "device=cpu",
        "pretrain.steps=20",
        "pretrain.eval_size=32",
        "pretrain.eval_mc_samples=64",
    ]


def compose_train(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=estinet", "estimator.training=offline"],
        ["model=estinet", "estimator.training=online"],
        ["model=estinet", "estimator.training=hybrid"],
        ["model=estinet", "pretrain.soft_targets=argmax", "model.entropy_weight=0.1"],
        ["model=nalu"],
        ["model=reinforce"],
        ["model=reinforce", "model.baseline=ema", "model.samples=1", "model.entropy_weight=0.5"],
        ["model=oracle"],
    ],
    ids=["offline", "online", "hybrid", "argmax-entropy", "nalu", "reinforce", "reinforce-ema",
         "oracle"],
)
def test_debug_run_writes_results(tmp_path, synthetic_mnist_root, overrides):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + overrides)
    metrics = run_training(cfg, tmp_path / "run", progress=False)

    for key in REQUIRED_KEYS:
        assert key in metrics, key
    assert (tmp_path / "run" / "best.pt").is_file()
    assert (tmp_path / "run" / "last.pt").is_file()
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["test_mae_k10"] == pytest.approx(metrics["test_mae_k10"])
    assert written["model"] == cfg.model.name
    assert len(written["history"]) == 1
    entry = written["history"][0]
    for key in ("train_loss", "val_mae", "val_digit_accuracy", "seconds", "lists_seen"):
        assert key in entry, key
    assert 0.0 <= written["test_digit_accuracy"] <= 1.0


def test_estinet_extractor_learns_synthetic_digits(tmp_path, synthetic_mnist_root):
    """Four epochs on the synthetic digits take EstiNet from chance (0.1) to > 0.8 accuracy."""
    overrides = synthetic_overrides(synthetic_mnist_root) + [
        "train.epochs=4", "train.lr=1e-2", "data.train.num_lists=2048", "pretrain.steps=1500",
        "data.train.k=3", "data.validation.k=3",
    ]
    metrics = run_training(compose_train(overrides), tmp_path / "run", progress=False)
    assert metrics["test_digit_accuracy"] > 0.8


def test_estimator_is_frozen_offline(synthetic_mnist_root):
    from estinet.blackbox import make_black_box
    from estinet.methods import build_method

    cfg = compose_train(synthetic_overrides(synthetic_mnist_root))
    method = build_method(cfg, make_black_box("sum"), torch.device("cpu"), total_steps=4)
    data = build_addition_data(cfg.data)
    before = {k: v.clone() for k, v in method.estimator.state_dict().items()}
    images, sums = data.train_lists.batch(torch.arange(8))
    method.train()
    method.train_step(images, sums, None)
    for key, value in method.estimator.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert "estimator" not in method.optimizers


def test_online_estimator_is_updated(synthetic_mnist_root):
    from estinet.blackbox import make_black_box
    from estinet.methods import build_method

    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + ["estimator.training=online"])
    method = build_method(cfg, make_black_box("sum"), torch.device("cpu"), total_steps=4)
    data = build_addition_data(cfg.data)
    before = {k: v.clone() for k, v in method.estimator.state_dict().items()}
    images, sums = data.train_lists.batch(torch.arange(8))
    method.train()
    result = method.train_step(images, sums, None)
    assert result.estimator_loss is not None
    changed = [k for k, v in method.estimator.state_dict().items() if not torch.equal(v, before[k])]
    assert changed


def test_test_lists_identical_across_models_and_seeds(synthetic_mnist_root):
    lists = []
    for overrides in (["model=estinet", "seed=0"], ["model=nalu", "seed=3"]):
        cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + overrides)
        lists.append(build_addition_data(cfg.data))
    for k in lists[0].test_lists:
        assert torch.equal(lists[0].test_lists[k].indices, lists[1].test_lists[k].indices)
    assert torch.equal(lists[0].val_lists.indices, lists[1].val_lists.indices)


def test_evaluate_checkpoint_matches_training(tmp_path, synthetic_mnist_root):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root))
    metrics = run_training(cfg, tmp_path / "run", progress=False)
    results = evaluate_checkpoint(
        tmp_path / "run" / "best.pt", lengths=None, num_lists=None, data_root=None, device="cpu"
    )
    assert results["test_mae_k10"] == pytest.approx(metrics["test_mae_k10"])
    assert results["test_mae_k100"] == pytest.approx(metrics["test_mae_k100"])
    assert results["test_estimator_mae_k10"] == pytest.approx(metrics["test_estimator_mae_k10"])

    longer = evaluate_checkpoint(
        tmp_path / "run" / "best.pt", lengths=[5], num_lists=16, data_root=None, device="cpu"
    )
    assert "test_mae_k5" in longer
    assert "test_mae_k10" not in longer


def write_fake_run(directory: Path, model: str, seed: int, mae10: float, mae100: float,
                   experiment: str = "paper") -> None:
    directory.mkdir(parents=True)
    (directory / ".hydra").mkdir()
    (directory / ".hydra" / "overrides.yaml").write_text(
        yaml.safe_dump([f"model={model}", f"seed={seed}", f"experiment={experiment}"])
    )
    metrics = {
        "model": model, "seed": seed, "test_mae_k10": mae10, "test_mae_k100": mae100,
        "test_exact_k10": 0.5, "test_exact_k100": 0.1, "test_digit_accuracy": 0.9,
        "history": [{"epoch": 1, "val_mae": 1.0, "lists_seen": 100}], "train_seconds": 1.0,
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))


def test_aggregate_fake_runs(tmp_path):
    write_fake_run(tmp_path / "0", "estinet", 0, 0.4, 3.0)
    write_fake_run(tmp_path / "1", "estinet", 1, 0.6, 4.0)
    write_fake_run(tmp_path / "2", "nalu", 0, 1.5, 8.0)
    results = aggregate(find_runs([tmp_path]))

    groups = results["groups"]
    assert set(groups) == {"estinet", "nalu"}
    assert groups["estinet"]["metrics"]["test_mae_k10"]["mean"] == pytest.approx(0.5)
    assert groups["estinet"]["metrics"]["test_mae_k10"]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert groups["estinet"]["seeds"] == [0, 1]
    assert groups["nalu"]["metrics"]["test_mae_k100"]["std"] == 0.0

    table = markdown_table(results)
    assert "0.500 ± 0.141" in table
    assert "| 1.42 |" in table  # Jacovi et al. (2019) report NALU MAE 1.42 at k=10; the table shows it beside ours
    (nalu_row,) = [line for line in table.splitlines() if line.startswith("| NALU |")]
    assert nalu_row.startswith("| NALU | 1 | 1.500 | 1.42 | 0.500 |")  # one seed: no std
    assert "±" not in nalu_row
    plot_mae(results, tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("means", "expected"),
    [
        ([0.34, 1.42, 0.30, 0.68], False),  # k=10 of the table: comparable bars
        ([2.64, 442.0, 2.43, 3.39], True),  # k=100: NALU would flatten the others
        ([2.0, math.nan, 100.0], True),  # a missing group is ignored
        ([0.0, 5.0], False),  # zero has no place on a log axis
        ([], False),
    ],
)
def test_log_scale_for_wide_spread(means, expected):
    assert needs_log_scale(means) is expected


def test_aggregate_without_runs_fails(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.json"):
        find_runs([tmp_path])


def write_pretrain_metrics(directory: Path) -> Path:
    """Write a metrics.json shaped like pretrain_estimator.py's, which has no `model` key."""
    directory.mkdir(parents=True)
    path = directory / "metrics.json"
    path.write_text(json.dumps({"black_box": "sum", "soft_targets": "monte_carlo", "steps": 10}))
    return path


def test_aggregate_skips_pretrain_metrics(tmp_path, caplog):
    write_fake_run(tmp_path / "sweep" / "0", "estinet", 0, 0.4, 3.0)
    pretrain_metrics = write_pretrain_metrics(tmp_path / "pretrain")
    with caplog.at_level("INFO", logger="estinet.aggregate"):
        runs = find_runs([tmp_path])

    assert runs == [tmp_path / "sweep" / "0"]
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(skipped) == 1, skipped
    assert str(pretrain_metrics) in skipped[0]
    assert set(aggregate(runs)["groups"]) == {"estinet"}


def test_aggregate_only_pretrain_fails(tmp_path):
    write_pretrain_metrics(tmp_path / "pretrain")
    with pytest.raises(ConfigError, match="none of the 1 metrics.json files .* is a train_"):
        find_runs([tmp_path])


@pytest.mark.parametrize("content", ["{", "", "\xff\xfe"], ids=["truncated", "empty", "binary"])
def test_aggregate_corrupt_metrics_named(tmp_path, content):
    write_fake_run(tmp_path / "0", "estinet", 0, 0.4, 3.0)
    broken = tmp_path / "1" / "metrics.json"
    broken.parent.mkdir()
    broken.write_bytes(content.encode("latin-1"))

    with pytest.raises(DataError) as error:
        find_runs([tmp_path])
    assert str(broken) in str(error.value)
    assert "\n" not in str(error.value)


def test_aggregate_keeps_differing_presets(tmp_path):
    write_fake_run(tmp_path / "0", "estinet", 0, 0.4, 3.0, experiment="paper")
    write_fake_run(tmp_path / "1", "estinet", 1, 0.6, 4.0, experiment="paper")
    write_fake_run(tmp_path / "2", "estinet", 0, 0.9, 6.0, experiment="quick")
    results = aggregate(find_runs([tmp_path]))

    groups = results["groups"]
    assert set(groups) == {"estinet experiment=paper", "estinet experiment=quick"}
    assert groups["estinet experiment=paper"]["seeds"] == [0, 1]
    assert groups["estinet experiment=quick"]["seeds"] == [0]
    table = markdown_table(results)
    assert "| EstiNet experiment=paper | 2 |" in table
    assert "| EstiNet experiment=quick | 1 |" in table


def run_script(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_evaluate_checkpoint_writes_json(tmp_path, synthetic_mnist_root):
    cfg = compose_train(synthetic_overrides(synthetic_mnist_root) + ["model=nalu"])
    run_training(cfg, tmp_path / "run", progress=False)
    checkpoint = tmp_path / "run" / "best.pt"
    eval_dir = tmp_path / "evaluate"

    result = run_script(
        [str(REPO_ROOT / "evaluate.py"), f"checkpoint={checkpoint}", "k=[5]", "num_lists=16",
         "device=cpu", f"hydra.run.dir={eval_dir}"],
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads((eval_dir / "evaluation.json").read_text())
    assert written["checkpoint"] == str(checkpoint)
    assert written["model"] == "nalu"
    assert "test_mae_k5" in written
    assert "test_mae_k10" not in written
    assert f"wrote {eval_dir / 'evaluation.json'}" in result.stdout + result.stderr


def test_multirun_then_evaluate_runs(tmp_path, synthetic_mnist_root):
    sweep = tmp_path / "sweep"
    overrides = synthetic_overrides(synthetic_mnist_root) + ["pretrain.steps=5"]
    result = run_script(
        [str(REPO_ROOT / "train_addition.py"), "--multirun", *overrides, "model=estinet,nalu",
         f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(sweep.rglob("metrics.json"))) == 2

    result = run_script(
        [str(REPO_ROOT / "evaluate.py"), f"runs={sweep}", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("results.md", "results.json", "results.png"):
        assert (sweep / name).is_file(), name
    table = (sweep / "results.md").read_text()
    assert "EstiNet" in table
    assert "NALU" in table


@pytest.mark.slow
def test_quick_preset_beats_constant_prediction(tmp_path):
    """EstiNet on real MNIST (quick preset) has less than half the MAE of predicting the mean sum."""
    cfg = compose_train(["experiment=quick", f"data.root={REPO_ROOT / 'data'}", "train.progress=false"])
    metrics = run_training(cfg, tmp_path / "run", progress=False)

    data = build_addition_data(cfg.data)
    mean_sum = data.train_lists.sums.float().mean()
    test_sums = data.test_lists[10].sums.float()
    constant_mae = float((test_sums - mean_sum).abs().mean())
    assert metrics["test_mae_k10"] < 0.5 * constant_mae
