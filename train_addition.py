"""Train an image-addition model (EstiNet, NALU, REINFORCE or the oracle) on MNIST lists and test it.

    python train_addition.py                                  # EstiNet, default settings
    python train_addition.py model=nalu experiment=quick
    python train_addition.py --multirun model=estinet,nalu seed=0,1,2,3,4 experiment=paper

Writes best.pt, last.pt, metrics.json and the composed config (.hydra/) into Hydra's run dir.
Continue a killed run with the same overrides plus `resume=true hydra.run.dir=<its run dir>`.
An invalid value or input ends the run with one error line and exit code 1.
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from estinet.errors import ConfigError, EstinetError
from estinet.runtime import exit_on_invalid_command_line, fail_job
from estinet.train import run_training

log = logging.getLogger("train_addition")


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        progress = bool(cfg.train.get("progress", True))
        run_training(cfg, HydraConfig.get().runtime.output_dir, progress=progress)
    except EstinetError as error:
        fail_job(error, log)
    except OmegaConfBaseException as error:
        fail_job(ConfigError(f"invalid config: {' '.join(str(error).split())}"), log)


if __name__ == "__main__":
    exit_on_invalid_command_line("train")
    main()
