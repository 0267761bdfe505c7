"""One interface over every cirlab checkpoint: restore one image under T task vectors, and its cost.

:func:`load_restorer` reads ``PATH`` or ``NAME=PATH`` and returns a :class:`Restorer` whose
``kind`` says what the file holds:

========================  ===================================================================
kind                      file
========================  ===================================================================
``cresmd``                a ``CResMD`` module checkpoint (absolute or relative ground truth)
``tsnet_search``          a ``TASNetSearch`` checkpoint whose network does not share (TSNet)
``tasnet_search``         a ``TASNetSearch`` checkpoint with sharing (TASNet during its search)
``tasnet``                a standalone ``tasnet.ckpt`` written by ``cirlab-derive``
``tasnet_finetune``       a ``TASNetFinetune`` checkpoint (fine-tuned TASNet / TSNet / TASNet-A,
                          or CResMD naively shared, ``model=cresmd_shared``)
``hyperres``              a scalar-level ``HyperRes`` checkpoint (hypernetwork, ``cond_dim`` 1)
``hyperres_dedicated``    a ``HyperRes`` checkpoint holding a dedicated ``MainNet``
``hyperres_3d``           a ``HyperRes3D`` checkpoint (meta blocks take the 3-D task vector)
========================  ===================================================================

Contract of :meth:`Restorer.restore`: ``image`` (1, 3, H, W) float in [0, 1] on the restorer's
``device``, ``tasks`` (T, 3) float task vectors in [0, 1] (:mod:`cirlab.tasks`); returns
(T, 3, H, W) float32 clamped to [0, 1] on the same device. :meth:`Restorer.flops` is the
analytic FLOPs (2 per multiply-add) of that call for one H x W image at all T task vectors:

* CResMD: T full inferences, convolutions only (:func:`cirlab.archs.flops.cresmd_flops`);
* TASNet (derived, fine-tuned): shared prefix once, task-specific part per task with its
  channels (:meth:`cirlab.archs.tasnet.TASNet.flops`, eq. 9 as executed);
* a search state: eq. 9 for the masks its eval-mode forward applies (stored phi, EMA z^a,
  per-task gates), as ``TASNetSearch.architecture`` reports it. The search forward itself runs
  the full-width supernetwork with 0/1 masks multiplied in, so its wall time is CResMD's; the
  FLOPs are those of the network it describes;
* HyperRes (any kind): T passes of the main network plus generating T networks
  (``HyperResNet.flops``; nothing is shared between task vectors). A dedicated ``MainNet``
  generates nothing.

A scalar-level HyperRes has no 3-D task vector. [choice] Its restorer accepts exactly the task
vectors whose only non-zero component is its own task's (denoise: noise, dejpeg: JPEG) and
maps that component to its level with :func:`cirlab.tasks.task_to_physical` (sigma = 50 t,
q = round(102 - 92 t)); the zero vector is sigma 0 for denoise and is refused for dejpeg (no
JPEG is not a quality level). Anything else (blur, a mix, an SR model: no SR component) is a
``ValueError`` naming the model and the offending task vector, raised by :meth:`check_tasks`
before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn

#: Task-vector component of each scalar HyperRes task (None: not on the blur/noise/JPEG axes).
SCALAR_TASK_COMPONENT: dict[str, int | None] = {"denoise": 1, "dejpeg": 2, "sr": None}


@runtime_checkable
class Restorer(Protocol):
    """What every evaluation protocol needs from a model; see the module docstring."""

    name: str  # label in tables and plots
    kind: str  # what the checkpoint holds (module docstring)
    device: torch.device  # where restore() expects the image and returns the outputs

    def restore(self, image: Tensor, tasks: Tensor) -> Tensor: ...

    def flops(self, tasks: Tensor, height: int, width: int) -> int: ...

    def check_tasks(self, tasks: Tensor) -> Tensor:
        """``tasks`` as (T, 3), or a ``ValueError`` naming the model if it cannot restore them;
        protocols call it for all their task vectors before any image is read."""
        ...


def _check_image(image: Tensor, name: str) -> None:
    if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"{name}: restore() takes one image (1, 3, H, W), got {tuple(image.shape)}")


def _check_task_vectors(tasks: Tensor, name: str) -> Tensor:
    from cirlab.tasks import validate_task_levels

    if tasks.ndim == 1:
        tasks = tasks[None]
    validate_task_levels(tasks, f"{name}: tasks")
    if tasks.ndim != 2 or tasks.shape[0] == 0:
        raise ValueError(f"{name}: tasks must be (T >= 1, 3), got {tuple(tasks.shape)}")
    return tasks


@dataclass
class _Base:
    name: str
    kind: str
    net: nn.Module
    path: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    max_batch: int | None = 8

    def check_tasks(self, tasks: Tensor) -> Tensor:
        """``tasks`` as (T, 3) float, or a ``ValueError`` naming this model; no work done."""
        return _check_task_vectors(tasks, self.name)

    def describe(self) -> dict:
        """Plain record of the model for result files."""
        return {"name": self.name, "kind": self.kind, "path": self.path,
                "params": int(sum(p.numel() for p in self.net.parameters()))}


@dataclass
class NetworkRestorer(_Base):
    """CResMD, derived or fine-tuned TASNet: :func:`cirlab.inference.restore` / ``restore_flops``."""

    def restore(self, image: Tensor, tasks: Tensor) -> Tensor:
        from cirlab.inference import restore

        _check_image(image, self.name)
        tasks = self.check_tasks(tasks)
        return restore(self.net, image, tasks, max_batch=self.max_batch).clamp_(0, 1)

    def flops(self, tasks: Tensor, height: int, width: int) -> int:
        from cirlab.inference import restore_flops

        return int(restore_flops(self.net, self.check_tasks(tasks).to(self.device), height, width))


@dataclass
class SearchRestorer(_Base):
    """A TSNet/TASNet search state run as it is validated during the search (eval mode)."""

    def restore(self, image: Tensor, tasks: Tensor) -> Tensor:
        _check_image(image, self.name)
        tasks = self.check_tasks(tasks).to(self.device)
        outputs = []
        with torch.no_grad():
            for chunk in tasks.split(self.max_batch or len(tasks)):
                outputs.append(self.net(image.expand(len(chunk), -1, -1, -1), chunk))
        return torch.cat(outputs).clamp_(0, 1)

    def mask_state(self, tasks: Tensor):
        """The binary masks the eval-mode search forward applies to these tasks (MaskState)."""
        from cirlab.archs.flops import MaskState

        with torch.no_grad():
            specific, agnostic = self.net.importance(tasks.to(self.device))
        phi = self.net.phi.clone()
        masks = [(a > 0).expand(len(tasks), -1).clone() if shared else (s > 0)
                 for s, a, shared in zip(specific, agnostic, phi.tolist())]
        return MaskState(phi=phi, masks=masks)

    def flops(self, tasks: Tensor, height: int, width: int) -> int:
        from cirlab.archs.flops import masked_flops

        net = self.net
        state = self.mask_state(self.check_tasks(tasks))
        return int(masked_flops(state, net.nf, net.nb, height, width, net.supernet.in_nc, net.supernet.out_nc))


@dataclass
class HyperResRestorer(_Base):
    """HyperRes: ``hyperres_3d`` takes task vectors; ``hyperres`` / ``hyperres_dedicated`` take
    one scalar level (module docstring: which task vectors they accept)."""

    task: str | None = None
    level_scale: float = 255.0
    train_levels: list[float] = field(default_factory=list)

    @property
    def scalar(self) -> bool:
        return self.kind != "hyperres_3d"

    def check_tasks(self, tasks: Tensor) -> Tensor:
        tasks = super().check_tasks(tasks)
        if self.scalar:
            self.levels(tasks)  # raises for task vectors off this model's axis
        return tasks

    def levels(self, tasks: Tensor) -> Tensor:
        """Scalar models: the physical level (sigma, or JPEG quality) of each task vector (T,)."""
        from cirlab.tasks import NO_JPEG, task_to_physical

        component = SCALAR_TASK_COMPONENT.get(self.task or "")
        if component is None:
            raise ValueError(f"{self.name}: a scalar-level HyperRes for task {self.task!r} has no blur/noise/JPEG "
                             "task vector; score it with protocol=levels")
        others = [i for i in range(3) if i != component]
        off_axis = tasks[:, others].abs() > 1e-6
        if bool(off_axis.any()):
            row = int(off_axis.any(dim=1).nonzero()[0])
            raise ValueError(f"{self.name}: a scalar-level HyperRes ({self.task}) restores task vectors whose only "
                             f"non-zero component is {('blur', 'noise', 'jpeg')[component]}; got "
                             f"tasks[{row}]={[round(v, 4) for v in tasks[row].tolist()]}. Use protocol=levels, or a "
                             "grid on its axis")
        physical = task_to_physical(tasks.detach().double().cpu())[:, component]
        if self.task == "dejpeg" and bool((physical == NO_JPEG).any()):
            row = int((physical == NO_JPEG).nonzero()[0])
            raise ValueError(f"{self.name}: tasks[{row}] asks for no JPEG removal (t_jpeg < 1/92); a DeJPEG "
                             "HyperRes only has quality levels 10..100")
        return physical.float()

    def _conditions(self, tasks: Tensor) -> Tensor:
        if not self.scalar:
            return tasks.to(self.device, torch.float32)
        return (self.levels(tasks) / self.level_scale).to(self.device)

    def restore(self, image: Tensor, tasks: Tensor) -> Tensor:
        _check_image(image, self.name)
        tasks = self.check_tasks(tasks)
        conditions = self._conditions(tasks)
        outputs = []
        with torch.no_grad():
            for chunk in conditions.split(self.max_batch or len(conditions)):
                outputs.append(self.net(image.expand(len(chunk), -1, -1, -1), chunk))
        return torch.cat(outputs).clamp_(0, 1)

    def flops(self, tasks: Tensor, height: int, width: int) -> int:
        count = len(self.check_tasks(tasks))
        return hyperres_flops(self.net, count, height, width)


def hyperres_flops(net: nn.Module, count: int, height: int, width: int) -> int:
    """FLOPs of ``count`` HyperRes restorations of one image: ``count`` main-network passes plus
    generating ``count`` networks (0 for a dedicated ``MainNet``). Odd sizes count as padded."""
    height, width = height + height % 2, width + width % 2
    cost = net.flops(height, width, levels=count)
    return int(count * cost["main"] + cost["generation"])


# --------------------------------------------------------------------------- loading
def parse_spec(spec: str) -> tuple[str, str]:
    """``"NAME=PATH"`` -> (NAME, PATH); ``"PATH"`` -> ("", PATH). A ``=`` inside a path whose
    prefix names an existing file counts as part of the path."""
    name, sep, path = str(spec).partition("=")
    if not sep or Path(spec).exists():
        return "", str(spec)
    if not name.strip():
        raise ValueError(f"model spec {spec!r}: empty name before '='")
    return name.strip(), path


def _default_name(kind: str, path: Path) -> str:
    # a run's checkpoint sits in <run>/checkpoints/<file>; the run folder says more than "last"
    parent = path.parent.parent.name if path.parent.name == "checkpoints" else path.parent.name
    return f"{kind}:{parent}/{path.stem}" if parent else f"{kind}:{path.stem}"


def load_restorer(spec: str, device: str | torch.device = "cpu", *, max_batch: int | None = 8,
                  key: str = "models") -> Restorer:
    """The :class:`Restorer` of any cirlab checkpoint, given as ``PATH`` or ``NAME=PATH``.

    ``device``: where the network runs (and where ``restore`` expects the image). ``max_batch``:
    at most this many task vectors per forward pass (memory bound). ``key`` names the config key
    in error messages. Raises ``FileNotFoundError`` / :class:`cirlab.checkpoints.CheckpointError`
    naming the file for a missing or unreadable file, ``ValueError`` for a checkpoint of no
    restorable kind."""
    from cirlab.archs.cresmd import CResMDNet
    from cirlab.archs.hyperres import HyperResNet, MainNet
    from cirlab.archs.tasnet import TASNet
    from cirlab.archs.tasnet_search import TASNetSearchNet
    from cirlab.checkpoints import TASNET_FORMAT, CheckpointError, load_module, read_checkpoint, resolve_target

    name, path_text = parse_spec(spec)
    path = Path(path_text)
    label = f"{key}: {path_text!r}"
    device = torch.device(device)
    checkpoint = read_checkpoint(path, key=key, what="cirlab checkpoint (module checkpoint or tasnet.ckpt)")
    if checkpoint.get("format") == TASNET_FORMAT:
        net = TASNet.from_checkpoint(checkpoint).to(device).eval()
        return NetworkRestorer(name or _default_name("tasnet", path), "tasnet", net, str(path), device, max_batch)
    qualified = checkpoint.get("cirlab_module")
    if not qualified:
        raise CheckpointError(f"{label} is not a cirlab checkpoint (no 'cirlab_module' entry and no "
                              f"format={TASNET_FORMAT!r})")
    del checkpoint
    module = load_module(path, key=key)
    net = module.net
    module_name = resolve_target(qualified).rsplit(".", 1)[-1]
    if isinstance(net, TASNetSearchNet):
        kind = "tasnet_search" if net.sharing else "tsnet_search"
        return SearchRestorer(name or _default_name(kind, path), kind, net.to(device).eval(), str(path), device, max_batch)
    if isinstance(net, (HyperResNet, MainNet)):
        hp = module.hparams
        if module_name == "HyperRes3D":
            kind = "hyperres_3d"
        elif module_name == "HyperRes":
            kind = "hyperres_dedicated" if isinstance(net, MainNet) else "hyperres"
        else:
            raise ValueError(f"{label}: a HyperRes network in an unknown module {qualified!r}")
        restorer = HyperResRestorer(name or _default_name(kind, path), kind, net.to(device).eval(), str(path), device,
                                    max_batch, task=hp.get("task"), level_scale=float(hp.get("level_scale", 255.0)),
                                    train_levels=[float(v) for v in (hp.get("train_levels") or [])])
        return restorer
    if isinstance(net, (TASNet, CResMDNet)):
        kind = "tasnet_finetune" if module_name == "TASNetFinetune" else "cresmd"
        return NetworkRestorer(name or _default_name(kind, path), kind, net.to(device).eval(), str(path), device,
                               max_batch)
    raise ValueError(f"{label}: module {qualified!r} holds a {type(net).__name__}, which no evaluation restores")


__all__ = ["HyperResRestorer", "NetworkRestorer", "Restorer", "SearchRestorer", "hyperres_flops", "load_restorer",
           "parse_spec"]
