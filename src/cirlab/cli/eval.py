"""``cirlab-eval ckpt_path=...``: score a checkpoint on the test grid of ``conf/eval.yaml``
(``cirlab.evaluation.grid.evaluate``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cirlab.config import CONFIG_DIR, register_configs
from cirlab.evaluation.grid import evaluate
from cirlab.utils.wandb import finish_wandb


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    finally:
        finish_wandb()


register_configs()

if __name__ == "__main__":
    main()
