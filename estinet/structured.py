"""Typed config dataclasses built from Hydra nodes, with one error type for every invalid value."""

from collections.abc import Mapping
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from estinet.errors import ConfigError

T = TypeVar("T")


def build_structured(cls: type[T], cfg: Mapping[str, Any], group: str) -> T:
    """Merge `cfg` onto the dataclass `cls` and return an instance, running its __post_init__.

    Unknown keys and values of the wrong type raise ConfigError naming the config `group`.
    """
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), cfg)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise ConfigError(f"invalid {group} config: {error}") from error
