"""``TASNetFinetune``: train a TASNet of fixed architecture (docs/method.md section 3, "Derivation and
fine-tuning") with the base module's L1 loss, optimiser, schedule and 27-grid evaluation.

Two ways to get the network:

* ``model.derived_ckpt=<cirlab-derive output>/tasnet.ckpt`` (``model=tasnet_finetune``): the
  derived TASNet with its derived weights: TASNet, TSNet, TASNet-A rows;
* ``model.net`` a Hydra config building a ``cirlab.archs.tasnet.TASNet`` directly, e.g.
  ``cirlab.archs.tasnet.naive_shared`` (``model=cresmd_shared``: CResMD with its first 31/62/99%
  of layers naively shared, Table 4), optionally started from a CResMD checkpoint
  (``model.init_ckpt``).

The architecture stays fixed. [choice] **The controllers are frozen** (``requires_grad=False``):
the channels each task uses are exactly those the search picked, so the FLOPs of every task
(eq. 9, reported at the start as ``model/gflops_per_inference``) do not drift during
fine-tuning; training them through the straight-through gate without the search's FLOPs
regulariser would let channels switch on freely. Everything else trains: the sliced convs,
``local_scale`` of task-specific blocks, ``agnostic_scale`` of shared blocks and
``global_scale``. Training runs the task-specific part at full width with the 0/1 masks
multiplied in (one batched pass for a batch of mixed tasks; same values and gradients as the
sliced execution), evaluation the sliced execution.

Checkpoints are self-contained: the architecture is stored in the hyper-parameters
(``net.architecture``), so ``cirlab.evaluation.grid.load_module`` rebuilds the module without the derived
checkpoint or the CResMD it started from (those paths are kept as ``derived_from`` and
``initialised_from`` for the record).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cirlab.models.restoration import RestorationModule, check_plain_config
from cirlab.tasks import HD

log = logging.getLogger(__name__)

class TASNetFinetune(RestorationModule):
    """Fine-tune a fixed TASNet architecture; see the module docstring.

    Args (beyond ``RestorationModule``'s):
        derived_ckpt: standalone TASNet checkpoint written by ``cirlab-derive``.
        net: instead, a Hydra config building a ``TASNet`` (e.g. ``naive_shared``).
        init_ckpt: optional cirlab CResMD checkpoint whose weights start a ``net`` built from
            config (the shared blocks' scales become ``local_scale(0.5)``).
        flops_grid: task grid of the reported FLOPs per inference (at 1280x720).
        derived_from, initialised_from: provenance, filled in by the module itself.
    """

    LOGGED_METRICS = ("model/gflops_per_inference", "model/shared_maps")  # beyond the base's

    def __init__(self, optimizer: dict, derived_ckpt: str | None = None, net: dict | None = None,
                 init_ckpt: str | None = None, scheduler: dict | None = None, scheduler_interval: str = "step",
                 flops_grid: str | list = "cresmd27", test_iqa: bool = False, iqa_weights_dir: str | None = None,
                 derived_from: str | None = None, initialised_from: str | None = None) -> None:
        check_plain_config(net, "model.net")
        weights = None
        if net is None:
            if not derived_ckpt:
                raise ValueError("model.derived_ckpt is required: the tasnet.ckpt written by cirlab-derive "
                                 "(or give model.net to build a TASNet from config)")
            weights, net = self._read_derived(derived_ckpt)
            derived_from = str(derived_ckpt)
        elif derived_ckpt:
            raise ValueError("give model.derived_ckpt or model.net, not both")
        super().__init__(net=net, optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval,
                         test_iqa=test_iqa, iqa_weights_dir=iqa_weights_dir)
        from cirlab.archs.tasnet import TASNet

        if not isinstance(self.net, TASNet):
            raise ValueError(f"model.net must build a cirlab.archs.tasnet.TASNet, got {type(self.net).__name__}")
        if weights is not None:
            self.net.load_state_dict(weights, strict=True)
        if init_ckpt:
            if weights is not None:
                raise ValueError("model.init_ckpt starts a network built from model.net; a derived TASNet has its weights")
            self._load_cresmd(init_ckpt)
            initialised_from = str(init_ckpt)
        for parameter in self.net.controllers.parameters():
            parameter.requires_grad_(False)
        # the paths were read once; reloading this module's checkpoint needs neither file
        self.save_hyperparameters({"derived_ckpt": None, "init_ckpt": None, "flops_grid": flops_grid,
                                   "derived_from": derived_from, "initialised_from": initialised_from})

    @staticmethod
    def _read_derived(path: str) -> tuple[dict, dict]:
        from cirlab.checkpoints import TASNET_FORMAT, read_checkpoint

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model.derived_ckpt={str(path)!r}: no such file (run cirlab-derive first)")
        checkpoint = read_checkpoint(path, key="model.derived_ckpt", what="derived TASNet checkpoint")
        if checkpoint.get("format") != TASNET_FORMAT:
            raise ValueError(f"model.derived_ckpt={str(path)!r} is not a derived TASNet checkpoint (cirlab-derive)")
        net = {"_target_": "cirlab.archs.tasnet.TASNet", "architecture": checkpoint["architecture"]}
        return checkpoint["state_dict"], net

    def _load_cresmd(self, path: str) -> None:
        from cirlab.archs.cresmd import CResMDNet
        from cirlab.archs.tasnet import TASNet
        from cirlab.checkpoints import net_state_dict, read_checkpoint

        weights = net_state_dict(read_checkpoint(path, key="model.init_ckpt"), path=path, key="model.init_ckpt")
        net = self.net
        cresmd = CResMDNet(in_nc=net.in_nc, out_nc=net.in_nc, nf=net.nf, nb=net.nb, cond_dim=net.cond_dim)
        try:
            cresmd.load_state_dict(weights, strict=True)
            start = TASNet.from_cresmd(cresmd, shared_maps=net.shared_maps)
            net.load_state_dict(start.state_dict(), strict=True)
        except RuntimeError as error:
            raise ValueError(f"model.init_ckpt={path!r} does not fit this network: {error}") from None
        log.info("network starts from the CResMD weights of %s", path)

    # ------------------------------------------------------------------ reporting
    def flops_per_inference(self, height: int = HD[0], width: int = HD[1]) -> float:
        """FLOPs per inference of the flops grid's workload (shared prefix amortised)."""
        from cirlab.tasks import level_grid

        tasks = level_grid(self.hparams.flops_grid).to(next(self.net.parameters()).device)
        return self.net.flops(tasks, height, width) / len(tasks)

    def parameter_counts(self) -> dict[str, float]:
        counts = dict(super().parameter_counts())
        counts["model/gflops_per_inference"] = self.flops_per_inference() / 1e9
        counts["model/shared_maps"] = self.net.shared_maps
        return counts

    def parameter_groups(self) -> list:
        """Everything but the frozen controllers."""
        return [p for p in self.net.parameters() if p.requires_grad]
