"""Pretrain the black-box estimator offline and write estimator.pt and metrics.json to the run dir.

python pretrain_estimator.py                       # defaults: conf/pretrain.yaml
python pretrain_estimator.py pretrain.soft_targets=argmax hydra.run.dir=outputs/argmax
"""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from estinet.config import validate_pretrain_config
from estinet.errors import ConfigError, EstinetError
from estinet.pretrain import run_pretraining
from estinet.runtime import exit_on_invalid_command_line, fail_job, resolve_device

log = logging.getLogger("pretrain_estimator")


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    try:
        validate_pretrain_config(cfg)
        cfg.device = str(resolve_device(cfg.device))  # run_pretraining needs a torch device name
        run_pretraining(cfg, HydraConfig.get().runtime.output_dir)
    except EstinetError as error:
        fail_job(error, log)
    except OmegaConfBaseException as error:
        fail_job(ConfigError(f"invalid config: {' '.join(str(error).split())}"), log)


if __name__ == "__main__":
    exit_on_invalid_command_line("pretrain")
    main()
