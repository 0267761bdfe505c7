"""The Hydra callback that summarizes a ``cirlab-train -m`` multirun when it ends.

Configured under ``hydra.callbacks`` (``_target_: cirlab.sweeps.hydra_callback.MultirunSummary``),
e.g. in ``conf/hparams_search/*grid.yaml``. A failed summary is logged, never raised, so it cannot
hide the jobs' own results.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig

from cirlab.sweeps.spec import normalize_direction
from cirlab.sweeps.summary import write_summary
from cirlab.utils.wandb import publish_sweep_summary

log = logging.getLogger(__name__)


class MultirunSummary(HydraCallback):
    """When a multirun ends, write its summary table and Pareto plot into the multirun folder.

    ``objectives``: ``metric: maximize|minimize``, ordered (x axis, then y axis of pareto.png);
    none: val/psnr up and model/params_total down.
    """

    def __init__(self, objectives: dict | None = None) -> None:
        self.objectives = [(metric, normalize_direction(direction)) for metric, direction in (objectives or {}).items()]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir)
        try:
            rows, out_dir = write_summary(folder, self.objectives or None)
        except Exception as error:  # a failed summary must not hide the jobs' own results
            log.error("could not summarize the multirun in %s: %s", folder, error)
            return
        print(f"sweep summary ({len(rows)} jobs): {out_dir / 'summary.md'}")
        try:  # the table and pareto.png into the jobs' W&B group, when they logged to W&B
            publish_sweep_summary(config.get("logger"), out_dir)
        except Exception as error:  # noqa: BLE001  (W&B trouble must not hide the summary written above)
            log.error("could not send the multirun summary to W&B: %s", error)
