"""Validation of composed configs, run by the entry points before any data or model is built.

Hydra rejects overrides of keys that the config does not define, unless they start with `+`.
The first check also rejects such added keys, so every key must be one that the shipped conf/
files define (estinet.config_keys). The other checks cover the values: types, ranges, known
names, devices and file paths. Each raises ConfigError with one line that names the key, the
value, what is allowed and an example of a valid override. Groups that have their own validating
dataclass (data, extractor, estimator, pretrain) are checked by it.
"""

import logging
import math
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from estinet.blackbox import BLACK_BOXES
from estinet.config_keys import find_unknown_keys
from estinet.data.lists import check_data_config
from estinet.errors import ConfigError
from estinet.methods import ESTIMATOR_MODES, LOSSES, METHODS, estimator_architecture
from estinet.models.extractor import ExtractorConfig
from estinet.pretrain import PretrainConfig, load_estimator
from estinet.runtime import resolve_device

log = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
NONFINITE_POLICIES = ("skip", "stop")
ONLINE_TARGETS = ("monte_carlo", "argmax")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
# Adam's first step is lr / (1 - beta1) = 10 lr, applied in float32; torch 2.14 raises a
# RuntimeError when that overflows, so larger learning rates are rejected here with a clear message.
MAX_LEARNING_RATE = torch.finfo(torch.float32).max * (1 - 0.9)
LEARNING_RATES = f"a number in (0, {MAX_LEARNING_RATE:.1e}]"
_ABSENT = object()


def validate_train_config(cfg: DictConfig) -> None:
    """Check a composed train.yaml config, raising ConfigError for the first invalid value."""
    cfg = _as_config(cfg)
    _check_known_keys(cfg, "train")
    _check_process_keys(cfg)
    resume = _require(cfg, "resume", _is_resume_value, "true, false or a last.pt path", "true")
    if resume not in ("true", "false"):
        _check_existing_file(cfg, "resume", "Pass resume=true to continue the run in the run dir")
    _require(cfg, "deterministic", _is_bool, "true or false", "true")

    _require(cfg, "train.epochs", _positive_int, "an integer >= 1", "10")
    batch_size = _require(cfg, "train.batch_size", _positive_int, "an integer >= 1", "32")
    _require(cfg, "train.lr", _learning_rate, LEARNING_RATES, "3e-3")
    _require_choice(cfg, "train.schedule", SCHEDULES)
    _require(cfg, "train.warmup_fraction", _fraction_below_one, "a number in [0, 1)", "0.02")
    _require(cfg, "train.min_lr_factor", _fraction, "a number in [0, 1]", "0.0")
    _require(cfg, "train.grad_clip", _optional_non_negative, "a number >= 0 or null", "5.0")
    _require_choice(cfg, "train.nonfinite", NONFINITE_POLICIES)
    _require(cfg, "train.progress", _is_bool, "true or false", "false")

    _build("data", check_data_config, _value(cfg, "data"))
    train_lists = _value(cfg, "data.train.num_lists")
    if train_lists < batch_size:
        raise ConfigError(
            f"data.train.num_lists={train_lists} is invalid: expected at least "
            f"train.batch_size={batch_size} lists, for example data.train.num_lists={batch_size} "
            f"or a smaller train.batch_size"
        )

    extractor = _build("extractor", ExtractorConfig.from_config, _value(cfg, "extractor"))
    estimator = _build("estimator", estimator_architecture, _value(cfg, "estimator"))
    _build("pretrain", PretrainConfig.from_config, _value(cfg, "pretrain"))
    _check_class_counts(cfg, extractor.num_classes, estimator.input_size)
    _check_model(cfg)


def validate_pretrain_config(cfg: DictConfig) -> None:
    """Check a composed pretrain.yaml config, raising ConfigError for the first invalid value."""
    cfg = _as_config(cfg)
    _check_known_keys(cfg, "pretrain")
    _check_process_keys(cfg)
    _require(cfg, "progress", _is_bool, "true or false", "false")
    estimator = _build("estimator", estimator_architecture, _value(cfg, "estimator"))
    _build("pretrain", PretrainConfig.from_config, _value(cfg, "pretrain"))
    _check_class_counts(cfg, None, estimator.input_size)


# --------------------------------------------------------------------------- groups


def _check_known_keys(cfg: DictConfig, config_name: str) -> None:
    """Reject the first key that conf/<config_name>.yaml and its selected options do not define."""
    unknown = find_unknown_keys(cfg, config_name)
    if not unknown:
        return
    first = unknown[0]
    where = f"the {first.parent} config" if first.parent else "the config"
    value = _show(first.value)
    if first.closest is not None:
        raise ConfigError(
            f"{first.key} is not a key of {where}. Did you mean {first.closest}? Use "
            f"{first.closest}={value} instead of +{first.key}={value}"
        )
    if first.defined_by:
        raise ConfigError(
            f"{first.key} is not a key of {where}. Only {' and '.join(first.defined_by)} "
            f"defines it, so select that option or remove the +{first.key} override"
        )
    raise ConfigError(
        f"{first.key} is not a key of {where}, and no known key is close to it. Remove the "
        f"+{first.key} override (keys of {where}: {', '.join(first.siblings)})"
    )


def _check_process_keys(cfg: DictConfig) -> None:
    """Check the root keys shared by train.yaml and pretrain.yaml."""
    _require(cfg, "seed", _non_negative_int, "an integer >= 0", "0")
    _require(cfg, "device", _is_device, "auto, cpu, cuda or cuda:N", "cpu")
    resolve_device(cfg.device)  # raises when the device is well formed but does not exist here
    _require(cfg, "num_threads", _optional_positive_int, "an integer >= 1 or null", "1")
    _require_choice(cfg, "black_box", tuple(BLACK_BOXES))


def _check_class_counts(cfg: DictConfig, extractor_classes: int | None, input_size: int) -> None:
    black_box_classes = BLACK_BOXES[cfg.black_box].num_classes
    if input_size != black_box_classes:
        raise ConfigError(
            f"estimator.input_size={input_size} is invalid: black box {cfg.black_box} takes "
            f"arguments in [0, {black_box_classes}), so use "
            f"estimator.input_size={black_box_classes}"
        )
    if extractor_classes is not None and extractor_classes != black_box_classes:
        raise ConfigError(
            f"extractor.num_classes={extractor_classes} is invalid: black box {cfg.black_box} "
            f"takes arguments in [0, {black_box_classes}), so use "
            f"extractor.num_classes={black_box_classes}"
        )


def _check_model(cfg: DictConfig) -> None:
    name = _require_choice(cfg, "model.name", tuple(METHODS), example_key="model")
    if OmegaConf.select(cfg, "model.loss", default=_ABSENT) is not _ABSENT:
        _require_choice(cfg, "model.loss", tuple(LOSSES))
    check = MODEL_CHECKS.get(name)
    if check is not None:
        check(cfg)


def _check_estinet(cfg: DictConfig) -> None:
    _require(cfg, "model.entropy_weight", _is_finite_number, "a finite number", "0.0")
    _require(cfg, "model.entropy_start_epoch", _non_negative_int, "an integer >= 0", "0")
    _require(cfg, "model.entropy_ramp_epochs", _non_negative_int, "an integer >= 0", "0")
    _require(cfg, "model.marginal_weight", _non_negative_number, "a number >= 0", "0.0")

    mode = _require_choice(cfg, "estimator.training", ESTIMATOR_MODES)
    _require(cfg, "estimator.lr", _learning_rate, LEARNING_RATES, "1e-3")
    _require_choice(cfg, "estimator.online_targets", ONLINE_TARGETS)
    _require(cfg, "estimator.online_mc_samples", _positive_int, "an integer >= 1", "32")
    _require(cfg, "estimator.checkpoint", _is_optional_path, "null or a file path", "null")
    checkpoint = _check_existing_file(
        cfg,
        "estimator.checkpoint",
        "Create one with pretrain_estimator.py, or pass estimator.checkpoint=null to pretrain "
        "the estimator in-process",
    )
    if checkpoint is None:
        return
    if mode == "online":
        log.warning(
            "estimator.checkpoint=%s is ignored because estimator.training=online trains the "
            "estimator from scratch; use estimator.training=hybrid to start from it",
            checkpoint,
        )
        return
    # Loading the small estimator file here reports an incompatible one before any data loads.
    load_estimator(
        checkpoint,
        expected_config=estimator_architecture(cfg.estimator),
        expected_black_box=cfg.black_box,
    )


# Checks of the keys that only one model reads, by model.name. A model without an entry has only
# its name and `loss` checked.
MODEL_CHECKS: dict[str, Callable[[DictConfig], None]] = {"estinet": _check_estinet}


# --------------------------------------------------------------------------- helpers


def _as_config(cfg: DictConfig | Mapping[str, Any]) -> DictConfig:
    return cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))


def _value(cfg: DictConfig, key: str) -> Any:
    """Return the value at the dotted `key`; raise ConfigError when it is absent or unresolvable."""
    try:
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=True)
    except OmegaConfBaseException as error:
        raise ConfigError(f"{key} is invalid: {_first_line(error)}") from error
    if value is _ABSENT:
        raise ConfigError(
            f"{key} is missing from the config. Restore it (drop any ~{key} override) or set it "
            f"with +{key}=VALUE"
        )
    return value


def _require(
    cfg: DictConfig, key: str, accepts: Callable[[Any], bool], allowed: str, example: str
) -> Any:
    value = _value(cfg, key)
    if not accepts(value):
        raise ConfigError(
            f"{key}={_show(value)} is invalid: expected {allowed}, for example {key}={example}"
        )
    return value


def _require_choice(
    cfg: DictConfig, key: str, choices: tuple[str, ...], *, example_key: str | None = None
) -> str:
    value = _value(cfg, key)
    if value not in choices:
        raise ConfigError(
            f"{key}={_show(value)} is invalid: expected one of {', '.join(choices)}, for example "
            f"{example_key or key}={choices[0]}"
        )
    return value


def _check_existing_file(cfg: DictConfig, key: str, fix: str) -> Path | None:
    """Return the file named by `key` as an absolute path, None when the key names no file.

    A relative path is taken from the directory the command ran in, as for data.root.
    """
    value = _value(cfg, key)
    if value is None or isinstance(value, bool):
        return None
    path = Path(to_absolute_path(str(value))).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}={_show(value)} is invalid: file {path} not found. {fix}")
    return path


def _build(group: str, factory: Callable[[Any], Any], node: Any) -> Any:
    """Call a group's validating constructor; turn OmegaConf's multi-line errors into one line."""
    try:
        return factory(node)
    except ConfigError as error:
        cause = error.__cause__
        if not isinstance(cause, OmegaConfBaseException):
            raise
        key = f"{group}.{cause.full_key}" if cause.full_key else group
        if isinstance(cause, ConfigKeyError):
            raise ConfigError(
                f"{key} is not a key of the {group} config. Remove the +{key} override"
            ) from cause
        value = f"={_show(cause.value)}" if cause.value is not None else ""
        raise ConfigError(f"{key}{value} is invalid: {_first_line(cause)}") from cause
    except OmegaConfBaseException as error:
        raise ConfigError(f"{group} is invalid: {_first_line(error)}") from error


def _first_line(error: Exception) -> str:
    message = getattr(error, "msg", None) or str(error)
    return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def _show(value: Any) -> str:
    """Format a config value as it would be written in an override."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (DictConfig, ListConfig)):
        return str(OmegaConf.to_container(value))
    if value == "":
        return "''"
    return str(value)


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but true/false in a config is never meant as a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool)


def _is_finite_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _positive_int(value: Any) -> bool:
    return _is_int(value) and value >= 1


def _non_negative_int(value: Any) -> bool:
    return _is_int(value) and value >= 0


def _optional_positive_int(value: Any) -> bool:
    return value is None or _positive_int(value)


def _learning_rate(value: Any) -> bool:
    return _is_finite_number(value) and 0 < value <= MAX_LEARNING_RATE


def _non_negative_number(value: Any) -> bool:
    return _is_finite_number(value) and value >= 0


def _optional_non_negative(value: Any) -> bool:
    return value is None or _non_negative_number(value)


def _fraction(value: Any) -> bool:
    return _is_finite_number(value) and 0 <= value <= 1


def _fraction_below_one(value: Any) -> bool:
    return _is_finite_number(value) and 0 <= value < 1


def _is_device(value: Any) -> bool:
    return isinstance(value, str) and DEVICE_PATTERN.fullmatch(value) is not None


def _is_optional_path(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value != "")


def _is_resume_value(value: Any) -> bool:
    return value is None or isinstance(value, bool) or (isinstance(value, str) and value != "")
