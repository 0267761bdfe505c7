"""``cirlab-train``: one training job of ``conf/train.yaml`` (``cirlab.training.train``)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from cirlab.config import CONFIG_DIR, register_configs

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    # imported here, not at the top: `--help` needs the config tree only (no Lightning)
    from cirlab.training import train
    from cirlab.utils.wandb import finish_wandb

    try:
        metrics = train(cfg)
    finally:
        finish_wandb()
    name = cfg.get("optimized_metric")
    if name and name in metrics:
        return metrics[name]
    if name:
        log.warning("optimized_metric %r was not produced by this run", name)
    return None


register_configs()

if __name__ == "__main__":
    main()
