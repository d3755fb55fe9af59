"""Process-level set-up shared by the entry points: devices, threads, seeds and RNG snapshots."""

import importlib.util
import logging
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode

from estinet.config_keys import unknown_override_message
from estinet.errors import ConfigError

# Workspace setting that makes cuBLAS, and the cuDNN LSTM built on it, deterministic on CUDA 10.2
# and later (PyTorch's "cuDNN RNN determinism" note lists :16:8 and :4096:2).
CUBLAS_WORKSPACE_CONFIG = ":16:8"

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """Turn `auto`, `cpu`, `cuda` or `cuda:N` into a torch.device that exists on this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={name} requested but CUDA is not available on this machine. "
                "Use device=cpu or device=auto"
            )
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={name} requested but only {torch.cuda.device_count()} CUDA device(s) "
                "exist. Use device=cuda:0 or device=auto"
            )
        return torch.device(name)
    raise ConfigError(f"device={name!r} is invalid. Use auto, cpu, cuda or cuda:N")


def set_threads(num_threads: int | None) -> None:
    """Set torch's intra-op CPU threads; None keeps torch's default (one per core)."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ConfigError(f"num_threads={num_threads} is invalid. Use a positive integer or null")
    torch.set_num_threads(num_threads)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_determinism(deterministic: bool, device: torch.device) -> None:
    """Make CUDA kernels deterministic when `deterministic` is true and `device` is a GPU.

    Calls torch.use_deterministic_algorithms(True, warn_only=True), so an operation without a
    deterministic CUDA kernel warns instead of failing, turns off cuDNN autotuning and sets
    CUBLAS_WORKSPACE_CONFIG unless the environment already sets it. CPU runs need none of this:
    with the same seed, thread count and torch build they repeat exactly.
    """
    if not deterministic or device.type != "cuda":
        return
    # NOTE: cuBLAS reads the variable when it creates its handle, so it only takes effect when
    # nothing in this process has run a CUDA matrix product yet. Not verified on a GPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def capture_rng_state() -> dict[str, Any]:
    """Snapshot every global RNG so that a resumed run draws the same numbers."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the snapshot taken by capture_rng_state."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def source_version() -> str | None:
    """Return the git commit of this checkout, with "+changes" when tracked files are modified.

    Returns None when git or the repository is not available, for example in an exported copy.
    """
    repository = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repository), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        changes = subprocess.run(
            ["git", "-C", str(repository), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+changes" if changes else commit


def environment_summary() -> dict[str, Any]:
    """Machine and code facts worth recording beside every result."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "source_version": source_version(),
    }


class JobFailedError(CompactHydraException):
    """A multirun job that stopped on an estinet error. Hydra prints only its message."""


# Launchers selectable with hydra/launcher=NAME, and the plugin module and package each one needs.
LAUNCHER_PLUGINS = {
    "parallel": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}


def missing_launcher_plugin(argv: list[str]) -> str | None:
    """Return an error message when argv selects a Hydra launcher whose plugin is not installed.

    Without this check Hydra fails later, with a message about a missing config group option that
    does not say which package to install.
    """
    for argument in argv:
        name = argument.removeprefix("hydra/launcher=")
        if name == argument or name not in LAUNCHER_PLUGINS:
            continue
        module, package = LAUNCHER_PLUGINS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # hydra_plugins itself is missing
            found = False
        if not found:
            return (
                f"hydra/launcher={name} needs the {package} package, which is not installed. "
                "Install the launcher plugins with: pip install -r requirements-launchers.txt"
            )
    return None


# Hydra flags that select another config than the entry point's own, so the shipped keys of that
# config do not apply to the overrides.
OTHER_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")


def check_command_line(argv: list[str], config_name: str) -> str | None:
    """Return a one-line error for a command line that Hydra would reject with a long message.

    Covers a launcher whose plugin is missing and an override of a key that conf/ does not define.
    """
    problem = missing_launcher_plugin(argv)
    if problem is None and not any(argument.startswith(OTHER_CONFIG_FLAGS) for argument in argv):
        problem = unknown_override_message(argv, config_name)
    return problem


def exit_on_invalid_command_line(config_name: str) -> None:
    """Exit with code 1 and one error line on stderr when check_command_line rejects sys.argv."""
    problem = check_command_line(sys.argv[1:], config_name)
    if problem:
        sys.exit(f"error: {problem}")


def fail_job(error: Exception, logger: logging.Logger) -> NoReturn:
    """Log `error` and end the Hydra job as failed, without a traceback.

    A single run exits with code 1. In a multirun, the job raises JobFailedError so that Hydra
    marks it failed and still runs the other jobs, then prints this message and exits with code 1.
    """
    message = str(error)
    logger.error("%s", message)
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        job = HydraConfig.get().job
        first_line = message.splitlines()[0] if message else type(error).__name__
        raise JobFailedError(f"job #{job.num} failed: {first_line}") from None
    sys.exit(1)
