"""``cirlab-pipeline`` (``make train``): the stages of ``conf/pipeline.yaml`` (``cirlab.pipeline``)."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from cirlab.config import CONFIG_DIR, register_configs

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="pipeline")
def main(cfg: DictConfig) -> None:
    # imported here, not at the top: `--help` needs the config tree only (no Lightning)
    from cirlab.pipeline import PipelineError, run_pipeline

    try:
        run_pipeline(cfg)
    except PipelineError as error:
        log.error("%s", error)
        raise SystemExit(2) from None


register_configs()

if __name__ == "__main__":
    main()
