"""``ArchitectureArtifact``: a fine-tuned TASNet's derived architecture as a W&B artifact."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from cirlab.utils.wandb import log_architecture_artifact, wandb_loggers


class ArchitectureArtifact(L.Callback):
    """When fitting starts, log the ``architecture.json`` (and ``architecture.png``) that
    ``cirlab-derive`` wrote beside the ``tasnet.ckpt`` the module started from (its hyper-parameter
    ``derived_from``, set by ``model.derived_ckpt``) as a W&B artifact of type
    ``architecture`` (``cirlab.utils.wandb.log_architecture_artifact``). Does nothing for other
    modules, without a W&B logger, or on ranks other than 0.

    Args:
        name: the artifact's name (W&B versions artifacts of the same name).
    """

    def __init__(self, name: str = "tasnet-architecture") -> None:
        self.name = name
        self.logged: list[str] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        derived = getattr(pl_module, "hparams", {}).get("derived_from")
        if not derived or not trainer.is_global_zero:
            return
        folder = Path(derived).parent
        for logger in wandb_loggers(trainer):
            if log_architecture_artifact(logger, folder, self.name) is not None:
                self.logged.append(str(folder / "architecture.json"))
