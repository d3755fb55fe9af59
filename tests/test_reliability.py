"""Reliability of training runs: exact resume, determinism, non-finite values, bad inputs.

Most tests call run_training in-process on the synthetic MNIST of conftest.py with configs
composed from conf/. A few run train_addition.py and pretrain_estimator.py as subprocesses to check
what a user gets: exit codes, one error line, no traceback, which files a failed run leaves.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from conftest import REPO_ROOT
from estinet import methods, train
from estinet.blackbox import make_black_box
from estinet.checkpoint import load_checkpoint
from estinet.data import mnist
from estinet.errors import CheckpointError, ConfigError, DataError
from estinet.models.estimator import BlackBoxEstimator, EstimatorConfig
from estinet.pretrain import PretrainConfig, pretrain_estimator, save_estimator
from estinet.train import NonFiniteLossError, run_training

RESULT_FILES = ("metrics.json", "last.pt", "best.pt")


class SimulatedKill(BaseException):
    """Stands in for SIGKILL in-process. BaseException, so no `except Exception` stops it."""


def tiny_overrides(root: Path) -> list[str]:
    """Debug preset shrunk to well under a second per epoch: 64 lists of k=3, 3 epochs."""
    return [
        "experiment=debug",
        f"data.root={root}",
        "data.verify=false",
        "data.validation_images=100",
        "data.train.num_lists=64",
        "data.train.k=3",
        "data.validation.num_lists=32",
        "data.validation.k=3",
        "data.test.num_lists=32",
        "data.test.k=[3]",
        "train.batch_size=16",
        "train.epochs=3",
        "num_threads=1",
        "device=cpu",
        "pretrain.steps=20",
        "pretrain.eval_size=32",
        "pretrain.eval_mc_samples=64",
        "pretrain.eval_every=20",
    ]


def compose_train(overrides: list[str]):
    with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
        return compose(config_name="train", overrides=overrides)


def without_timings(value):
    """Drop every key that names a duration, at any depth, so runs can be compared exactly."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def file_state(run_dir: Path) -> dict[str, tuple[int, int]]:
    """Map each results file in run_dir to (size, mtime in ns), to detect any rewrite."""
    state = {}
    for name in RESULT_FILES:
        path = run_dir / name
        if path.exists():
            stat = path.stat()
            state[name] = (stat.st_size, stat.st_mtime_ns)
    return state


def forbid_data_loading(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("data was loaded although the run should have stopped before")

    monkeypatch.setattr(train, "build_addition_data", fail)


# --------------------------------------------------------------------------- resume

MODEL_CASES = {
    "nalu": ["model=nalu"],
    "estinet-offline": ["model=estinet", "estimator.training=offline"],
    "estinet-hybrid": ["model=estinet", "estimator.training=hybrid"],
}


def interrupt_at_save(monkeypatch, save_number: int) -> None:
    """Raise SimulatedKill in place of the `save_number`-th checkpoint write (1-based).

    Epoch 1 writes last.pt (1) and best.pt (2); epoch 2 writes last.pt (3), and best.pt when it
    improved. Write 2 is a kill between the two writes of one epoch, write 3 a kill in epoch 2.
    """
    original = train.save_checkpoint
    calls = {"count": 0}

    def save(path, payload):
        calls["count"] += 1
        if calls["count"] == save_number:
            raise SimulatedKill(f"killed before writing {path}")
        original(path, payload)

    monkeypatch.setattr(train, "save_checkpoint", save)


@pytest.mark.parametrize("save_number", [2, 3], ids=["between-last-and-best", "in-epoch-2"])
@pytest.mark.parametrize("model", list(MODEL_CASES))
def test_resume_matches_uninterrupted(tmp_path, synthetic_mnist_root, monkeypatch, model,
                                      save_number):
    overrides = tiny_overrides(synthetic_mnist_root) + MODEL_CASES[model]
    expected = run_training(compose_train(overrides), tmp_path / "full", progress=False)

    run_dir = tmp_path / "killed"
    with monkeypatch.context() as patch:
        interrupt_at_save(patch, save_number)
        with pytest.raises(SimulatedKill):
            run_training(compose_train(overrides), run_dir, progress=False)
    assert not (run_dir / "metrics.json").exists()
    assert load_checkpoint(run_dir / "last.pt")["state"]["epoch"] == 1

    pretrain_calls = []
    monkeypatch.setattr(methods, "pretrain_estimator",
                        lambda *args, **kwargs: pretrain_calls.append(1))
    resumed = run_training(compose_train(overrides + ["resume=true"]), run_dir, progress=False)

    assert without_timings(resumed) == without_timings(expected)
    assert json.loads((run_dir / "metrics.json").read_text()) == resumed
    assert pretrain_calls == []  # the estimator came from last.pt, not from a new pretraining
    best = load_checkpoint(run_dir / "best.pt")
    assert best["state"]["epoch"] == expected["best_epoch"]


def test_resume_before_metrics_written(tmp_path, synthetic_mnist_root, monkeypatch):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu"]
    expected = run_training(compose_train(overrides), tmp_path / "full", progress=False)
    run_dir = tmp_path / "killed"

    def kill(path, data):
        raise SimulatedKill(f"killed before writing {path}")

    with monkeypatch.context() as patch:
        patch.setattr(train, "write_json", kill)
        with pytest.raises(SimulatedKill):
            run_training(compose_train(overrides), run_dir, progress=False)
    assert load_checkpoint(run_dir / "last.pt")["finished"]
    assert not (run_dir / "metrics.json").exists()

    resumed = run_training(compose_train(overrides + ["resume=true"]), run_dir, progress=False)

    assert without_timings(resumed) == without_timings(expected)
    assert (run_dir / "metrics.json").is_file()


def test_resume_into_another_run_dir(tmp_path, synthetic_mnist_root, monkeypatch):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu"]
    expected = run_training(compose_train(overrides), tmp_path / "full", progress=False)
    with monkeypatch.context() as patch:
        interrupt_at_save(patch, 3)
        with pytest.raises(SimulatedKill):
            run_training(compose_train(overrides), tmp_path / "killed", progress=False)

    resume = f"resume={tmp_path / 'killed' / 'last.pt'}"
    resumed = run_training(compose_train(overrides + [resume]), tmp_path / "moved", progress=False)

    assert without_timings(resumed) == without_timings(expected)
    for name in RESULT_FILES:
        assert (tmp_path / "moved" / name).is_file(), name


def test_complete_run_is_not_retrained(tmp_path, synthetic_mnist_root, monkeypatch):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu"]
    run_dir = tmp_path / "run"
    expected = run_training(compose_train(overrides), run_dir, progress=False)
    before = file_state(run_dir)
    forbid_data_loading(monkeypatch)

    again = run_training(compose_train(overrides + ["resume=true"]), run_dir, progress=False)

    assert again == expected
    assert file_state(run_dir) == before


def test_fresh_run_rejects_used_run_dir(tmp_path, synthetic_mnist_root, monkeypatch):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu", "train.epochs=1"]
    run_dir = tmp_path / "run"
    run_training(compose_train(overrides), run_dir, progress=False)
    before = file_state(run_dir)
    forbid_data_loading(monkeypatch)

    with pytest.raises(ConfigError, match="already contains a run") as error:
        run_training(compose_train(overrides), run_dir, progress=False)

    assert "resume=true" in str(error.value)
    assert file_state(run_dir) == before


def test_unfinished_run_dir_rejects_fresh_run(tmp_path, synthetic_mnist_root, monkeypatch):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu"]
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_save(patch, 3)
        with pytest.raises(SimulatedKill):
            run_training(compose_train(overrides), run_dir, progress=False)
    before = file_state(run_dir)

    with pytest.raises(ConfigError, match=r"already contains a run \(last.pt, best.pt\)"):
        run_training(compose_train(overrides), run_dir, progress=False)
    assert file_state(run_dir) == before


def test_resume_true_without_checkpoint_starts(tmp_path, synthetic_mnist_root):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu", "train.epochs=1"]
    metrics = run_training(compose_train(overrides + ["resume=true"]), tmp_path / "run",
                           progress=False)
    assert metrics["epochs"] == 1


@pytest.mark.parametrize(
    ("changed", "expected"),
    [
        ("train.epochs=4", "train.epochs: 3 -> 4"),
        ("seed=5", "seed: 0 -> 5"),
        ("extractor.hidden=20", "extractor.hidden: 50 -> 20"),
    ],
)
def test_resume_rejects_changed_config(tmp_path, synthetic_mnist_root, monkeypatch, changed,
                                       expected):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu"]
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        interrupt_at_save(patch, 3)
        with pytest.raises(SimulatedKill):
            run_training(compose_train(overrides), run_dir, progress=False)
    before = file_state(run_dir)
    forbid_data_loading(monkeypatch)

    with pytest.raises(ConfigError) as error:
        run_training(compose_train(overrides + ["resume=true", changed]), run_dir,
                     progress=False)

    assert expected in str(error.value)
    assert str(run_dir / "last.pt") in str(error.value)
    assert "start a new run with another hydra.run.dir" in str(error.value)
    assert file_state(run_dir) == before


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("model", ["nalu", "estinet-hybrid"])
def test_same_seed_same_metrics(tmp_path, synthetic_mnist_root, model):
    overrides = tiny_overrides(synthetic_mnist_root) + MODEL_CASES[model] + ["train.epochs=2"]
    first = run_training(compose_train(overrides), tmp_path / "a", progress=False)
    second = run_training(compose_train(overrides), tmp_path / "b", progress=False)
    assert without_timings(first) == without_timings(second)


def test_other_seed_other_metrics(tmp_path, synthetic_mnist_root):
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu", "train.epochs=1"]
    first = run_training(compose_train(overrides), tmp_path / "a", progress=False)
    second = run_training(compose_train(overrides + ["seed=1"]), tmp_path / "b", progress=False)
    assert first["history"][0]["train_loss"] != second["history"][0]["train_loss"]


# --------------------------------------------------------------------------- non-finite values


def nan_loss_on_calls(monkeypatch, loss_name: str, call_numbers: set[int]) -> None:
    """Make the registered loss `loss_name` return NaN on the given calls (1-based)."""
    original = methods.LOSSES[loss_name]
    calls = {"count": 0}

    def loss(prediction, target):
        calls["count"] += 1
        value = original(prediction, target)
        return value * float("nan") if calls["count"] in call_numbers else value

    monkeypatch.setitem(methods.LOSSES, loss_name, loss)


@pytest.mark.parametrize("model", ["nalu", "estinet-offline"])
def test_nonfinite_skip_counts_steps(tmp_path, synthetic_mnist_root, monkeypatch, model):
    # 64 lists in batches of 16 make 4 steps per epoch: calls 2 and 6 fall in epochs 1 and 2.
    nan_loss_on_calls(monkeypatch, "mse", {2, 6})
    overrides = tiny_overrides(synthetic_mnist_root) + MODEL_CASES[model] + ["train.nonfinite=skip"]
    metrics = run_training(compose_train(overrides), tmp_path / "run", progress=False)

    assert metrics["nonfinite_steps"] == 2
    assert [entry["skipped_steps"] for entry in metrics["history"]] == [1, 1, 0]
    for name in ("last.pt", "best.pt"):
        modules = load_checkpoint(tmp_path / "run" / name)["method"]["modules"]
        for module_name, weights in modules.items():
            for key, tensor in weights.items():
                assert torch.isfinite(tensor).all(), f"{name} {module_name}.{key}"


def test_nonfinite_estimator_update_counted(tmp_path, synthetic_mnist_root, monkeypatch):
    original = methods.label_digit_vectors
    calls = {"count": 0}

    def nan_targets(*args, **kwargs):
        calls["count"] += 1
        targets = original(*args, **kwargs)
        return targets * float("nan") if calls["count"] == 3 else targets

    monkeypatch.setattr(methods, "label_digit_vectors", nan_targets)
    overrides = tiny_overrides(synthetic_mnist_root) + MODEL_CASES["estinet-hybrid"]
    metrics = run_training(compose_train(overrides), tmp_path / "run", progress=False)

    assert metrics["nonfinite_steps"] == 1
    assert metrics["history"][0]["skipped_steps"] == 1


def test_nonfinite_stop_keeps_last_epoch(tmp_path, synthetic_mnist_root, monkeypatch):
    nan_loss_on_calls(monkeypatch, "mse", {6})  # epoch 2, step 2
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu", "train.nonfinite=stop"]
    run_dir = tmp_path / "run"

    with pytest.raises(NonFiniteLossError) as error:
        run_training(compose_train(overrides), run_dir, progress=False)

    assert "epoch 2, step 2" in str(error.value)
    assert "train.nonfinite=stop" in str(error.value)
    assert not (run_dir / "metrics.json").exists()
    assert load_checkpoint(run_dir / "last.pt")["state"]["epoch"] == 1


def test_nonfinite_weights_never_saved(tmp_path, synthetic_mnist_root, monkeypatch):
    original = methods.NaluMethod.train_step

    def corrupting_step(self, images, sums, digit_labels=None):
        result = original(self, images, sums, digit_labels)
        if self.epoch == 1:  # 0-based: the second epoch
            with torch.no_grad():
                self.network.extractor.fc2.bias.fill_(float("inf"))
        return result

    monkeypatch.setattr(methods.NaluMethod, "train_step", corrupting_step)
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu", "train.nonfinite=skip"]
    run_dir = tmp_path / "run"

    expected = "network weights contain NaN or inf after epoch 2"
    with pytest.raises(NonFiniteLossError, match=expected):
        run_training(compose_train(overrides), run_dir, progress=False)

    assert not (run_dir / "metrics.json").exists()
    for name in ("last.pt", "best.pt"):
        payload = load_checkpoint(run_dir / name)
        assert payload["state"]["epoch"] == 1, name
        bias = payload["method"]["modules"]["network"]["extractor.fc2.bias"]
        assert torch.isfinite(bias).all(), name


# --------------------------------------------------------------------------- checkpoints


def write_estimator(path: Path, **sizes) -> Path:
    save_estimator(path, BlackBoxEstimator(EstimatorConfig(**sizes)), "sum")
    return path


def truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture
def unfinished_nalu_run(tmp_path, synthetic_mnist_root, monkeypatch) -> Path:
    """Run dir of a NALU run killed in epoch 2: last.pt and best.pt of epoch 1."""
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu"]
    run_dir = tmp_path / "unfinished"
    with monkeypatch.context() as patch:
        interrupt_at_save(patch, 3)
        with pytest.raises(SimulatedKill):
            run_training(compose_train(overrides), run_dir, progress=False)
    return run_dir


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated", "truncated or corrupt"),
        ("other-model", "was trained with model=nalu, but model=estinet is configured"),
        ("estimator-file", "is not an estinet training checkpoint"),
    ],
)
def test_bad_resume_checkpoint(tmp_path, synthetic_mnist_root, unfinished_nalu_run, monkeypatch,
                               case, expected):
    last = unfinished_nalu_run / "last.pt"
    model = "model=estinet" if case == "other-model" else "model=nalu"
    if case == "truncated":
        truncate(last)
    elif case == "estimator-file":
        last = write_estimator(tmp_path / "estimator.pt")
    forbid_data_loading(monkeypatch)
    run_dir = tmp_path / "resumed"

    overrides = tiny_overrides(synthetic_mnist_root) + [model, f"resume={last}"]
    with pytest.raises(CheckpointError) as error:
        run_training(compose_train(overrides), run_dir, progress=False)

    assert expected in str(error.value)
    assert str(last) in str(error.value)
    assert file_state(run_dir) == {}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("truncated", "truncated or corrupt"),
        ("other-size", "lstm_hidden=16 (expected 50)"),
        ("training-checkpoint", "is not an estimator checkpoint"),
    ],
)
def test_bad_estimator_checkpoint(tmp_path, synthetic_mnist_root, unfinished_nalu_run,
                                  monkeypatch, case, expected):
    if case == "truncated":
        path = truncate(write_estimator(tmp_path / "estimator.pt"))
    elif case == "other-size":
        path = write_estimator(tmp_path / "estimator.pt", lstm_hidden=16)
    else:
        path = unfinished_nalu_run / "last.pt"
    forbid_data_loading(monkeypatch)
    overrides = tiny_overrides(synthetic_mnist_root) + [
        "model=estinet", "estimator.training=offline", f"estimator.checkpoint={path}",
    ]

    with pytest.raises(CheckpointError) as error:
        run_training(compose_train(overrides), tmp_path / "run", progress=False)

    assert expected in str(error.value)
    assert str(path) in str(error.value)
    assert file_state(tmp_path / "run") == {}


# --------------------------------------------------------------------------- data


@pytest.fixture
def offline_mirrors(monkeypatch) -> None:
    """Make every MNIST download source fail at once, so no test touches the network."""

    def unreachable(root, timeout):
        raise mnist.FetchError("unreachable (patched in tests)")

    monkeypatch.setattr(
        mnist, "download_sources", lambda: [("offline", "a patched source", unreachable)]
    )


@pytest.mark.parametrize(
    ("verify", "damage", "expected"),
    [
        (True, "flip", "MD5 mismatch"),
        (False, "truncate", "truncated"),
        (False, "foreign", "not an MNIST IDX file"),
    ],
)
def test_bad_mnist_file_is_named(tmp_path, synthetic_mnist_root, synthetic_checksums,
                                 offline_mirrors, verify, damage, expected):
    path = mnist.raw_dir(synthetic_mnist_root) / "train-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-1] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) - 10]
    else:
        data = bytearray(b"<html>not found</html>" * 4)
    path.write_bytes(bytes(data))
    overrides = tiny_overrides(synthetic_mnist_root) + [f"data.verify={str(verify).lower()}"]

    with pytest.raises(DataError) as error:
        run_training(compose_train(overrides), tmp_path / "run", progress=False)

    message = str(error.value)
    assert f"{path}: {expected}" in message
    assert "python -m estinet.data --root" in message
    assert file_state(tmp_path / "run") == {}


def test_unwritable_data_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a directory is needed")
    overrides = tiny_overrides(blocker / "data")

    with pytest.raises(DataError, match="Cannot write to the data directory") as error:
        run_training(compose_train(overrides), tmp_path / "run", progress=False)

    assert str(blocker / "data") in str(error.value)
    assert file_state(tmp_path / "run") == {}


# --------------------------------------------------------------------------- entry points


def run_script(script: str, args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run(
        [sys.executable, script, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "[ERROR]" in line]


def test_invalid_value_exits_with_one_line(tmp_path, synthetic_mnist_root):
    run_dir = tmp_path / "run"
    args = tiny_overrides(synthetic_mnist_root) + ["train.batch_size=0", f"hydra.run.dir={run_dir}"]
    result = run_script("train_addition.py", args)

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "train.batch_size=0 is invalid: expected an integer >= 1" in lines[0]
    assert sorted(path.name for path in run_dir.iterdir()) == [".hydra-last", "train_addition.log"]


@pytest.mark.parametrize(
    ("script", "override", "expected"),
    [
        ("train_addition.py", "train.lrr=1",
         "error: train.lrr is not a key of the train config. Did you mean train.lr? Use train.lr=1"),
        ("pretrain_estimator.py", "pretrain.step=10",
         "error: pretrain.step is not a key of the pretrain config. Did you mean pretrain.steps?"),
        ("evaluate.py", "num_threads=1", "error: num_threads is not a key of the config"),
    ],
)
def test_unknown_key_exits_with_one_line(tmp_path, synthetic_mnist_root, script, override,
                                         expected):
    args = [override, f"hydra.run.dir={tmp_path}/run"]
    if script == "train_addition.py":
        args = tiny_overrides(synthetic_mnist_root) + args
    result = run_script(script, args)

    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(expected)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_unwritable_data_dir_exits(tmp_path):
    """The same failure as test_unwritable_data_dir, seen from the command line."""
    blocker = tmp_path / "a-file"
    blocker.write_text("a regular file where a directory is needed")
    run_dir = tmp_path / "run"
    args = tiny_overrides(blocker / "data") + [f"hydra.run.dir={run_dir}"]
    result = run_script("train_addition.py", args)

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "Cannot write to the data directory" in lines[0]
    assert not (run_dir / "metrics.json").exists()


def test_multirun_reports_failed_job(tmp_path, synthetic_mnist_root):
    sweep_dir = tmp_path / "sweep"
    args = ["--multirun"] + tiny_overrides(synthetic_mnist_root) + [
        "model=nalu", "train.epochs=1", "train.lr=1e-3,-1", f"hydra.sweep.dir={sweep_dir}",
    ]
    result = run_script("train_addition.py", args)

    assert result.returncode != 0
    assert "job #1 failed: train.lr=-1 is invalid" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert (sweep_dir / "0" / "metrics.json").is_file()
    assert not (sweep_dir / "1" / "metrics.json").exists()


def test_complete_run_exits_zero(tmp_path, synthetic_mnist_root):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu", "train.epochs=1"]
    run_training(compose_train(overrides), run_dir, progress=False)
    before = file_state(run_dir)

    resume = ["resume=true", f"hydra.run.dir={run_dir}"]
    result = run_script("train_addition.py", overrides + resume)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "already complete" in result.stdout + result.stderr
    assert file_state(run_dir) == before


@pytest.mark.parametrize(
    "rejected",
    [["train.lr=1e-3"], ["resume=true", "seed=5"]],
    ids=["fresh-run-into-finished-dir", "resume-with-other-seed"],
)
def test_rejected_command_keeps_run_config(tmp_path, synthetic_mnist_root, rejected):
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(synthetic_mnist_root) + ["model=nalu", "train.epochs=1",
                                                        f"hydra.run.dir={run_dir}"]
    first = run_script("train_addition.py", overrides)
    assert first.returncode == 0, first.stdout + first.stderr
    record = {path.name: path.read_text() for path in (run_dir / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    before = file_state(run_dir)

    result = run_script("train_addition.py", overrides + rejected)

    assert result.returncode == 1, result.stdout + result.stderr
    assert len(error_lines(result)) == 1
    assert {path.name: path.read_text() for path in (run_dir / ".hydra").iterdir()} == record
    assert file_state(run_dir) == before
    assert rejected[-1] in (run_dir / ".hydra-last" / "overrides.yaml").read_text()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("+train.batchsize=16", "Did you mean train.batch_size? Use train.batch_size=16 instead"),
        ("+model.samples=8", "model.samples is not a key of the model config. Only model=reinf"),
    ],
    ids=["misspelled", "other-model"],
)
def test_added_unknown_key_exits(tmp_path, synthetic_mnist_root, override, expected):
    """Hydra's own hint, a leading +, adds an undefined key, and the config check rejects it."""
    run_dir = tmp_path / "run"
    args = tiny_overrides(synthetic_mnist_root) + [
        "model=nalu", override, f"hydra.run.dir={run_dir}",
    ]
    result = run_script("train_addition.py", args)

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert sorted(path.name for path in run_dir.iterdir()) == [".hydra-last", "train_addition.log"]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["checkpoint={run_dir}"],
         "is a directory, not a checkpoint file. Pass the best.pt or last.pt inside it"),
        (["checkpoint={run_dir}/best.pt", "num_lists=0"],
         "num_lists=0 is invalid: expected an integer >= 1 or null, for example num_lists=1000"),
        (["checkpoint={run_dir}/best.pt", "k=[0]"],
         "k=[0] is invalid: expected an integer >= 1 or a list of them, for example k=[10,100]"),
        (["checkpoint={run_dir}/best.pt", "k=0"], "k=0 is invalid"),
        (["checkpoint={run_dir}/best.pt", "k=[10,10]"], "k=[10,10] is invalid: expected distinct"),
        (["checkpoint={run_dir}/best.pt", "k=[]"], "k=[] is invalid"),
        (["checkpoint={run_dir}/metrics.json"],
         "is not a checkpoint: it is not a file written by torch.save. Pass the best.pt or last.pt"),
        (["runs={run_dir}", "k=[10]", "num_lists=5"],
         "k, num_lists apply only to checkpoint=PATH. runs=DIR aggregates the test results"),
    ],
    ids=["directory", "num-lists-0", "k-list-0", "k-0", "k-repeated", "k-empty", "metrics-file",
         "runs-with-k"],
)
def test_evaluate_bad_input_exits(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.json").write_text('{"model": "nalu", "test_mae_k10": 1.4}\n')
    args = [arg.format(run_dir=run_dir) for arg in args]
    result = run_script("evaluate.py", args + [f"hydra.run.dir={tmp_path / 'evaluate'}"])

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert expected in lines[0]
    assert "data.test" not in lines[0]  # the message names the user's key, not the internal one


@pytest.mark.parametrize("progress", [True, False], ids=["on", "off"])
def test_pretrain_progress_switch(tmp_path, progress):
    args = [
        f"progress={str(progress).lower()}", "pretrain.steps=20", "pretrain.batch_size=16",
        "pretrain.max_length=5", "pretrain.mc_samples=8", "pretrain.eval_every=20",
        "pretrain.eval_size=32", "pretrain.eval_mc_samples=64", f"hydra.run.dir={tmp_path / 'run'}",
    ]
    result = run_script("pretrain_estimator.py", args)

    assert result.returncode == 0, result.stdout + result.stderr
    assert ("pretrain estimator:" in result.stderr) == progress


def test_pretrain_bar_redraws_once_a_second(capsys):
    config = PretrainConfig(steps=100, batch_size=8, max_length=3, mc_samples=4, eval_every=100,
                            eval_size=16, eval_mc_samples=32)
    started = time.perf_counter()
    pretrain_estimator(EstimatorConfig(), config, make_black_box("sum"), device="cpu", seed=0,
                       progress=True)
    seconds = time.perf_counter() - started

    redraws = capsys.readouterr().err.count("\r")
    # One redraw per elapsed second plus the first and the last. A bar redrawn on every step, as
    # set_postfix does by default, would count about 100.
    assert redraws <= seconds + 3, redraws


def test_pretrain_invalid_value_exits(tmp_path):
    run_dir = tmp_path / "run"
    result = run_script("pretrain_estimator.py", ["pretrain.steps=0", f"hydra.run.dir={run_dir}"])

    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    lines = error_lines(result)
    assert len(lines) == 1, lines
    assert "pretrain.steps must be >= 1, got 0" in lines[0]
    assert not (run_dir / "estimator.pt").exists()


@pytest.mark.slow
def test_sigkill_then_resume_matches(tmp_path, synthetic_mnist_root):
    """Kill a real train_addition.py process after its first epoch, resume it, compare.

    Uses the debug list counts (256 lists of k=10), so an epoch takes long enough, about half a
    second, for the kill to land before the run ends. The hybrid estimator exercises every saved
    state: two optimizers, the schedule, the data order and the Monte-Carlo generator.
    """
    overrides = tiny_overrides(synthetic_mnist_root) + [
        "data.train.num_lists=256", "data.train.k=10", "train.batch_size=32",
        "model=estinet", "estimator.training=hybrid",
    ]
    expected = run_training(compose_train(overrides), tmp_path / "full", progress=False)

    run_dir = tmp_path / "killed"
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    process = subprocess.Popen(
        [sys.executable, "train_addition.py", *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "last.pt").exists():
            assert process.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline, "no last.pt after 120 s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists(), "the kill came after the run finished"
    assert load_checkpoint(run_dir / "last.pt")["state"]["epoch"] < 3

    resume = ["resume=true", f"hydra.run.dir={run_dir}"]
    result = run_script("train_addition.py", overrides + resume)

    assert result.returncode == 0, result.stdout + result.stderr
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert without_timings(resumed) == without_timings(expected)
