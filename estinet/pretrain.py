"""Offline training of the black-box estimator on synthetic digit vectors labelled by the black box.

The training lists resemble the argument extractor's outputs during EstiNet training: k 10-d
digit vectors that are one-hot digits or softmax distributions of any sharpness. Every training
target comes from calling the black box itself, so the same code trains an estimator for any
registered black box.

Soft lists have two labelling modes (PretrainConfig.soft_targets):
- "monte_carlo": the mean black-box output over `mc_samples` digit lists drawn from the
  distributions, a Monte-Carlo estimate of the expected output. The estimator then varies
  smoothly with the probabilities, which gives the argument extractor a useful gradient.
- "argmax": the black-box output of the argmax digits. The target is then piecewise constant
  in the probabilities.
One-hot lists are labelled by the black box directly in both modes.
"""

import logging
import math
import os
import pickle
import time
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

from estinet.blackbox import BlackBox, make_black_box
from estinet.checkpoint import atomic_torch_save, write_json
from estinet.errors import CheckpointError, ConfigError
from estinet.models.estimator import BlackBoxEstimator, EstimatorConfig
from estinet.runtime import environment_summary
from estinet.structured import build_structured

log = logging.getLogger(__name__)

SOFT_TARGET_MODES = ("monte_carlo", "argmax")
LOSSES = ("mse", "l1")
CHECKPOINT_KIND = "estinet.black_box_estimator"
CHECKPOINT_FORMAT_VERSION = 1
# Estimator settings that only shape the initial weights: a checkpoint trained with another value
# still has the configured architecture, so loading it does not compare them.
INIT_ONLY_KEYS = frozenset({"forget_bias"})
MC_CHUNK_SAMPLES = 256  # Monte-Carlo samples per black-box call, to bound memory for large counts


@dataclass
class PretrainConfig:
    """Settings of offline estimator training (conf/pretrain/*.yaml)."""

    steps: int = 6000
    batch_size: int = 64
    lr: float = 1e-2  # Adam learning rate at step 0, decayed to min_lr by a cosine schedule
    min_lr: float = 0.0
    grad_clip: float = 1.0  # maximum global gradient norm
    loss: str = "mse"  # "mse" or "l1"

    # Training lists: k is drawn uniformly from [min_length, max_length] once per batch.
    min_length: int = 1
    max_length: int = 20
    one_hot_fraction: float = 0.3  # probability that a whole list is one-hot digits
    element_one_hot_fraction: float = 0.2  # probability that an element of a soft list is one-hot
    temperature_min: float = 0.1  # soft vectors are softmax(N(0, 1) logits / T), T log-uniform
    temperature_max: float = 10.0

    soft_targets: str = "monte_carlo"  # "monte_carlo" or "argmax"
    mc_samples: int = 64  # digit lists drawn per soft training list in monte_carlo mode

    # Held-out evaluation, rebuilt identically from eval_seed in every run.
    eval_every: int = 1000  # steps between evaluations (and log lines)
    eval_size: int = 1000  # lists per held-out set
    eval_mc_samples: int = 16384  # Monte-Carlo samples behind each soft reference value
    eval_seed: int = 12345

    def __post_init__(self) -> None:
        for name in (
            "steps",
            "batch_size",
            "min_length",
            "mc_samples",
            "eval_every",
            "eval_size",
            "eval_mc_samples",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"pretrain.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_length < self.min_length:
            raise ConfigError(
                f"pretrain.max_length ({self.max_length}) must be >= pretrain.min_length "
                f"({self.min_length})"
            )
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"pretrain.lr must be positive and pretrain.min_lr in [0, lr], "
                f"got lr={self.lr}, min_lr={self.min_lr}"
            )
        if not self.grad_clip > 0:
            raise ConfigError(f"pretrain.grad_clip must be positive, got {self.grad_clip}")
        for name in ("one_hot_fraction", "element_one_hot_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"pretrain.{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.temperature_min <= self.temperature_max:
            raise ConfigError(
                f"pretrain temperatures must satisfy 0 < temperature_min <= temperature_max, "
                f"got {self.temperature_min} and {self.temperature_max}"
            )
        if self.soft_targets not in SOFT_TARGET_MODES:
            raise ConfigError(
                f"pretrain.soft_targets must be one of {', '.join(SOFT_TARGET_MODES)}, "
                f"got {self.soft_targets!r}"
            )
        if self.loss not in LOSSES:
            raise ConfigError(
                f"pretrain.loss must be one of {', '.join(LOSSES)}, got {self.loss!r}"
            )

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "PretrainConfig":
        """Build the config from a mapping or DictConfig, raising ConfigError for invalid keys."""
        return build_structured(cls, cfg, "pretrain")


# ------------------------------------------------------------------------- synthetic digit vectors


def sample_digit_vectors(
    batch_size: int,
    length: int,
    cfg: PretrainConfig,
    *,
    num_classes: int,
    generator: torch.Generator,
    one_hot_fraction: float | None = None,
) -> torch.Tensor:
    """Draw a batch of digit-vector lists (batch_size, length, num_classes) on the CPU.

    A list is all one-hot digits with probability `one_hot_fraction` (cfg.one_hot_fraction unless
    given). Otherwise each element is softmax(z / T) with z ~ N(0, I). The temperature T is drawn
    once per list, log-uniform in [cfg.temperature_min, cfg.temperature_max]. A list is then
    uniformly vague or uniformly sharp, as an extractor's outputs are early or late in training.
    Finally each element of a soft list becomes a one-hot digit with probability
    cfg.element_one_hot_fraction, which imitates an extractor that is sure of some images only.
    """
    if one_hot_fraction is None:
        one_hot_fraction = cfg.one_hot_fraction
    shape = (batch_size, length, num_classes)

    log_t_min, log_t_max = math.log(cfg.temperature_min), math.log(cfg.temperature_max)
    uniform = torch.rand(batch_size, 1, 1, generator=generator)
    temperature = torch.exp(log_t_min + (log_t_max - log_t_min) * uniform)  # (B, 1, 1)
    logits = torch.randn(shape, generator=generator) / temperature
    vectors = torch.softmax(logits, dim=-1)  # (B, k, C)

    digits = torch.randint(num_classes, (batch_size, length), generator=generator)
    one_hot = F.one_hot(digits, num_classes).float()  # (B, k, C)
    one_hot_lists = torch.rand(batch_size, 1, generator=generator) < one_hot_fraction  # (B, 1)
    element_draws = torch.rand(batch_size, length, generator=generator)
    one_hot_elements = element_draws < cfg.element_one_hot_fraction  # (B, k)
    use_one_hot = (one_hot_lists | one_hot_elements).unsqueeze(-1)  # (B, k, 1)
    return torch.where(use_one_hot, one_hot, vectors)


def is_one_hot(vectors: torch.Tensor) -> torch.Tensor:
    """Return a bool mask (B,) of the lists (B, k, C) made only of exact one-hot vectors."""
    zero_or_one = ((vectors == 0) | (vectors == 1)).all(-1)  # (B, k)
    return (zero_or_one & (vectors.sum(-1) == 1)).all(-1)


def monte_carlo_black_box(
    vectors: torch.Tensor,
    black_box: BlackBox,
    num_samples: int,
    *,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Estimate the expected black-box output of each list of digit distributions (B, k, C).

    Draws `num_samples` digit lists per list, independently per element, calls the black box on
    them and returns the mean (B,) and its standard error (B,), both float32.
    """
    batch_size, length, num_classes = vectors.shape
    probabilities = vectors.reshape(batch_size * length, num_classes).cpu().double()
    total = torch.zeros(batch_size, dtype=torch.float64)
    total_squares = torch.zeros(batch_size, dtype=torch.float64)

    for start in range(0, num_samples, MC_CHUNK_SAMPLES):
        chunk = min(MC_CHUNK_SAMPLES, num_samples - start)
        digits = torch.multinomial(probabilities, chunk, replacement=True, generator=generator)
        digits = digits.view(batch_size, length, chunk).permute(2, 0, 1)  # (S, B, k)
        outputs = black_box(digits.reshape(chunk * batch_size, length))  # (S * B,)
        outputs = outputs.double().view(chunk, batch_size)  # (S, B)
        total += outputs.sum(0)
        total_squares += outputs.square().sum(0)

    mean = total / num_samples
    # Unbiased sample variance, clamped because rounding can make the difference slightly negative.
    variance = (total_squares / num_samples - mean.square()).clamp(min=0)
    variance = variance * num_samples / max(num_samples - 1, 1)
    standard_error = (variance / num_samples).sqrt()
    return mean.float(), standard_error.float()


def label_digit_vectors(
    vectors: torch.Tensor,
    black_box: BlackBox,
    *,
    soft_targets: str,
    mc_samples: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Label digit-vector lists (B, k, C) with float32 targets (B,) obtained from the black box.

    One-hot lists get the black-box output of their digits. Other lists get the Monte-Carlo
    expectation (soft_targets="monte_carlo") or the output of their argmax digits ("argmax").
    The targets are on the device of `vectors` and carry no gradient. `generator` is a CPU
    generator because sampling runs on the CPU.
    """
    if soft_targets not in SOFT_TARGET_MODES:
        raise ConfigError(
            f"soft_targets must be one of {', '.join(SOFT_TARGET_MODES)}, got {soft_targets!r}"
        )
    device = vectors.device
    vectors = vectors.detach().cpu()
    targets = black_box(vectors.argmax(-1)).float()  # exact for one-hot lists and for argmax mode
    if soft_targets == "monte_carlo":
        soft = ~is_one_hot(vectors)
        if soft.any():
            expected, _ = monte_carlo_black_box(
                vectors[soft], black_box, mc_samples, generator=generator
            )
            targets[soft] = expected
    return targets.to(device)


def labelled_digit_vector_batches(
    cfg: PretrainConfig,
    black_box: BlackBox,
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield training batches forever: digit vectors (B, k, C) and black-box targets (B,).

    Both go to `device`. k is drawn uniformly from [cfg.min_length, cfg.max_length] per batch.
    """
    while True:
        length = int(torch.randint(cfg.min_length, cfg.max_length + 1, (1,), generator=generator))
        vectors = sample_digit_vectors(
            cfg.batch_size, length, cfg, num_classes=black_box.num_classes, generator=generator
        )
        targets = label_digit_vectors(
            vectors,
            black_box,
            soft_targets=cfg.soft_targets,
            mc_samples=cfg.mc_samples,
            generator=generator,
        )
        yield vectors.to(device), targets.to(device)


# --------------------------------------------------------------------------- evaluation


@dataclass
class HeldOutSets:
    """Fixed evaluation lists and their black-box references, all on the CPU.

    The soft lists have two references: the Monte-Carlo expected black-box output (with its
    standard error) and the black-box output of the argmax digits.
    """

    one_hot_k10: tuple[torch.Tensor, torch.Tensor]
    one_hot_k100: tuple[torch.Tensor, torch.Tensor]
    soft_k10: tuple[torch.Tensor, torch.Tensor]
    soft_argmax_targets_k10: torch.Tensor
    soft_reference_stderr_k10: torch.Tensor


def make_held_out_sets(black_box: BlackBox, cfg: PretrainConfig) -> HeldOutSets:
    """Build the held-out lists from cfg.eval_seed, cfg.eval_size and cfg.eval_mc_samples.

    The soft lists follow the default PretrainConfig distribution whatever the training
    distribution is, so that runs with different training settings are scored on the same lists.
    """
    generator = torch.Generator().manual_seed(cfg.eval_seed)
    distribution = PretrainConfig()
    num_classes = black_box.num_classes
    size = cfg.eval_size

    def one_hot_set(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = sample_digit_vectors(
            size,
            length,
            distribution,
            num_classes=num_classes,
            generator=generator,
            one_hot_fraction=1.0,
        )
        return vectors, black_box(vectors.argmax(-1)).float()

    one_hot_k10 = one_hot_set(10)
    one_hot_k100 = one_hot_set(100)
    soft_vectors = sample_digit_vectors(
        size, 10, distribution, num_classes=num_classes, generator=generator, one_hot_fraction=0.0
    )
    soft_expected, soft_stderr = monte_carlo_black_box(
        soft_vectors, black_box, cfg.eval_mc_samples, generator=generator
    )
    return HeldOutSets(
        one_hot_k10=one_hot_k10,
        one_hot_k100=one_hot_k100,
        soft_k10=(soft_vectors, soft_expected),
        soft_argmax_targets_k10=black_box(soft_vectors.argmax(-1)).float(),
        soft_reference_stderr_k10=soft_stderr,
    )


@torch.no_grad()
def _predict(
    estimator: BlackBoxEstimator, vectors: torch.Tensor, batch_size: int = 1000
) -> torch.Tensor:
    device = next(estimator.parameters()).device
    predictions = []
    for chunk in vectors.split(batch_size):
        predictions.append(estimator(chunk.to(device)).float().cpu())
    return torch.cat(predictions)


def evaluate_estimator(
    estimator: BlackBoxEstimator,
    black_box: BlackBox,
    held_out: HeldOutSets | None = None,
    *,
    cfg: PretrainConfig | None = None,
) -> dict[str, float]:
    """Measure the estimator's mean absolute error against the black box on the held-out lists.

    Builds the held-out sets from `cfg` (default PretrainConfig()) unless `held_out` is given.
    Returns one_hot_mae_k10, one_hot_mae_k100, soft_mae_k10 (against the Monte-Carlo expected
    output), soft_argmax_mae_k10 (against the output of the argmax digits) and
    soft_reference_stderr_k10 (mean standard error of the Monte-Carlo reference, a noise floor).
    """
    if held_out is None:
        held_out = make_held_out_sets(black_box, cfg or PretrainConfig())
    was_training = estimator.training
    estimator.eval()

    def mae(vectors: torch.Tensor, targets: torch.Tensor) -> float:
        return float((_predict(estimator, vectors) - targets).abs().mean())

    soft_vectors, soft_expected = held_out.soft_k10
    metrics = {
        "one_hot_mae_k10": mae(*held_out.one_hot_k10),
        "one_hot_mae_k100": mae(*held_out.one_hot_k100),
        "soft_mae_k10": mae(soft_vectors, soft_expected),
        "soft_argmax_mae_k10": mae(soft_vectors, held_out.soft_argmax_targets_k10),
        "soft_reference_stderr_k10": float(held_out.soft_reference_stderr_k10.mean()),
    }
    estimator.train(was_training)
    return metrics


# --------------------------------------------------------------------------- training


def pretrain_estimator(
    estimator_cfg: EstimatorConfig,
    pretrain_cfg: PretrainConfig,
    black_box: BlackBox,
    *,
    device: torch.device | str,
    seed: int,
    progress: bool = True,
) -> tuple[BlackBoxEstimator, dict[str, Any]]:
    """Train a new estimator to imitate `black_box` and return it with its final metrics.

    The metrics are those of evaluate_estimator plus steps, seconds, nonfinite_steps (steps
    skipped because the loss or the gradient norm was not finite) and the mean training loss over
    the first and the last tenth of the steps.
    """
    if estimator_cfg.input_size != black_box.num_classes:
        raise ConfigError(
            f"estimator.input_size ({estimator_cfg.input_size}) must equal the number of classes "
            f"of black box {black_box.name!r} ({black_box.num_classes})"
        )
    start_time = time.perf_counter()
    torch.manual_seed(seed)
    estimator = BlackBoxEstimator(estimator_cfg).to(device)
    optimizer = torch.optim.Adam(estimator.parameters(), lr=pretrain_cfg.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=pretrain_cfg.steps, eta_min=pretrain_cfg.min_lr
    )
    loss_function = F.mse_loss if pretrain_cfg.loss == "mse" else F.l1_loss
    batches = labelled_digit_vector_batches(
        pretrain_cfg, black_box, generator=torch.Generator().manual_seed(seed), device=device
    )
    held_out = make_held_out_sets(black_box, pretrain_cfg)

    window = max(1, pretrain_cfg.steps // 10)
    losses: list[float] = []
    nonfinite_steps = 0
    bar = tqdm(
        range(1, pretrain_cfg.steps + 1), desc="pretrain estimator", disable=not progress,
        mininterval=1.0,
    )
    for step in bar:
        vectors, targets = next(batches)
        loss = loss_function(estimator(vectors), targets)
        optimizer.zero_grad(set_to_none=True)
        finite = bool(torch.isfinite(loss))
        if finite:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(
                estimator.parameters(), pretrain_cfg.grad_clip
            )
            finite = bool(torch.isfinite(grad_norm))
        if finite:
            optimizer.step()
            losses.append(loss.item())
            # refresh=False: the postfix is shown at the bar's next redraw, which mininterval
            # limits to one a second, instead of forcing a redraw on every step.
            bar.set_postfix(loss=f"{losses[-1]:.3g}", k=vectors.shape[1], refresh=False)
        else:
            # Skip the update but keep the learning-rate schedule on time.
            nonfinite_steps += 1
            optimizer.zero_grad(set_to_none=True)
            if nonfinite_steps == 1:
                log.warning(
                    "step %d: non-finite loss or gradient, skipping the step (counted "
                    "in nonfinite_steps, logged only once)",
                    step,
                )
        scheduler.step()

        if step % pretrain_cfg.eval_every == 0 or step == pretrain_cfg.steps:
            metrics = evaluate_estimator(estimator, black_box, held_out)
            recent = losses[-pretrain_cfg.eval_every :]
            log.info(
                "step %d/%d: train loss %.4g, one-hot MAE k=10 %.3f, k=100 %.3f, "
                "soft MAE k=10 %.3f (argmax %.3f), non-finite steps %d",
                step,
                pretrain_cfg.steps,
                sum(recent) / max(len(recent), 1),
                metrics["one_hot_mae_k10"],
                metrics["one_hot_mae_k100"],
                metrics["soft_mae_k10"],
                metrics["soft_argmax_mae_k10"],
                nonfinite_steps,
            )

    metrics.update(
        steps=pretrain_cfg.steps,
        seconds=time.perf_counter() - start_time,
        nonfinite_steps=nonfinite_steps,
        train_loss_first=sum(losses[:window]) / max(len(losses[:window]), 1),
        train_loss_last=sum(losses[-window:]) / max(len(losses[-window:]), 1),
    )
    return estimator, metrics


# --------------------------------------------------------------------------- checkpoints


def save_estimator(
    path: str | os.PathLike, estimator: BlackBoxEstimator, black_box_name: str
) -> None:
    """Write the estimator's weights, config and black-box name to `path` (atomically)."""
    path = Path(path)
    checkpoint = {
        "kind": CHECKPOINT_KIND,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "black_box": black_box_name,
        "estimator_config": estimator.config.to_dict(),
        "state_dict": {name: tensor.cpu() for name, tensor in estimator.state_dict().items()},
    }
    atomic_torch_save(path, checkpoint)


def load_estimator(
    path: str | os.PathLike,
    *,
    map_location: torch.device | str = "cpu",
    expected_config: EstimatorConfig | Mapping[str, Any] | None = None,
    expected_black_box: str | None = None,
) -> BlackBoxEstimator:
    """Rebuild an estimator saved by save_estimator, on `map_location`, in training mode.

    Raises CheckpointError naming the file when it is missing, unreadable (truncated or corrupt),
    not an estimator checkpoint, or built for another architecture than `expected_config` or
    another black box than `expected_black_box`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"estimator checkpoint {path} not found. Run pretrain_estimator.py to create one"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        # torch 2.14 reports a complete torch.save file with objects other than tensors, such as
        # a training last.pt, as an "Unsupported global" inside a readable zip archive.
        if not (zipfile.is_zipfile(path) and "Unsupported global" in str(error)):
            raise CheckpointError(
                f"failed to read estimator checkpoint {path}: {error}. The file may be truncated "
                "or corrupt. Run pretrain_estimator.py again to recreate it"
            ) from error
        raise CheckpointError(
            f"{path} is not an estimator checkpoint: it contains Python objects besides tensors "
            "(a training checkpoint such as last.pt?). Pass the estimator.pt that "
            "pretrain_estimator.py writes"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(
            f"failed to read estimator checkpoint {path}: {error}. The file may be truncated or "
            "corrupt. Run pretrain_estimator.py again to recreate it"
        ) from error

    if not isinstance(checkpoint, dict) or checkpoint.get("kind") != CHECKPOINT_KIND:
        if isinstance(checkpoint, dict):
            found = f"a dict with keys {sorted(map(str, checkpoint))[:8]}"
        else:
            found = type(checkpoint).__name__
        raise CheckpointError(
            f"{path} is not an estimator checkpoint: expected a dict with "
            f"kind={CHECKPOINT_KIND!r}, found {found}"
        )
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"estimator checkpoint {path} has format version {checkpoint.get('format_version')!r}, "
            f"but this code reads version {CHECKPOINT_FORMAT_VERSION}. Run pretrain_estimator.py "
            "again to recreate it"
        )
    try:
        config = EstimatorConfig.from_config(checkpoint["estimator_config"])
    except (KeyError, ConfigError) as error:
        raise CheckpointError(
            f"estimator checkpoint {path} has an invalid estimator config: {error}"
        ) from error

    if expected_config is not None:
        if not isinstance(expected_config, EstimatorConfig):
            expected_config = EstimatorConfig.from_config(expected_config)
        saved, expected = config.to_dict(), expected_config.to_dict()
        differences = [
            f"{key}={saved[key]} (expected {expected[key]})"
            for key in saved
            if key not in INIT_ONLY_KEYS and saved[key] != expected[key]
        ]
        if differences:
            raise CheckpointError(
                f"estimator checkpoint {path} does not match the configured estimator: "
                f"{', '.join(differences)}"
            )
    if expected_black_box is not None and checkpoint.get("black_box") != expected_black_box:
        raise CheckpointError(
            f"estimator checkpoint {path} imitates black box {checkpoint.get('black_box')!r}, "
            f"expected {expected_black_box!r}"
        )

    estimator = BlackBoxEstimator(config)
    try:
        estimator.load_state_dict(checkpoint["state_dict"])
    except (KeyError, RuntimeError) as error:
        raise CheckpointError(
            f"estimator checkpoint {path} has invalid weights: {error}"
        ) from error
    return estimator.to(map_location)


# --------------------------------------------------------------------------- Hydra run


def _estimator_architecture(estimator_group: Mapping[str, Any]) -> EstimatorConfig:
    """Build the EstimatorConfig from the `estimator` config group, without its other keys.

    The group also contains keys for how EstiNet training uses the estimator (such as
    `training` or `checkpoint`), which pretraining does not need. Keys that conf/estimator/ does
    not define are rejected earlier, by validate_pretrain_config.
    """
    values = OmegaConf.to_container(OmegaConf.create(estimator_group), resolve=True)
    architecture_keys = {field.name for field in fields(EstimatorConfig)}
    unused = sorted(set(values) - architecture_keys)
    if unused:
        log.info("estimator keys not used by pretraining: %s", ", ".join(unused))
    return EstimatorConfig.from_config({key: values[key] for key in values if key not in unused})


def run_pretraining(
    cfg: Mapping[str, Any], output_dir: str | os.PathLike, *, progress: bool | None = None
) -> dict[str, Any]:
    """Pretrain an estimator from a composed pretrain.yaml config and write its run files.

    Writes `estimator.pt` (see save_estimator) and `metrics.json` into `output_dir` and returns
    the metrics. `progress` turns the tqdm bar on or off, and None takes the config's `progress`
    key.
    """
    if progress is None:
        progress = bool(cfg.get("progress", True))
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg["num_threads"]))
    estimator_cfg = _estimator_architecture(cfg["estimator"])
    pretrain_cfg = PretrainConfig.from_config(cfg["pretrain"])
    black_box = make_black_box(cfg["black_box"])
    log.info(
        "pretraining an estimator of black box %r for %d steps (soft targets: %s) into %s",
        black_box.name,
        pretrain_cfg.steps,
        pretrain_cfg.soft_targets,
        output_dir,
    )

    estimator, metrics = pretrain_estimator(
        estimator_cfg,
        pretrain_cfg,
        black_box,
        device=cfg["device"],
        seed=cfg["seed"],
        progress=progress,
    )
    metrics = {
        "black_box": black_box.name,
        "soft_targets": pretrain_cfg.soft_targets,
        **metrics,
        "environment": environment_summary(),
    }
    save_estimator(output_dir / "estimator.pt", estimator, black_box.name)
    write_json(output_dir / "metrics.json", metrics)
    log.info(
        "wrote %s and %s (%.0f s)",
        output_dir / "estimator.pt",
        output_dir / "metrics.json",
        metrics["seconds"],
    )
    return metrics
