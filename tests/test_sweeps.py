"""Seed sweeps through Hydra's joblib and submitit launchers, then aggregation by evaluate.py.

Each test runs a two-job sweep of the debug preset on the synthetic MNIST as a subprocess, as a
user would from the shell. The launcher plugins come from requirements-launchers.txt, which
`make test` installs. Without them these tests fail and name the missing package.
"""

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from test_train import run_script, synthetic_overrides

from conftest import REPO_ROOT

RUN_FILES = ("metrics.json", "best.pt", "last.pt", ".hydra/config.yaml", ".hydra/overrides.yaml")


def require_plugin(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(
            f"{package} is not installed. Run `make test`, or "
            f"`pip install -r requirements-launchers.txt`"
        )


def run_seed_sweep(tmp_path: Path, root: Path, launcher_overrides: list[str]) -> Path:
    """Sweep seeds 0 and 1 of EstiNet's debug run through a launcher and return the sweep dir."""
    sweep = tmp_path / "sweep"
    overrides = synthetic_overrides(root) + ["pretrain.steps=5", "model=estinet"]
    result = run_script(
        [str(REPO_ROOT / "train_addition.py"), "--multirun", *overrides, *launcher_overrides,
         "seed=0,1", f"hydra.sweep.dir={sweep}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return sweep


def check_complete_runs(sweep: Path) -> list[dict]:
    run_dirs = sorted(metrics.parent for metrics in sweep.rglob("metrics.json"))
    assert len(run_dirs) == 2, run_dirs
    all_metrics = []
    for run_dir in run_dirs:
        for name in RUN_FILES:
            assert (run_dir / name).is_file(), f"{run_dir} lacks {name}"
        all_metrics.append(json.loads((run_dir / "metrics.json").read_text()))
    assert sorted(metrics["seed"] for metrics in all_metrics) == [0, 1]
    return all_metrics


def check_aggregation(tmp_path: Path, sweep: Path) -> None:
    result = run_script(
        [str(REPO_ROOT / "evaluate.py"), f"runs={sweep}", f"hydra.run.dir={tmp_path / 'eval'}"],
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("results.md", "results.json", "results.png", "learning_curves.png"):
        assert (sweep / name).is_file(), name
    rows = (sweep / "results.md").read_text().splitlines()[2:]
    assert len(rows) == 1, rows  # both seeds pooled into one row
    assert rows[0].startswith("| EstiNet ")
    assert "| 2 |" in rows[0]
    results = json.loads((sweep / "results.json").read_text())
    (group,) = results["groups"].values()
    assert group["seeds"] == [0, 1]
    assert group["learning_curve"][0]["runs"] == 2


@pytest.mark.slow
def test_joblib_sweep_then_evaluate(tmp_path, synthetic_mnist_root):
    require_plugin("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher")
    sweep = run_seed_sweep(
        tmp_path, synthetic_mnist_root, ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    )
    for metrics in check_complete_runs(sweep):
        assert metrics["environment"]["threads"] == 1  # num_threads=1 of synthetic_overrides
    hydra_config = yaml.safe_load((sweep / "0" / ".hydra" / "hydra.yaml").read_text())
    assert hydra_config["hydra"]["launcher"]["_target_"].endswith("JoblibLauncher")
    assert hydra_config["hydra"]["launcher"]["n_jobs"] == 2
    check_aggregation(tmp_path, sweep)


@pytest.mark.slow
def test_submitit_local_sweep_then_evaluate(tmp_path, synthetic_mnist_root):
    require_plugin("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
    sweep = run_seed_sweep(
        tmp_path, synthetic_mnist_root,
        ["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
         "hydra.launcher.cpus_per_task=1"],
    )
    check_complete_runs(sweep)
    assert list((sweep / ".submitit").iterdir()), "submitit wrote no job folders"
    check_aggregation(tmp_path, sweep)


def test_slurm_launcher_config_composes():
    """conf/hydra/launcher/slurm.yaml extends the plugin's submitit_slurm with overridable keys."""
    require_plugin("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher")
    result = run_script(
        [str(REPO_ROOT / "train_addition.py"), "hydra/launcher=slurm",
         "hydra.launcher.partition=cpu", "hydra.launcher.timeout_min=30", "--cfg", "hydra"],
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    launcher = yaml.safe_load(result.stdout)["hydra"]["launcher"]
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["partition"] == "cpu"
    assert launcher["timeout_min"] == 30
    for key in ("cpus_per_task", "mem_gb", "array_parallelism"):
        assert isinstance(launcher[key], int), key
