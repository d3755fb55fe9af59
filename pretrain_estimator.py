"""Pretrain the black-box estimator offline and write estimator.pt and metrics.json to the run dir.

python pretrain_estimator.py                       # defaults: conf/pretrain.yaml
python pretrain_estimator.py pretrain.soft_targets=argmax hydra.run.dir=outputs/argmax
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from estinet.pretrain import run_pretraining


@hydra.main(version_base="1.3", config_path="conf", config_name="pretrain")
def main(cfg: DictConfig) -> None:
    run_pretraining(cfg, HydraConfig.get().runtime.output_dir)


if __name__ == "__main__":
    main()
