"""Turn a TASNet search checkpoint into a standalone TASNet (docs/method.md section 3).

:func:`derive_checkpoint` writes ``tasnet.ckpt`` (:meth:`cirlab.archs.tasnet.TASNet.save`:
architecture, weights and provenance; plain tensors and containers only),
``architecture.json`` (the architecture plus a readable summary: shared depth, channels per map
on the workload grid, FLOPs per inference against CResMD) and ``architecture.png``.

Derivation (:func:`derive`), from the search network's state:

* [choice] the sharing decision is recomputed from the final weights over the search's declared
  task set (``TASNetSearchNet.decide``: the evaluation grid plus task vectors drawn from the
  training distribution, kept in the checkpoint): z^a is the mean of z^s over that set, eta and
  phi follow (eqs. 5-7). It does not depend on the last training batch. A search with
  ``decision="batch"`` (and a checkpoint from before declared sets) keeps its stored state;
* phi is frozen: its first S maps are the shared prefix;
* a shared map keeps the channels ``{c : z^a_c > 0}`` of the EMA importance ``z_agnostic``,
  physically: the weights of the convolution producing it are sliced on their output rows, and
  on their input columns where the input map is shared too; a shared block's ``agnostic_scale``
  row is sliced the same way;
* every task-specific map keeps its controller (weights copied) and full-width weights, sliced
  per task at inference; rows of a task-specific conv that read a shared map are sliced to that
  map's channels;
* the controllers of shared maps, the ``local_scale`` of shared blocks, the unused
  ``agnostic_scale`` rows and the search statistics are dropped.

TASNet-A (Table 4: TASNet's architecture trained with absolute ground truth): [choice]
``derive_checkpoint(..., weights=<absolute-GT CResMD checkpoint>)`` (``cirlab-derive --weights``)
takes the architecture (decision, kept channels, controllers) from the search and the weights
from that CResMD (the shared blocks' scales become its ``local_scale(0.5)``, as at the start of
a search); ``experiment=tasnet_a_paper`` then fine-tunes it with absolute ground truth. No
weight of TASNet-A is then trained with relative ground truth; only the architecture, which is
TASNet's by definition, comes from the relative-GT search.

The derived network computes what ``TASNetSearchNet.search_forward`` computes in eval mode
(stored phi, EMA z^a, per-task gates), up to float summation order (the tests check 1e-5).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from cirlab.archs.tasnet import TASNet
from cirlab.archs.tasnet_spec import FORMAT, make_architecture
from cirlab.tasks import HD

log = logging.getLogger(__name__)

def load_search_net(path: str | Path):
    """The ``TASNetSearchNet`` of a ``TASNetSearch`` checkpoint (network hyper-parameters from
    the checkpoint's ``hyper_parameters.net``; weights and buffers from ``net.*``)."""
    from cirlab.archs.tasnet_search import TASNetSearchNet
    from cirlab.checkpoints import CheckpointError, net_state_dict, read_checkpoint, resolve_target

    path = Path(path)
    what = "TASNet search checkpoint (checkpoints/last.ckpt of a model=tasnet_search run)"
    checkpoint = read_checkpoint(path, key="--ckpt", what=what)
    label = f"--ckpt={str(path)!r}"
    if checkpoint.get("format") == FORMAT:
        raise CheckpointError(f"{label} is already a derived TASNet checkpoint, not a {what}")
    hparams = checkpoint.get("hyper_parameters")
    config = dict((hparams.get("net") if isinstance(hparams, dict) else None) or {})
    target = resolve_target(str(config.pop("_target_", "")))
    if not target.endswith("TASNetSearchNet"):
        raise CheckpointError(f"{label} is not a {what}: its network is {target or 'not recorded'!r}")
    state = net_state_dict(checkpoint, path=path, key="--ckpt")
    if "decision" not in config and "decision_tasks" not in state:
        config["decision"] = "batch"  # searched before declared task sets: its stored decision is its own
    try:
        net = TASNetSearchNet(**{k: v for k, v in config.items() if not k.startswith("_")})
        net.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as error:  # hyper-parameters or weights that do not fit
        raise CheckpointError(f"{label}: a damaged or incompatible {what} ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:300] if str(error) else ''})") from None
    return net.eval()


def shared_channels(search_net) -> list[list[int]]:
    """The task-agnostic channels ``{c : z^a_c > 0}`` of each shared map (the frozen phi prefix)."""
    phi = search_net.phi.detach().cpu()
    shared = int(phi.sum())
    if not torch.equal(phi, torch.arange(phi.numel()) < shared):
        raise ValueError(f"phi must be a prefix (ones then zeros), got {phi.int().tolist()}")
    if shared and not bool(search_net.ema_started):
        raise ValueError("the search state has shared maps but no task-agnostic importance yet (z_agnostic unset)")
    z = search_net.z_agnostic.detach().cpu()
    return [torch.nonzero(z[k] > 0).flatten().tolist() for k in range(shared)]


def decision_summary(search_net) -> dict:
    """How the frozen decision was taken and how close each map's agreement sits to gamma."""
    from cirlab.archs.flops import searchable_maps

    declared = search_net.decision == "declared"
    names = [spec.name for spec in searchable_maps(search_net.nb, search_net.nf)]
    shared = int(search_net.phi.sum())
    return {"rule": search_net.decision, "gamma": search_net.gamma,
            "tasks": int(search_net.decision_tasks.shape[0]) if declared else None,
            "shared_maps": shared,
            "agreement": {name: round(float(r), 4) for name, r in zip(names, search_net.agreement.tolist())}
            if declared else None,
            "prefix_end": _prefix_end(search_net, names, shared, declared)}


def _prefix_end(search_net, names: list[str], shared: int, declared: bool) -> dict | None:
    """The first task-specific map (None when every map is shared): its name, its agreement (eq. 6
    without gamma; declared rule only) and whether its task-agnostic selection is empty, in which
    case eq. 6 is false for any gamma and the prefix ends because the map was pruned away, not
    because the tasks disagree."""
    if shared == len(names):
        return None
    empty = not bool((search_net.z_agnostic[shared] > 0).any()) if bool(search_net.ema_started) else None
    return {"map": names[shared], "agreement": round(float(search_net.agreement[shared]), 4) if declared else None,
            "empty": empty}


def warn_about_shape(decision: dict) -> list[str]:
    """Log (and return) a warning for a decision without TASNet's shape: every map shared (no
    task-specific part; only ``global_scale(t)`` after the last convolution follows the task), or a
    prefix that ends at a map whose task-agnostic selection is empty (an empty map counts as
    disagreeing, docs/method.md section 3)."""
    messages = []
    end = decision["prefix_end"]
    if end is None:
        messages.append("the search shared every map: the derived TASNet has no task-specific part (its output "
                        "follows the task only through global_scale(t)); at this scale the tasks' channel "
                        "selections agree above gamma everywhere")
    elif end["empty"]:
        messages.append(f"the shared prefix ends at {end['map']}, a map that the search switched off for the "
                        "task-agnostic selection (empty, so eq. 6 counts it as disagreeing): the prefix length "
                        "comes from pruning, not from the tasks' disagreement")
    for message in messages:
        log.warning(message)
    return messages


@torch.no_grad()
def derive(search_net) -> TASNet:
    """The derived TASNet of a ``TASNetSearchNet`` (module docstring): with ``decision="declared"``
    the decision is first recomputed over the declared task set (stored back into ``search_net``,
    whose eval output the derived network then reproduces)."""
    if search_net.decision == "declared":
        search_net.decide()
    sup = search_net.supernet
    nf, nb, n_maps = search_net.nf, search_net.nb, search_net.num_maps
    kept = shared_channels(search_net)
    shared = len(kept)
    channels: list[list[int] | None] = [*kept, *([None] * (n_maps - shared))]
    hidden = search_net.controllers[0].fc1.out_features
    arch = make_architecture(nf, nb, search_net.cond_dim, sup.in_nc, hidden, shared_maps=shared, channels=channels)
    net = TASNet(arch)

    full = list(range(nf))
    rows_of = [c if c is not None else full for c in channels]  # physical rows of each map

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    def conv_weights(module, out_rows: list[int], in_cols: list[int] | None) -> dict[str, torch.Tensor]:
        weight = module.weight.index_select(0, index(out_rows))
        if in_cols is not None:
            weight = weight.index_select(1, index(in_cols))
        return {"weight": weight.clone(), "bias": module.bias.index_select(0, index(out_rows)).clone()}

    state: dict[str, torch.Tensor] = {}

    def put(prefix: str, values: dict[str, torch.Tensor]) -> None:
        state.update({f"{prefix}.{k}": v for k, v in values.items()})

    put("conv_first", conv_weights(sup.conv_first, rows_of[0], None))
    for i, block in enumerate(sup.recon_trunk):
        prev, inner, out = 2 * i, 2 * i + 1, 2 * i + 2
        put(f"recon_trunk.{i}.conv1", conv_weights(block.conv1, rows_of[inner], rows_of[prev]))
        put(f"recon_trunk.{i}.conv2", conv_weights(block.conv2, rows_of[out], rows_of[inner]))
        if out < shared:
            state[f"recon_trunk.{i}.agnostic_scale"] = search_net.agnostic_scale[i].index_select(0, index(rows_of[out])).clone()
        else:
            put(f"recon_trunk.{i}.local_scale", {k: v.clone() for k, v in block.local_scale.state_dict().items()})
    up, hr = 2 * nb + 1, 2 * nb + 2
    up_rows = [4 * c + j for c in rows_of[up] for j in range(4)]
    put("upconv", conv_weights(sup.upconv, up_rows, rows_of[2 * nb]))
    put("HRconv", conv_weights(sup.HRconv, rows_of[hr], rows_of[up]))
    put("conv_last", conv_weights(sup.conv_last, list(range(sup.out_nc)), rows_of[hr]))
    put("global_scale", {k: v.clone() for k, v in sup.global_scale.state_dict().items()})
    for k in range(shared, n_maps):
        put(f"controllers.{k}", {key: v.clone() for key, v in search_net.controllers[k].state_dict().items()})
    net.load_state_dict(state, strict=True)
    return net.eval()


@torch.no_grad()
def summarize(net: TASNet, grid: str | list = "cresmd27", height: int = HD[0], width: int = HD[1]) -> dict:
    """Readable summary on a task grid: shared depth, channels per map (count for a fixed map,
    min/mean/max over the grid's tasks for a controller map), FLOPs per inference (shared prefix
    amortised over the grid) against CResMD's. Same keys as ``TASNetSearch.architecture()``,
    so ``cirlab.figures.architecture_figure`` draws it."""
    from cirlab.archs.flops import cresmd_flops
    from cirlab.tasks import level_grid

    tasks = level_grid(grid)
    cost = net.cost(tasks, height, width)
    state = net.mask_state(tasks)
    reference = cresmd_flops(net.nf, net.nb, height, width, tasks=len(tasks))
    maps = []
    for entry, mask in zip(net.architecture["maps"], state.masks):
        counts = mask.float().sum(dim=1)
        maps.append({"name": entry["name"], "index": entry["index"], "shared": entry["shared"],
                     "selection": entry["selection"], "channels": int(counts[0]) if entry["selection"] == "fixed" else None,
                     "channels_mean": float(counts.mean()), "channels_min": int(counts.min()),
                     "channels_max": int(counts.max()), "channels_full": net.nf})
    convs = net.num_maps + 1
    return {"tasks": len(tasks), "grid": grid, "height": height, "width": width, "shared_maps": net.shared_maps,
            "num_maps": net.num_maps, "shared_layer_fraction": net.shared_maps / convs,
            "flops_total": cost["total"], "flops_shared": cost["shared"],
            "flops_per_inference": cost["total"] / len(tasks),
            "cresmd_flops_per_inference": reference / len(tasks), "flops_ratio": cost["total"] / reference,
            "parameters": sum(p.numel() for p in net.parameters()), "maps": maps}


@dataclass
class Derived:
    """What :func:`derive_checkpoint` wrote."""

    net: TASNet
    ckpt_path: Path
    json_path: Path
    figure_path: Path | None
    summary: dict


def use_cresmd_weights(search_net, path: str | Path) -> None:
    """Replace the supernetwork's weights by those of a cirlab CResMD checkpoint (TASNet-A); the
    shared blocks' scales restart at that CResMD's ``local_scale(0.5)``."""
    from cirlab.checkpoints import net_state_dict, read_checkpoint

    weights = net_state_dict(read_checkpoint(path, key="--weights", what="CResMD checkpoint"), path=path, key="--weights")
    try:
        search_net.supernet.load_state_dict(weights, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--weights {path}: not a CResMD of the search's shape (nf {search_net.nf}, "
                         f"nb {search_net.nb}): {str(error).splitlines()[0]}") from None
    search_net.reset_agnostic_scales()


def derive_checkpoint(search_ckpt: str | Path, out_dir: str | Path, grid: str | list = "cresmd27",
                      height: int = HD[0], width: int = HD[1], figure: bool = True,
                      weights: str | Path | None = None) -> Derived:
    """Derive from a search checkpoint and write ``tasnet.ckpt``, ``architecture.json`` (and
    ``architecture.png``) into ``out_dir``. ``weights``: a CResMD checkpoint whose weights the
    derived architecture takes instead of the search's (TASNet-A, module docstring)."""
    from cirlab.utils.files import atomic_path

    search_ckpt, out_dir = Path(search_ckpt), Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"output folder {str(out_dir)!r} is an existing file")
    search_net = load_search_net(search_ckpt)
    if weights is not None:
        use_cresmd_weights(search_net, weights)
    net = derive(search_net)
    summary = summarize(net, grid, height, width)
    decision = decision_summary(search_net)
    warn_about_shape(decision)
    meta = {"derived_from": str(search_ckpt), "summary": summary, "decision": decision,
            "weights_from": str(weights) if weights is not None else str(search_ckpt)}
    ckpt_path = net.save(out_dir / "tasnet.ckpt", meta=meta)
    json_path = out_dir / "architecture.json"
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps({**net.architecture, "derived_from": str(search_ckpt), "weights_from": meta["weights_from"],
                                   "decision": decision, "summary": summary}, indent=1) + "\n")
    figure_path = None
    if figure:
        import matplotlib.pyplot as plt

        from cirlab.figures import architecture_figure, save_figure_atomically

        fig = architecture_figure(summary, title="derived TASNet")
        figure_path = out_dir / "architecture.png"
        save_figure_atomically(fig, figure_path)
        plt.close(fig)
    return Derived(net, ckpt_path, json_path, figure_path, summary)
