import shutil
import subprocess
from pathlib import Path

import pytest

from estinet import runtime
from estinet.runtime import environment_summary, source_version

REPOSITORY = Path(runtime.__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPOSITORY), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPOSITORY / ".git").exists(),
    reason="needs git and a git checkout of the repository",
)
def test_source_version_names_head_commit():
    version = source_version()
    commit = _git("rev-parse", "--short=12", "HEAD")
    modified = _git("status", "--porcelain", "--untracked-files=no") != ""
    assert version == (f"{commit}+changes" if modified else commit)


def test_source_version_without_git(monkeypatch):
    def missing_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(runtime.subprocess, "run", missing_git)
    assert source_version() is None


def test_environment_records_source_version(monkeypatch):
    monkeypatch.setattr(runtime, "source_version", lambda: "0123456789ab")
    assert environment_summary()["source_version"] == "0123456789ab"


@pytest.mark.parametrize("launcher", ["parallel", "slurm", "submitit_local"])
def test_missing_launcher_plugin_named(monkeypatch, launcher):
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    message = runtime.missing_launcher_plugin(["--multirun", f"hydra/launcher={launcher}"])
    assert message is not None
    assert f"hydra/launcher={launcher} needs the hydra-" in message
    assert "pip install -r requirements-launchers.txt" in message


def test_missing_plugin_namespace(monkeypatch):
    def no_namespace(name):
        raise ModuleNotFoundError("No module named 'hydra_plugins'")

    monkeypatch.setattr(runtime.importlib.util, "find_spec", no_namespace)
    assert "hydra-joblib-launcher" in runtime.missing_launcher_plugin(["hydra/launcher=joblib"])


def test_launcher_check_ignores_other_arguments(monkeypatch):
    monkeypatch.setattr(runtime.importlib.util, "find_spec", lambda name: None)
    assert runtime.missing_launcher_plugin(["seed=1", "hydra/launcher=basic", "--help"]) is None


def test_invalid_command_line_exits(monkeypatch):
    monkeypatch.setattr(runtime.sys, "argv", ["train_addition.py", "train.epoch=3"])
    with pytest.raises(SystemExit) as exit_info:
        runtime.exit_on_invalid_command_line("train")
    assert str(exit_info.value.code).startswith("error: train.epoch is not a key")


def test_valid_command_line_continues(monkeypatch):
    monkeypatch.setattr(runtime.sys, "argv", ["train_addition.py", "train.epochs=3", "seed=1"])
    assert runtime.exit_on_invalid_command_line("train") is None
