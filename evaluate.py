"""Score a trained checkpoint, or aggregate finished runs into the paper's results table.

    python evaluate.py checkpoint=outputs/2026-12-04/12-00-00/best.pt k=[10,100,1000]
    python evaluate.py runs=multirun/paper   # results.md/.json/.png and learning_curves.png

Checkpoint mode also writes its results to evaluation.json in Hydra's run dir
(outputs/evaluate/<time> unless hydra.run.dir is given).
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, ListConfig, OmegaConf

from estinet.aggregate import aggregate, find_runs, markdown_table, plot_learning_curves, plot_mae
from estinet.checkpoint import write_json
from estinet.errors import ConfigError, EstinetError
from estinet.evaluation import evaluate_checkpoint
from estinet.runtime import exit_on_invalid_command_line

log = logging.getLogger("evaluate")


# Keys that only checkpoint mode reads. Runs mode reports the test lists each run was scored on.
CHECKPOINT_MODE_KEYS = ("k", "num_lists", "device", "data.root")


def evaluate_runs(cfg: DictConfig) -> None:
    ignored = [key for key in CHECKPOINT_MODE_KEYS
               if OmegaConf.select(cfg, key) not in (None, "auto")]
    if ignored:
        verb = "applies" if len(ignored) == 1 else "apply"
        raise ConfigError(
            f"{', '.join(ignored)} {verb} only to checkpoint=PATH. runs=DIR aggregates the test "
            "results stored in each run's metrics.json. To score a run on other lists, pass "
            "checkpoint=<its best.pt> instead"
        )
    paths = list(cfg.runs) if isinstance(cfg.runs, ListConfig) else [cfg.runs]
    results = aggregate(find_runs(paths))
    output = Path(cfg.output) if cfg.output else Path(paths[0])
    output.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results)
    (output / "results.md").write_text(table)
    write_json(output / "results.json", results)
    plot_mae(results, output / "results.png")
    plot_learning_curves(results, output / "learning_curves.png")
    print(table)
    log.info("wrote %s, %s, %s and %s", output / "results.md", output / "results.json",
             output / "results.png", output / "learning_curves.png")


def evaluate_one(cfg: DictConfig, output_dir: Path) -> None:
    lengths = checked_lengths(cfg.k)
    num_lists = cfg.num_lists
    if num_lists is not None and not _is_positive_int(num_lists):
        raise ConfigError(
            f"num_lists={_show(num_lists)} is invalid: expected an integer >= 1 or null, for "
            "example num_lists=1000"
        )
    results = evaluate_checkpoint(
        cfg.checkpoint, lengths=lengths, num_lists=num_lists,
        data_root=cfg.data.root, device=cfg.device,
    )
    results = {"checkpoint": str(cfg.checkpoint), **results}
    print(json.dumps(results, indent=2, sort_keys=True))
    write_json(output_dir / "evaluation.json", results)
    log.info("wrote %s", output_dir / "evaluation.json")


def checked_lengths(k) -> list[int] | None:
    """Return the list lengths of `k` (null, an integer or a list), or raise ConfigError."""
    if k is None:
        return None
    lengths = OmegaConf.to_container(k) if isinstance(k, ListConfig) else [k]
    if not lengths or not all(_is_positive_int(length) for length in lengths):
        raise ConfigError(
            f"k={_show(k)} is invalid: expected an integer >= 1 or a list of them, for example "
            "k=[10,100]"
        )
    if len(set(lengths)) != len(lengths):
        raise ConfigError(
            f"k={_show(k)} is invalid: expected distinct lengths, for example k=[10,100]"
        )
    return lengths


def _is_positive_int(value) -> bool:
    # bool is a subclass of int, but true/false is never meant as a count.
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _show(value) -> str:
    """Format a value as it is written in an override: `[10,100]`, `null`, `abc`."""
    if isinstance(value, ListConfig):
        return "[" + ",".join(_show(item) for item in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        if (cfg.checkpoint is None) == (cfg.runs is None):
            raise ConfigError(
                "give exactly one of checkpoint=PATH (score a model) or runs=DIR (aggregate runs)"
            )
        if cfg.runs is not None:
            evaluate_runs(cfg)
        else:
            evaluate_one(cfg, Path(HydraConfig.get().runtime.output_dir))
    except EstinetError as error:
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    exit_on_invalid_command_line("evaluate")
    main()
