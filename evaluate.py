"""Score a trained checkpoint, or aggregate finished runs into the paper's results table.

    python evaluate.py checkpoint=outputs/2026-12-04/12-00-00/best.pt k=[10,100,1000]
    python evaluate.py runs=multirun/table   # results.md/.json/.png and learning_curves.png
"""

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from estinet.aggregate import aggregate, find_runs, markdown_table, plot_learning_curves, plot_mae
from estinet.checkpoint import write_json
from estinet.errors import ConfigError, EstinetError
from estinet.evaluation import evaluate_checkpoint

log = logging.getLogger("evaluate")


def evaluate_runs(cfg: DictConfig) -> None:
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


def evaluate_one(cfg: DictConfig) -> None:
    lengths = OmegaConf.to_container(cfg.k) if isinstance(cfg.k, ListConfig) else cfg.k
    if isinstance(lengths, int):
        lengths = [lengths]
    results = evaluate_checkpoint(
        cfg.checkpoint, lengths=lengths, num_lists=cfg.num_lists,
        data_root=cfg.data.root, device=cfg.device,
    )
    print(json.dumps(results, indent=2, sort_keys=True))


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
            evaluate_one(cfg)
    except EstinetError as error:
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
