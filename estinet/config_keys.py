"""Keys defined by the shipped yaml files in conf/, to find keys that a composed config adds.

Hydra rejects an override of an undefined key, but its own hint, a leading `+`, adds the key, and
no code reads it, so `+train.batchsize=16` trains with train.batch_size=32. The validation of a
composed config (estinet.config) compares its keys with the keys that the shipped files define.
"""

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# estinet is used from a clone (pyproject.toml), so the shipped configs sit beside the package.
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# Root keys whose contents are Hydra's own settings, not checked here.
UNCHECKED_ROOT_KEYS = frozenset({"hydra"})
PACKAGE_HEADER = re.compile(r"#\s*@package\s+(\S+)")
# Option value for a group whose selection is unknown. The keys of all its option files are
# accepted.
ANY_OPTION = "*"


@dataclass
class KeySchema:
    """Dotted keys of a config. A key in `leaves` has a value, one in `nodes` has keys below it."""

    leaves: set[str] = field(default_factory=set)
    nodes: set[str] = field(default_factory=set)

    def add(self, values: Mapping[str, Any], prefix: str = "") -> None:
        for key, value in values.items():
            path = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                self.nodes.add(path)
                self.add(value, path + ".")
            else:
                self.leaves.add(path)

    def children(self, parent: str) -> tuple[str, ...]:
        """Return the names of the keys directly under `parent` ("" for the root), sorted."""
        prefix = f"{parent}." if parent else ""
        names = {
            key[len(prefix):].split(".", 1)[0]
            for key in self.leaves | self.nodes
            if key.startswith(prefix)
        }
        return tuple(sorted(names))


@dataclass(frozen=True)
class UnknownKey:
    """A key of a composed config that no shipped file defines."""

    key: str  # dotted, down to the first value of an unknown subtree (`trian.epochs`, not `trian`)
    value: Any
    parent: str  # the deepest known node above the key, "" for the root
    closest: str | None  # the most similar known key, see closest_key
    siblings: tuple[str, ...]  # names of the known keys directly under `parent`
    defined_by: tuple[str, ...]  # other group options that define the key, e.g. `model=reinforce`


def find_unknown_keys(cfg: DictConfig, config_name: str) -> list[UnknownKey]:
    """Return the keys of `cfg` that conf/<config_name>.yaml and its selected options do not define.

    A known key whose value is a scalar where the files have a mapping, or the reverse, counts as
    known, because its value is checked by the validators.
    """
    options = selected_options(config_name, cfg)
    schema = shipped_keys(config_name, options)
    values = OmegaConf.to_container(cfg, resolve=False)
    found: list[tuple[str, Any, str]] = []
    _collect_unknown(values, "", schema, found)
    return [
        UnknownKey(
            key, value, parent, closest_key(key, parent, schema), schema.children(parent),
            _other_options_defining(key, options),
        )
        for key, value, parent in found
    ]


def unknown_override_message(argv: list[str], config_name: str) -> str | None:
    """Return a one-line error for the first `key=value` argument whose key no shipped file defines.

    Hydra rejects such an override itself, but with a multi-line message that suggests the `+`
    prefix. The keys of every option of every group count as known here, and `+key`, `~key`,
    `group/option`, `hydra.*` and flags are left to Hydra and to the config validation.
    """
    groups = _default_options(config_name)
    schema = shipped_keys(config_name, {group: ANY_OPTION for group in groups})
    for argument in argv:
        key, separator, value = argument.partition("=")
        if not separator or key.startswith(("-", "+", "~")) or "/" in key or "@" in key:
            continue
        if key in groups or (CONF_DIR / key).is_dir():  # a group option such as experiment=paper
            continue
        if key.split(".", 1)[0] in UNCHECKED_ROOT_KEYS:
            continue
        if key in schema.leaves or key in schema.nodes:
            continue
        known_parents = [node for node in _parents(key)[:-1] if node in schema.nodes]
        parent = known_parents[-1] if known_parents else ""
        where = f"the {parent} config" if parent else "the config"
        closest = closest_key(key, parent, schema)
        if closest is not None:
            return (
                f"{key} is not a key of {where}. Did you mean {closest}? Use {closest}={value}"
            )
        return (
            f"{key} is not a key of {where}, and no known key is close to it (keys of {where}: "
            f"{', '.join(schema.children(parent))})"
        )
    return None


def selected_options(config_name: str, cfg: DictConfig) -> dict[str, str | None]:
    """Return the option of each config group in the root file's defaults list.

    Inside a Hydra job these are Hydra's recorded choices, None for a group left unselected. A
    config from the compose API carries no record of them, so the model option is read from
    model.name (each conf/model/*.yaml sets name to its file name), and every other group gets
    ANY_OPTION.
    """
    groups = _default_options(config_name)
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        if all(group in choices for group in groups):
            return {group: choices[group] for group in groups}
    options: dict[str, str | None] = {group: ANY_OPTION for group in groups}
    model_name = OmegaConf.select(cfg, "model.name", default=None)
    if "model" in groups and isinstance(model_name, str):
        if (CONF_DIR / "model" / f"{model_name}.yaml").is_file():
            options["model"] = model_name
    return options


def shipped_keys(config_name: str, options: Mapping[str, str | None]) -> KeySchema:
    """Collect the keys of conf/<config_name>.yaml and of the given option of each group.

    A group with option None adds no keys, and one with ANY_OPTION adds those of every option file.
    A group whose option file is not in conf/ (one from another config dir) accepts any key below
    it.
    """
    schema = KeySchema(leaves=set(UNCHECKED_ROOT_KEYS))
    schema.add(_load(CONF_DIR / f"{config_name}.yaml"))
    for group, option in options.items():
        group_dir = CONF_DIR / group
        if option is None:
            continue
        if option == ANY_OPTION:
            files = sorted(group_dir.glob("*.yaml"))
        elif (group_dir / f"{option}.yaml").is_file():
            files = [group_dir / f"{option}.yaml"]
        else:
            schema.leaves.add(group)
            continue
        for path in files:
            prefix = _package_prefix(path, group)
            schema.nodes.update(_parents(prefix))
            schema.add(_load(path), prefix)
    return schema


def closest_key(key: str, parent: str, schema: KeySchema) -> str | None:
    """Return the known key most similar to an unknown one, None when none is similar enough.

    Only the keys below `parent` are compared, by their paths relative to it. Compared as full
    paths, the shared prefix would make `model.samples` look like `model.name`. A misspelled node
    still finds its key: `trian.epochs` matches train.epochs.
    """
    prefix = f"{parent}." if parent else ""
    candidates = sorted(
        key[len(prefix):] for key in schema.leaves - UNCHECKED_ROOT_KEYS if key.startswith(prefix)
    )
    matches = difflib.get_close_matches(key[len(prefix):], candidates, n=1)
    return f"{prefix}{matches[0]}" if matches else None


def _other_options_defining(key: str, options: Mapping[str, str | None]) -> tuple[str, ...]:
    """Return `group=option` for each unselected option file of a group that defines `key`."""
    defining = []
    for group, option in options.items():
        if option == ANY_OPTION:
            continue
        for path in sorted((CONF_DIR / group).glob("*.yaml")):
            if path.stem == option:
                continue
            schema = KeySchema()
            schema.add(_load(path), _package_prefix(path, group))
            if key in schema.leaves:
                defining.append(f"{group}={path.stem}")
    return tuple(defining)


def _default_options(config_name: str) -> list[str]:
    """Return the config groups named in the defaults list of conf/<config_name>.yaml."""
    defaults = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{config_name}.yaml"))
    groups = []
    for entry in defaults.get("defaults", []):
        if not isinstance(entry, dict):
            continue  # _self_
        for group in entry:
            # Entries such as `override hydra/launcher: ...` select Hydra's own groups.
            if "/" not in group and " " not in group:
                groups.append(group)
    return groups


def _load(path: Path) -> dict[str, Any]:
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    # NOTE: a defaults list inside a group's option file is skipped, so keys that such a nested
    # list would add are reported as unknown. No shipped option file has one.
    values.pop("defaults", None)
    return values


def _parents(prefix: str) -> list[str]:
    """Return the nodes that a dotted prefix opens: `a.b.` gives a and a.b."""
    parts = prefix.rstrip(".").split(".") if prefix else []
    return [".".join(parts[: index + 1]) for index in range(len(parts))]


def _package_prefix(path: Path, group: str) -> str:
    """Return the dotted prefix under which an option file's keys land, from its @package header."""
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        match = PACKAGE_HEADER.match(line)
        if match:
            package = match.group(1)
            if package == "_global_":
                return ""
            return f"{group if package == '_group_' else package}."
    return f"{group}."


def _collect_unknown(
    values: Mapping[str, Any], prefix: str, schema: KeySchema, found: list[tuple[str, Any, str]]
) -> None:
    """Append (key, value, parent) to `found` for each key of `values` that `schema` lacks."""
    for key, value in values.items():
        path = f"{prefix}{key}"
        if path in schema.leaves:
            continue
        if path in schema.nodes:
            if isinstance(value, Mapping):
                _collect_unknown(value, path + ".", schema, found)
            continue
        # Report the first value below an unknown node, so that `+trian.epochs=3` is compared
        # with train.epochs rather than with the root keys.
        while isinstance(value, Mapping) and value:
            first = next(iter(value))
            path, value = f"{path}.{first}", value[first]
        found.append((path, value, prefix.rstrip(".")))
