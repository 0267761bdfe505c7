"""``TASNetSearch``: the differentiable architecture search of TASNet (section 3.2) as a LightningModule.

Objective (eq. 8): ``L1 + lambda1 * R1 + lambda2 * R2`` where R1 is the FLOPs of the
architecture as executed with the applied masks for the batch's M tasks (shared prefix once,
task-specific part once per task), divided by the unpruned CResMD's FLOPs for the same M tasks,
and R2 the disagreement of eq. 10 divided by M * sum_n C_n (docs/method.md section 3, [choice]:
both normalisations make lambda values scale-free).

Network weights (and the shared blocks' task-agnostic scales) and the controllers are two
parameter groups of one optimiser, each with its own learning rate (``optimizer.lr`` and
``controller_lr``), so Lightning's automatic optimisation, clipping and accumulation apply.

Each validation logs ``val/psnr`` of the masked network on the validation grid, the current
L1/R1/R2, ``search/gflops_27_hd`` (FLOPs per inference of the 27-point workload at 1280x720,
shared prefix amortised over the 27 tasks), ``search/flops_ratio`` (that cost over CResMD's),
``search/shared_maps`` and the mean active channels, writes ``search/architecture.json`` (every
map: shared or not, eta, channels) and draws the architecture picture.

Under DDP every rank takes one sharing decision: the network sums the decision's statistics over
the ranks before thresholding (``TASNetSearchNet.rank_sync``, set in :meth:`TASNetSearch.setup`),
and each validation checks that z^a, eta and phi are the same on every rank (``RuntimeError``
otherwise). The search needs DDP's ``find_unused_parameters`` (see :meth:`TASNetSearch.setup`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from cirlab.archs.flops import searchable_maps
from cirlab.archs.tasnet_search import TASNetSearchNet, disagreement
from cirlab.models.restoration import RestorationModule
from cirlab.tasks import HD

log = logging.getLogger(__name__)

class TASNetSearch(RestorationModule):
    """Search over a CResMD supernetwork; see the module docstring.

    Args (beyond ``RestorationModule``'s):
        lambda1: weight of the FLOPs regulariser R1.
        lambda2: weight of the disagreement regulariser R2.
        controller_lr: learning rate of the controllers' parameter group.
        init_ckpt: optional cirlab CResMD checkpoint whose network starts the search.
        workload_grid: task grid of the reported workload (default CResMD's 27 points).
        decision_samples: task vectors drawn from the training distribution (the data module's
            pair sampler) that join ``workload_grid`` in the declared task set of the sharing
            decision (``model.net.decision=declared``).
        decision_seed: seed of those draws (the set is the same for every run and every resume).
        sharing_warmup: training steps at the start during which nothing is shared (phi = 0, as
            TSNet), so the controllers learn each task's channels before agreement is judged.
    """

    LOGGED_METRICS = ("train/r1", "train/r2", "train/loss", "agreement/*", "search/shared_maps",  # beyond the base's
                      "search/gflops_27_hd", "search/flops_ratio", "search/active_channels_mean")

    #: the network method ``training_step`` runs (what ``callbacks.speed.compile`` compiles)
    training_forward = "search_forward"

    def __init__(self, net: dict, optimizer: dict, scheduler: dict | None = None, scheduler_interval: str = "step",
                 lambda1: float = 0.1, lambda2: float = 0.1, controller_lr: float = 1e-3,
                 init_ckpt: str | None = None, workload_grid: str | list = "cresmd27",
                 decision_samples: int = 256, decision_seed: int = 0, sharing_warmup: int = 0,
                 test_iqa: bool = False, iqa_weights_dir: str | None = None) -> None:
        super().__init__(net=net, optimizer=optimizer, scheduler=scheduler, scheduler_interval=scheduler_interval,
                         test_iqa=test_iqa, iqa_weights_dir=iqa_weights_dir)
        for key, value in (("lambda1", lambda1), ("lambda2", lambda2), ("controller_lr", controller_lr)):
            if value < 0:
                raise ValueError(f"model.{key}={value} must be >= 0")
        for key, value in (("decision_samples", decision_samples), ("sharing_warmup", sharing_warmup)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"model.{key}={value!r} must be an integer >= 0")
        self.save_hyperparameters({"lambda1": lambda1, "lambda2": lambda2, "controller_lr": controller_lr,
                                   "init_ckpt": init_ckpt, "workload_grid": workload_grid,
                                   "decision_samples": decision_samples, "decision_seed": decision_seed,
                                   "sharing_warmup": sharing_warmup})
        if not isinstance(self.net, TASNetSearchNet):
            raise ValueError("model.net must build a cirlab.archs.tasnet_search.TASNetSearchNet")
        if init_ckpt:
            self.load_supernet(init_ckpt)

    def load_supernet(self, path: str) -> None:
        """Start from a trained CResMD: its ``net.*`` weights become the supernetwork's."""
        from cirlab.checkpoints import net_state_dict, read_checkpoint

        weights = net_state_dict(read_checkpoint(path, key="model.init_ckpt"), path=path, key="model.init_ckpt")
        missing, unexpected = self.net.supernet.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(f"model.init_ckpt={path!r} is not a CResMD of this shape: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        self.net.reset_agnostic_scales()
        log.info("search starts from the CResMD weights of %s", path)

    def declared_tasks(self) -> torch.Tensor:
        """[choice] The declared task set of the sharing decision: the workload grid (the tasks
        the network is evaluated and costed on) plus ``decision_samples`` task vectors
        ``l_in - l_gt`` from the data module's pair sampler (the training distribution), drawn
        with ``decision_seed``."""
        from cirlab.tasks import level_grid

        tasks = [level_grid(self.hparams.workload_grid)]
        count = int(self.hparams.decision_samples)
        if count:
            sampler = getattr(getattr(self.trainer, "datamodule", None), "sampler", None)
            if sampler is None or not hasattr(sampler, "sample_levels"):
                raise ValueError(f"model.decision_samples={count} draws task vectors from the data module's pair "
                                 "sampler, and this data module has none: set model.decision_samples=0")
            generator = torch.Generator().manual_seed(int(self.hparams.decision_seed))
            levels_in, levels_gt = sampler.sample_levels(count, generator=generator, device="cpu")
            tasks.append((levels_in - levels_gt).float())
        return torch.cat(tasks)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self.net.rank_sync = self.trainer.world_size > 1
        # DDP must look for unused parameters here: which parameters a step uses depends on the
        # sharing decision, which changes during the search. A block whose output map is shared
        # scales its residual with agnostic_scale, so its local_scale MLP gets no gradient; while
        # nothing is shared (the warm-up, or gamma = 1) agnostic_scale gets none. Without the flag
        # DDP stops at the next step ("Expected to have finished reduction in the prior iteration").
        # The other modules use every trainable parameter at every step and keep DDP's default.
        ddp_kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", None)  # Lightning's DDPStrategy keeps them here
        if isinstance(ddp_kwargs, dict):
            if ddp_kwargs.get("find_unused_parameters") is False:
                log.warning("trainer.strategy sets find_unused_parameters=False: a TASNet search step that "
                            "leaves a parameter unused will stop DDP")
            else:
                ddp_kwargs["find_unused_parameters"] = True

    def check_ranks_agree(self) -> None:
        """``RuntimeError`` unless every rank holds the same z^a, eta and phi (no-op on one rank)."""
        if self.trainer.world_size < 2:
            return
        net = self.net
        state = torch.cat([net.z_agnostic.flatten().float(), net.eta.float(), net.phi.float()])
        gathered = self.all_gather(state)  # (world_size, K)
        if not bool((gathered == gathered[0]).all()):
            differ = (gathered != gathered[0]).any(dim=1).nonzero().flatten().tolist()
            raise RuntimeError(f"the sharing decision differs between DDP ranks (ranks {differ} differ from rank 0): "
                               "the search's statistics were not reduced over the ranks")

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if self.net.decision == "declared":
            self.net.set_decision_tasks(self.declared_tasks().to(self.device))
            log.info("sharing decision over a declared set of %d task vectors", self.net.decision_tasks.shape[0])

    # ------------------------------------------------------------------------ objective
    def regularisers(self, result, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        from cirlab.archs.flops import MaskState, cresmd_flops, masked_flops

        net = self.net
        tasks = result.output.shape[0]
        state = MaskState(phi=result.phi, masks=result.masks)
        r1 = masked_flops(state, net.nf, net.nb, height, width) / cresmd_flops(net.nf, net.nb, height, width, tasks=tasks)
        r2 = disagreement(result.gates_specific, result.gates_agnostic, result.phi)
        return r1, r2

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self.net.sharing_on.fill_(self.global_step >= self.hparams.sharing_warmup)
        result = self.net.search_forward(batch["input"], batch["task"])
        l1 = F.l1_loss(result.output, batch["target"])
        r1, r2 = self.regularisers(result, *batch["input"].shape[-2:])
        loss = l1 + self.hparams.lambda1 * r1 + self.hparams.lambda2 * r2
        size = batch["input"].shape[0]
        self.log("train/l1", l1, prog_bar=True, batch_size=size)
        self.log("train/r1", r1, batch_size=size)
        self.log("train/r2", r2, batch_size=size)
        self.log("train/loss", loss, batch_size=size)
        # logged as device tensors: no host synchronisation in the step (Lightning reads them when it writes logs)
        self.log("search/shared_maps", result.phi.sum().float(), prog_bar=True, batch_size=size)
        # how close each map's agreement (eq. 6, without gamma) sits to gamma: a knife edge shows here
        # (2 nb + 3 values: only on the steps whose logs are written, each self.log costs host time)
        if self.trainer.fast_dev_run or (self.global_step + 1) % max(self.trainer.log_every_n_steps, 1) == 0:
            agreement = self.net.agreement.detach().clone()
            self.log_dict({f"agreement/{spec.name}": value for spec, value in
                           zip(searchable_maps(self.net.nb, self.net.nf), agreement.unbind())}, batch_size=size)
        return loss

    def parameter_groups(self) -> list:
        """Two groups: network weights (``optimizer.lr``) and controllers (``controller_lr``)."""
        controllers = list(self.net.controllers.parameters())
        ids = {id(p) for p in controllers}
        weights = [p for p in self.net.parameters() if id(p) not in ids]
        return [{"params": weights, "name": "weights"},
                {"params": controllers, "lr": self.hparams.controller_lr, "name": "controllers"}]

    # ------------------------------------------------------------------------ reporting
    @torch.no_grad()
    def architecture(self, height: int = HD[0], width: int = HD[1]) -> dict:
        """The current architecture on the workload grid: per-map channels, eta, FLOPs."""
        from cirlab.archs.flops import MaskState, cresmd_flops, masked_flops, searchable_maps
        from cirlab.tasks import level_grid

        net = self.net
        tasks = level_grid(self.hparams.workload_grid).to(self.device)
        was_training = net.training
        net.eval()
        specific, agnostic = net.importance(tasks)
        net.train(was_training)
        phi = net.phi.clone()
        masks = [(z > 0).float().expand(len(tasks), -1) if shared else (s > 0).float()
                 for s, z, shared in zip(specific, agnostic, phi.tolist())]
        flops = float(masked_flops(MaskState(phi=phi, masks=masks), net.nf, net.nb, height, width))
        full = float(cresmd_flops(net.nf, net.nb, height, width, tasks=len(tasks)))
        maps = []
        for spec, mask, shared, eta, ratio in zip(searchable_maps(net.nb, net.nf), masks, phi.tolist(), net.eta.tolist(),
                                                  net.agreement.tolist()):
            counts = mask.sum(dim=1)
            maps.append({"name": spec.name, "shared": bool(shared), "eta": bool(eta), "agreement": ratio,
                         "channels": int(counts[0]) if shared else None,
                         "channels_mean": float(counts.mean()), "channels_min": int(counts.min()),
                         "channels_max": int(counts.max()), "channels_full": int(mask.shape[1])})
        return {"tasks": len(tasks), "height": height, "width": width, "shared_maps": int(phi.sum()),
                "decision": {"rule": net.decision, "gamma": net.gamma,
                             "tasks": int(net.decision_tasks.shape[0]) if net.decision == "declared" else None},
                "flops_total": flops, "flops_per_inference": flops / len(tasks),
                "cresmd_flops_per_inference": full / len(tasks), "flops_ratio": flops / full, "maps": maps}

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self.check_ranks_agree()
        arch = self.architecture()
        self.log("search/gflops_27_hd", arch["flops_per_inference"] / 1e9, sync_dist=True)
        self.log("search/flops_ratio", arch["flops_ratio"], sync_dist=True)
        self.log("search/shared_maps", float(arch["shared_maps"]), sync_dist=True)
        self.log("search/active_channels_mean",
                 sum(m["channels_mean"] for m in arch["maps"]) / len(arch["maps"]), sync_dist=True)
        self._last_architecture = arch
        if self.trainer.is_global_zero and not self.trainer.sanity_checking:
            self.save_architecture(arch)

    def save_architecture(self, arch: dict) -> None:
        from cirlab.figures import architecture_figure, publish_figure
        from cirlab.utils.run import write_json_atomically

        root = Path(self.trainer.default_root_dir) / "search"
        write_json_atomically(root / "architecture.json", {"step": self.global_step, **arch})

        figure = architecture_figure(arch, title=f"step {self.global_step}")
        publish_figure(self.trainer, figure, root, f"architecture_step{self.global_step:07d}",
                       key="search/architecture", latest="architecture_latest")
