"""One training run of an image-addition model, start to finish: the story of train_addition.py.

Data and models move to the device once. Each epoch shuffles the training lists with a generator
seeded by `seed`, takes one step per batch, then scores the validation lists. The epoch with the
lowest validation MAE is saved as best.pt; test lists are scored only once, with best.pt, after
training. last.pt contains everything needed to resume after a kill, RNG states included, so a
resumed run ends with the same numbers as an uninterrupted one. metrics.json is written last, so a
run dir without it contains an unfinished run.
"""

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from estinet.blackbox import make_black_box
from estinet.checkpoint import config_differences, load_checkpoint, save_checkpoint, write_json
from estinet.config import validate_train_config
from estinet.data import AdditionData, build_addition_data
from estinet.errors import CheckpointError, ConfigError, EstinetError
from estinet.evaluation import (
    digit_accuracy,
    evaluate_lists,
    split_probabilities,
    standard_error_of_mae,
)
from estinet.methods import Method, build_method
from estinet.runtime import (
    capture_rng_state,
    configure_determinism,
    environment_summary,
    resolve_device,
    restore_rng_state,
    seed_everything,
    set_threads,
)

log = logging.getLogger(__name__)

# Keys that may differ between a run and its resumption. The data and checkpoint keys name the same
# inputs, and the train keys do not change any number. Another device, thread count or
# deterministic setting continues the same experiment, but its numbers then differ from those of
# an uninterrupted run (a resumed run warns when the thread count changed).
RESUME_FREE_KEYS = (
    "resume",
    "device",
    "num_threads",
    "deterministic",
    "train.progress",
    "train.nonfinite",
    "data.root",
    "data.verify",
    "data.download_timeout",
    "estimator.checkpoint",  # a resumed estimator comes from last.pt, not from this file
)

# Hydra writes the composed config, its own settings and the overrides of every command into
# COMMAND_CONFIG_DIR (hydra.output_subdir). RUN_CONFIG_DIR contains those of the command that
# started the run, the files evaluate.py reads to label runs.
COMMAND_CONFIG_DIR = ".hydra-last"
RUN_CONFIG_DIR = ".hydra"


class NonFiniteLossError(EstinetError, RuntimeError):
    """A non-finite loss or gradient under train.nonfinite=stop, or non-finite weights."""


def steps_per_epoch(num_lists: int, batch_size: int) -> int:
    # Shuffled batches drop the last partial batch (ListSet.batches), unless there is only one.
    return max(1, num_lists // batch_size)


def evaluate_split(method: Method, data: AdditionData, split: str) -> dict[str, float]:
    """Score the validation split (`val`) or the test split (`test`, every configured k)."""
    images = data.val_images if split == "val" else data.test_images
    probabilities = split_probabilities(method, images)
    results = {f"{split}_digit_accuracy": digit_accuracy(probabilities, images.labels)}
    list_sets = {data.val_lists.k: data.val_lists} if split == "val" else data.test_lists
    for k, lists in list_sets.items():
        for name, value in evaluate_lists(method, probabilities, lists).items():
            # e.g. "mae" -> test_mae_k10, "estimator_mae" -> test_estimator_mae_k10
            results[f"{split}_{name}_k{k}"] = value
        if split == "test":
            results[f"test_mae_stderr_k{k}"] = standard_error_of_mae(method, probabilities, lists)
    return results


def run_training(cfg: DictConfig, output_dir: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train the configured model, write best.pt, last.pt and metrics.json, return the metrics.

    Raises ConfigError before any work when a config value is invalid or the run dir already
    contains another run, CheckpointError for a checkpoint that cannot be resumed, and
    NonFiniteLossError under train.nonfinite=stop or when the weights stop being finite.
    """
    validate_train_config(cfg)
    output_dir = Path(output_dir)
    metrics_path = output_dir / "metrics.json"
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    model_name = cfg.model.name

    resume_path = _resume_path(cfg, output_dir)
    checkpoint = None
    if resume_path is not None:
        checkpoint = _load_resumable(cfg, resume_path)
        if checkpoint.get("finished") and metrics_path.exists():
            log.info("run in %s is already complete (metrics.json); nothing to do", output_dir)
            return json.loads(metrics_path.read_text())

    output_dir.mkdir(parents=True, exist_ok=True)
    _record_run_config(output_dir, fresh=checkpoint is None)
    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    configure_determinism(cfg.deterministic, device)
    seed_everything(int(cfg.seed))
    log.info("model=%s seed=%s device=%s run dir=%s", model_name, cfg.seed, device, output_dir)

    data = build_addition_data(cfg.data, device=device)
    black_box = make_black_box(cfg.black_box)
    batch_size = int(cfg.train.batch_size)
    epochs = int(cfg.train.epochs)
    per_epoch = steps_per_epoch(len(data.train_lists), batch_size)

    state: dict[str, Any] = {"epoch": 0, "best_val_mae": math.inf, "best_epoch": None,
                             "history": [], "nonfinite_steps": 0}
    order_generator = torch.Generator().manual_seed(int(cfg.seed))
    # A resumed run takes every weight from last.pt, so EstiNet must not pretrain its estimator
    # again: that would waste minutes, and the global RNG is restored from last.pt anyway.
    method = build_method(cfg, black_box, device, epochs * per_epoch,
                          initialize_estimator=checkpoint is None)
    if checkpoint is not None:
        _restore(method, checkpoint, resume_path, state, order_generator)
        if resume_path != last_path.resolve():
            save_checkpoint(last_path, checkpoint)  # the run dir then contains a resumable run
        _ensure_best_checkpoint(checkpoint, resume_path, best_path, state)
        log.info("resumed from %s after epoch %d", resume_path, state["epoch"])
        saved_threads = checkpoint.get("environment", {}).get("threads")
        if saved_threads is not None and saved_threads != torch.get_num_threads():
            log.warning(
                "the run used %d CPU threads and continues with %d, so its numbers will differ "
                "from an uninterrupted run. Set num_threads=%d to match",
                saved_threads, torch.get_num_threads(), saved_threads,
            )

    for epoch in range(state["epoch"], epochs):
        entry = _train_epoch(cfg, method, data, epoch, order_generator, progress=progress)
        state["history"].append(entry)
        state["nonfinite_steps"] += entry["skipped_steps"]
        state["epoch"] = epoch + 1

        # A NaN or infinite validation MAE never counts as an improvement.
        improved = math.isfinite(entry["val_mae"]) and entry["val_mae"] < state["best_val_mae"]
        if improved:
            state["best_val_mae"], state["best_epoch"] = entry["val_mae"], epoch + 1
        _check_finite_weights(method, epoch + 1, last_path)
        payload = _payload(cfg, method, state, order_generator, finished=epoch + 1 == epochs)
        # last.pt first: if a kill falls between the two writes, last.pt is the best epoch itself
        # and a resumed run rewrites best.pt from it (_ensure_best_checkpoint).
        save_checkpoint(last_path, payload)
        if improved:
            save_checkpoint(best_path, payload)
        log.info(
            "epoch %d/%d  train loss %.4f  val MAE %.3f  val exact %.3f  val digit acc %.4f  "
            "non-finite steps %d  %.1fs%s",
            epoch + 1, epochs, entry["train_loss"], entry["val_mae"], entry["val_exact"],
            entry["val_digit_accuracy"], entry["skipped_steps"], entry["seconds"],
            "  (best)" if improved else "",
        )

    if state["best_epoch"] is None:
        raise NonFiniteLossError(
            f"no epoch reached a finite validation MAE, so there is no best.pt to test. "
            f"Lower train.lr and start a new run (the epochs are in {last_path})"
        )
    metrics = _final_metrics(cfg, method, data, state, best_path)
    write_json(metrics_path, metrics)
    log.info(
        "test: %s",
        "  ".join(f"{key} {value:.4f}" for key, value in metrics.items()
                  if key.startswith("test_") and isinstance(value, float)),
    )
    log.info("wrote %s, %s and %s", metrics_path, best_path, last_path)
    return metrics


def _train_epoch(cfg, method, data, epoch, order_generator, *, progress) -> dict[str, Any]:
    """Run one epoch of training steps, score the validation lists, return the history entry."""
    started = time.perf_counter()
    batch_size, epochs = int(cfg.train.batch_size), int(cfg.train.epochs)
    per_epoch = steps_per_epoch(len(data.train_lists), batch_size)
    method.set_epoch(epoch)
    method.train()
    losses, nonfinite = [], 0
    rows_iter = data.train_lists.batches(batch_size, generator=order_generator, shuffle=True)
    bar = tqdm(rows_iter, total=per_epoch, desc=f"epoch {epoch + 1}/{epochs}",
               disable=not progress, leave=False, mininterval=1.0)
    for step, rows in enumerate(bar):
        images, sums = data.train_lists.batch(rows)
        labels = data.train_lists.digit_labels(rows) if method.uses_digit_labels else None
        result = method.train_step(images, sums, labels)
        if result.nonfinite:
            nonfinite += 1
            if cfg.train.nonfinite == "stop":
                raise NonFiniteLossError(
                    f"non-finite loss or gradient at epoch {epoch + 1}, step {step + 1} "
                    f"(loss={result.loss}) with train.nonfinite=stop. last.pt in the run dir, if "
                    "any, holds the previous epoch. Lower train.lr and start a new run, or resume "
                    "with train.nonfinite=skip to skip such steps"
                )
            if nonfinite == 1:
                log.warning(
                    "epoch %d, step %d: non-finite loss or gradient (loss=%s); its update is "
                    "skipped. Further ones in this epoch are only counted",
                    epoch + 1, step + 1, result.loss,
                )
        if result.skipped:
            continue
        losses.append(result.loss)
        if step % 50 == 0:
            # refresh=False leaves the redraw to tqdm, at most once per mininterval.
            bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)

    val = evaluate_split(method, data, "val")
    val_k = data.val_lists.k
    entry = {
        "epoch": epoch + 1,
        "train_loss": sum(losses) / len(losses) if losses else math.nan,  # NaN: every step skipped
        "val_mae": val[f"val_mae_k{val_k}"],
        "val_exact": val[f"val_exact_k{val_k}"],
        "val_digit_accuracy": val["val_digit_accuracy"],
        "lists_seen": (epoch + 1) * per_epoch * batch_size,
        "skipped_steps": nonfinite,  # steps with a non-finite loss or gradient
        "seconds": time.perf_counter() - started,
    }
    if f"val_estimator_mae_k{val_k}" in val:
        entry["val_estimator_mae"] = val[f"val_estimator_mae_k{val_k}"]
    return entry


def _check_finite_weights(method: Method, epoch: int, last_path: Path) -> None:
    """Raise NonFiniteLossError when any weight is NaN or infinite, before it can be saved."""
    for module_name, module in method.modules().items():
        broken = [name for name, tensor in module.named_parameters()
                  if not bool(torch.isfinite(tensor).all())]
        if broken:
            raise NonFiniteLossError(
                f"the {module_name} weights contain NaN or inf after epoch {epoch} "
                f"({', '.join(broken[:3])}). Nothing was saved, so {last_path} (if it exists) "
                "still holds the last finite epoch. Lower train.lr and start a new run"
            )


# --------------------------------------------------------------------------- resuming


def _record_run_config(output_dir: Path, *, fresh: bool) -> None:
    """Copy the config files Hydra wrote for this command into .hydra/, the run's own record.

    Hydra writes them into COMMAND_CONFIG_DIR (hydra.output_subdir in conf/train.yaml) before any
    check runs. Copying them only once a command is accepted means that a rejected command never
    replaces the config of the run already in the dir. A resumed run keeps the record it has.
    """
    source, target = output_dir / COMMAND_CONFIG_DIR, output_dir / RUN_CONFIG_DIR
    if not source.is_dir() or (target.exists() and not fresh):
        return
    shutil.copytree(source, target, dirs_exist_ok=True)


def _resume_path(cfg: DictConfig, output_dir: Path) -> Path | None:
    """Return the checkpoint to resume from, or None for a fresh run.

    resume=true continues last.pt of the run dir and starts from scratch when there is none.
    resume=PATH continues that file. Raises ConfigError when the run would overwrite another run
    in the run dir.
    """
    last_path = output_dir / "last.pt"
    existing = [name for name in ("metrics.json", "last.pt", "best.pt")
                if (output_dir / name).exists()]
    resume = cfg.resume
    if resume in (None, False, "false"):
        if existing:
            raise ConfigError(
                f"run dir {output_dir} already contains a run ({', '.join(existing)}). Pass "
                "resume=true to continue it, or choose another hydra.run.dir"
            )
        return None
    if resume in (True, "true"):
        if last_path.exists():
            return last_path.resolve()
        if existing:
            raise ConfigError(
                f"resume=true but run dir {output_dir} contains {', '.join(existing)} and no "
                "last.pt to continue from. Choose another hydra.run.dir"
            )
        log.warning("resume=true but %s does not exist: starting from scratch", last_path)
        return None
    path = Path(to_absolute_path(str(resume))).expanduser().resolve()
    if path != last_path.resolve() and existing:
        raise ConfigError(
            f"resume={resume} would write into run dir {output_dir}, which already contains "
            f"another run ({', '.join(existing)}). Choose an empty hydra.run.dir"
        )
    return path


def _load_resumable(cfg: DictConfig, path: Path) -> dict[str, Any]:
    """Load a last.pt and check that it continues the configured run."""
    checkpoint = load_checkpoint(path, expected_model=cfg.model.name)
    current = OmegaConf.to_container(cfg, resolve=True)
    differences = config_differences(checkpoint.get("config", {}), current, RESUME_FREE_KEYS)
    if differences:
        listed = "; ".join(differences[:4]) + ("; ..." if len(differences) > 4 else "")
        raise ConfigError(
            f"cannot resume from {path}, because the run was started with another config "
            f"({listed}). To continue it, repeat the overrides in .hydra/overrides.yaml of its run "
            "dir. To train with the new values, start a new run with another hydra.run.dir. "
            f"Keys that may change on resume: {', '.join(RESUME_FREE_KEYS)}"
        )
    return checkpoint


def _ensure_best_checkpoint(checkpoint, resume_path: Path, best_path: Path, state) -> None:
    """Make best.pt in the run dir hold the best epoch recorded in the resumed state.

    It may be missing or older when the kill fell between the writes of last.pt and best.pt, or
    when resume=PATH points into another run dir.
    """
    best_epoch = state["best_epoch"]
    if best_epoch is None or _saved_epoch(best_path) == best_epoch:
        return
    if best_epoch == state["epoch"]:
        source_payload = checkpoint  # last.pt is the best epoch itself
    else:
        source = resume_path.with_name("best.pt")
        if _saved_epoch(source) != best_epoch:
            raise CheckpointError(
                f"cannot resume from {resume_path}: its best epoch {best_epoch} is not in "
                f"{source}. Resume from a run dir that contains both last.pt and best.pt"
            )
        source_payload = load_checkpoint(source)
    save_checkpoint(best_path, source_payload)
    log.info("wrote %s for epoch %d", best_path, best_epoch)


def _saved_epoch(path: Path) -> int | None:
    """Return the epoch stored in a training checkpoint, None when it is missing or unreadable."""
    if not path.exists():
        return None
    try:
        return load_checkpoint(path)["state"]["epoch"]
    except (CheckpointError, KeyError):
        return None


def _payload(cfg, method, state, order_generator, *, finished: bool) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "method": method.state_dict(),
        "state": dict(state),
        "order_generator": order_generator.get_state(),
        "rng": capture_rng_state(),
        "environment": environment_summary(),
        "finished": finished,
    }


def _restore(method, checkpoint, path, state, order_generator) -> None:
    try:
        method.load_state_dict(checkpoint["method"])
        state.update(checkpoint["state"])
        order_generator.set_state(checkpoint["order_generator"])
        restore_rng_state(checkpoint["rng"])
    except (KeyError, RuntimeError, ValueError, TypeError) as error:
        raise CheckpointError(
            f"checkpoint {path} does not match the configured model: {error}. Resume with the "
            "config the run was started with"
        ) from error


def _final_metrics(cfg, method, data, state, best_path) -> dict[str, Any]:
    """Load best.pt, score the test split once and assemble metrics.json."""
    best = load_checkpoint(best_path, expected_model=cfg.model.name)
    method.load_state_dict(best["method"], weights_only=True)
    test = evaluate_split(method, data, "test")
    metrics: dict[str, Any] = {
        "model": cfg.model.name,
        "seed": int(cfg.seed),
        "uses_digit_labels": method.uses_digit_labels,
        "best_epoch": state["best_epoch"],
        "best_val_mae": state["best_val_mae"],
        "epochs": state["epoch"],
        "nonfinite_steps": state["nonfinite_steps"],
        "train_lists": len(data.train_lists),
        "train_k": data.train_lists.k,
        "test_lists": {str(k): len(lists) for k, lists in data.test_lists.items()},
        "history": state["history"],
        "train_seconds": sum(entry["seconds"] for entry in state["history"]),
        "environment": environment_summary(),
        **test,
    }
    if cfg.model.name == "estinet":
        metrics["estimator_training"] = cfg.estimator.training
    return metrics
