"""Train an image-addition model (EstiNet or the NALU baseline) on MNIST lists and test it.

    python train_addition.py                                  # EstiNet, default settings
    python train_addition.py model=nalu experiment=quick
    python train_addition.py --multirun model=estinet,nalu seed=0,1,2,3,4 experiment=paper

Writes best.pt, last.pt, metrics.json and the composed config (.hydra/) into Hydra's run dir.
"""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from estinet.errors import EstinetError
from estinet.train import run_training

log = logging.getLogger("train_addition")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run_training(cfg, HydraConfig.get().runtime.output_dir, progress=cfg.train.progress)
    except EstinetError as error:
        log.error("%s", error)
        sys.exit(1)


if __name__ == "__main__":
    main()
