"""``cirlab-eval``: score one checkpoint (``ckpt_path=...``) or several (``models=[NAME=PATH,...]``)
of any kind under a protocol of ``conf/protocol/`` (``cirlab.evaluation.compare.run_eval``)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cirlab.config import CONFIG_DIR, register_configs


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    # imported here, not at the top: `--help` needs the config tree only (no Lightning)
    from cirlab.evaluation.compare import run_eval
    from cirlab.utils.wandb import finish_wandb

    try:
        run_eval(cfg)
    finally:
        finish_wandb()


register_configs()

if __name__ == "__main__":
    main()
