"""Atomic checkpoint and results files, and checked loading of training checkpoints."""

import json
import os
import pickle
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from estinet.errors import CheckpointError

CHECKPOINT_KIND = "estinet.training_run"
CHECKPOINT_FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Write through `write(file)` into a temp file beside `path`, fsync it, then rename it.

    A kill at any moment leaves either the old file or the complete new one, never a partial one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(handle, 0o644)  # mkstemp creates 0600 files; results are meant to be shared
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def atomic_torch_save(path: str | os.PathLike, payload: Any) -> None:
    """torch.save `payload` to `path` through a temp file, so a kill never leaves half a file."""
    _atomic_write(Path(path), lambda file: torch.save(payload, file))


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Save a training checkpoint atomically, tagged with its kind and format version."""
    payload = {"kind": CHECKPOINT_KIND, "format_version": CHECKPOINT_FORMAT_VERSION, **payload}
    atomic_torch_save(path, payload)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically (sorted keys, indented) so readers never see half a results file."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _atomic_write(Path(path), lambda file: file.write(text.encode()))


def _starts_like_torch_save(path: Path) -> bool:
    """Return whether the file begins as torch.save output: a zip archive or a legacy pickle."""
    with path.open("rb") as file:
        head = file.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def load_checkpoint(path: str | os.PathLike, *, expected_model: str | None = None) -> dict[str, Any]:
    """Load a training checkpoint on the CPU, raising CheckpointError naming the file on any problem.

    Checks that the file exists, unpickles completely (not truncated or corrupt), is a training
    checkpoint of a supported format, and, when `expected_model` is given, belongs to that model.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} is a directory, not a checkpoint file. Pass the best.pt or last.pt "
            f"inside it, for example {path / 'best.pt'}"
        )
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found. Check the path or train a model first")
    if not _starts_like_torch_save(path):
        raise CheckpointError(
            f"{path} is not a checkpoint: it is not a file written by torch.save. Pass the best.pt "
            "or last.pt of a run dir"
        )
    try:
        # weights_only=False: the payload contains RNG states (NumPy arrays, Python tuples) as well
        # as tensors. Only load checkpoints you created yourself.
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
        reason = str(error).rstrip(". ")
        raise CheckpointError(
            f"failed to read checkpoint {path} ({reason}): the file is truncated or corrupt. Use "
            "another checkpoint of the run (best.pt or last.pt), or train again"
        ) from error
    if not isinstance(payload, dict) or payload.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(
            f"{path} is not an estinet training checkpoint (best.pt or last.pt written by "
            "train_addition.py)"
        )
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('format_version')!r}; this code "
            f"reads version {CHECKPOINT_FORMAT_VERSION}"
        )
    if expected_model is not None and payload.get("model") != expected_model:
        raise CheckpointError(
            f"checkpoint {path} was trained with model={payload.get('model')}, "
            f"but model={expected_model} is configured. Use a matching model= override"
        )
    return payload


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignored: Collection[str] = ()
) -> list[str]:
    """List the dotted keys whose values differ between two plain configs, as `key: saved -> now`.

    A key in `ignored` is skipped with everything below it. Keys present in only one config count
    as differences, shown with the value `<absent>`.
    """
    saved_values, current_values = _flatten(saved), _flatten(current)
    differences = []
    for key in sorted(saved_values.keys() | current_values.keys()):
        if any(key == prefix or key.startswith(prefix + ".") for prefix in ignored):
            continue
        before = saved_values.get(key, "<absent>")
        after = current_values.get(key, "<absent>")
        if before != after:
            differences.append(f"{key}: {before} -> {after}")
    return differences


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
