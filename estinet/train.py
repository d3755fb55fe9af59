"""One training run of an image-addition model, start to finish: the story of train_addition.py.

Data and models move to the device once. Each epoch shuffles the training lists with a generator
seeded by `seed`, takes one step per batch, then scores the validation lists. The epoch with the
lowest validation MAE is saved as best.pt; test lists are scored only once, with best.pt, after
training. last.pt holds everything needed to resume after a kill, RNG states included.
"""

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from estinet.blackbox import make_black_box
from estinet.checkpoint import load_checkpoint, save_checkpoint, write_json
from estinet.data import AdditionData, build_addition_data
from estinet.errors import CheckpointError, ConfigError, EstinetError
from estinet.evaluation import digit_accuracy, evaluate_lists, split_probabilities, standard_error_of_mae
from estinet.methods import Method, build_method
from estinet.runtime import (
    capture_rng_state,
    environment_summary,
    resolve_device,
    restore_rng_state,
    seed_everything,
    set_threads,
)

log = logging.getLogger(__name__)

NONFINITE_POLICIES = ("skip", "stop")


class NonFiniteLossError(EstinetError, RuntimeError):
    """A non-finite loss or gradient under train.nonfinite=stop."""


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
    """Train the configured model, write best.pt, last.pt and metrics.json, return the metrics."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = output_dir / "metrics.json"
    last_path, best_path = output_dir / "last.pt", output_dir / "best.pt"
    model_name = cfg.model.name

    resume_path = _resume_path(cfg, last_path)
    if resume_path is None and metrics_path.exists():
        raise ConfigError(
            f"{output_dir} already holds a finished run (metrics.json). Choose another "
            "hydra.run.dir, or pass resume=true to continue the run stored there"
        )

    set_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
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
    checkpoint = None
    if resume_path is not None:
        checkpoint = load_checkpoint(resume_path, expected_model=model_name)
        if checkpoint.get("finished") and metrics_path.exists():
            log.info("run in %s is already complete (metrics.json); nothing to do", output_dir)
            return _read_json(metrics_path)

    method = build_method(cfg, black_box, device, epochs * per_epoch,
                          initialize_estimator=checkpoint is None)
    if checkpoint is not None:
        _restore(method, checkpoint, resume_path, state, order_generator)
        log.info("resumed from %s after epoch %d", resume_path, state["epoch"])

    for epoch in range(state["epoch"], epochs):
        started = time.perf_counter()
        method.set_epoch(epoch)
        method.train()
        losses, skipped = [], 0
        rows_iter = data.train_lists.batches(batch_size, generator=order_generator, shuffle=True)
        bar = tqdm(rows_iter, total=per_epoch, desc=f"epoch {epoch + 1}/{epochs}",
                   disable=not progress, leave=False, mininterval=1.0)
        for step, rows in enumerate(bar):
            images, sums = data.train_lists.batch(rows)
            labels = data.train_lists.digit_labels(rows) if method.uses_digit_labels else None
            result = method.train_step(images, sums, labels)
            if result.skipped:
                skipped += 1
                if cfg.train.nonfinite == "stop":
                    raise NonFiniteLossError(
                        f"non-finite loss or gradient at epoch {epoch + 1}, step {step + 1} "
                        f"(loss={result.loss}). The weights of the last finite step are kept in "
                        f"{last_path}. Lower train.lr or set train.nonfinite=skip"
                    )
                continue
            losses.append(result.loss)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{result.loss:.3f}")

        val = evaluate_split(method, data, "val")
        val_k = data.val_lists.k
        entry = {
            "epoch": epoch + 1,
            "train_loss": sum(losses) / max(1, len(losses)),
            "val_mae": val[f"val_mae_k{val_k}"],
            "val_exact": val[f"val_exact_k{val_k}"],
            "val_digit_accuracy": val["val_digit_accuracy"],
            "lists_seen": (epoch + 1) * per_epoch * batch_size,
            "skipped_steps": skipped,
            "seconds": time.perf_counter() - started,
        }
        if f"val_estimator_mae_k{val_k}" in val:
            entry["val_estimator_mae"] = val[f"val_estimator_mae_k{val_k}"]
        state["history"].append(entry)
        state["nonfinite_steps"] += skipped
        state["epoch"] = epoch + 1

        improved = entry["val_mae"] < state["best_val_mae"]
        if improved:
            state["best_val_mae"], state["best_epoch"] = entry["val_mae"], epoch + 1
        payload = _payload(cfg, method, state, order_generator, finished=epoch + 1 == epochs)
        if improved:
            save_checkpoint(best_path, payload)
        save_checkpoint(last_path, payload)
        log.info(
            "epoch %d/%d  train loss %.4f  val MAE %.3f  val exact %.3f  val digit acc %.4f  "
            "skipped %d  %.1fs%s",
            epoch + 1, epochs, entry["train_loss"], entry["val_mae"], entry["val_exact"],
            entry["val_digit_accuracy"], skipped, entry["seconds"], "  (best)" if improved else "",
        )

    metrics = _final_metrics(cfg, method, data, state, best_path)
    write_json(metrics_path, metrics)
    log.info(
        "test: %s",
        "  ".join(f"{key} {value:.4f}" for key, value in metrics.items()
                  if key.startswith("test_") and isinstance(value, float)),
    )
    return metrics


def _resume_path(cfg: DictConfig, last_path: Path) -> Path | None:
    """Checkpoint to resume from: None, last.pt of this run dir (resume=true) or a given path."""
    resume = cfg.resume
    if resume in (None, False, "false"):
        return None
    if resume in (True, "true"):
        if not last_path.exists():
            log.warning("resume=true but %s does not exist: starting from scratch", last_path)
            return None
        return last_path
    return Path(str(resume)).expanduser()


def _payload(cfg, method, state, order_generator, *, finished: bool) -> dict[str, Any]:
    return {
        "model": cfg.model.name,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "method": method.state_dict(),
        "state": dict(state),
        "order_generator": order_generator.get_state(),
        "rng": capture_rng_state(),
        "finished": finished,
    }


def _restore(method, checkpoint, path, state, order_generator) -> None:
    try:
        method.load_state_dict(checkpoint["method"])
    except (KeyError, RuntimeError, ValueError) as error:
        raise CheckpointError(
            f"checkpoint {path} does not match the configured model: {error}. Resume with the "
            "config the run was started with"
        ) from error
    state.update(checkpoint["state"])
    order_generator.set_state(checkpoint["order_generator"])
    restore_rng_state(checkpoint["rng"])


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


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
