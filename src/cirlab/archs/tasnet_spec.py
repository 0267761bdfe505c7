"""The architecture of a derived TASNet: which feature maps are shared and which channels each
map keeps (docs/method.md section 3). Plain data, no torch modules.

A TASNet has CResMD's ``N = 2 nb + 3`` searchable feature maps (:func:`cirlab.archs.flops.
searchable_maps`; JSON ``index`` n = 1..N, code uses k = n - 1). The first ``shared_maps`` of
them are *shared* (computed once per image, task-agnostic); the rest are task-specific. A map's
channels (indices into the ``nf`` channels of the supernetwork) are either a fixed sorted list
(``selection: "fixed"``, required for shared maps) or chosen per task by a controller
(``selection: "controller"``, ``channels: null``).

The architecture is a JSON-able dict (``architecture.json`` adds an informative ``summary``)::

    {"format": "cirlab.tasnet", "version": 1, "in_nc": 3, "nf": 64, "nb": 32, "cond_dim": 3,
     "controller_hidden": 32, "shared_maps": S,
     "maps": [{"index": 1, "name": "conv_first", "shared": true, "selection": "fixed",
               "channels": [0, 3, ...]},
              {"index": 9, "name": "recon_trunk.3.out", "shared": false, "selection": "controller",
               "channels": null}, ...]}          # N entries, shared ones first
"""

from __future__ import annotations

from collections.abc import Mapping

from cirlab.archs.flops import searchable_maps

FORMAT = "cirlab.tasnet"  # = cirlab.checkpoints.TASNET_FORMAT (not imported: loading a TASNet stays light)
VERSION = 1
SELECTIONS = ("fixed", "controller")


def receptive_radius(nb: int) -> int:
    """How far (pixels, full resolution) an output pixel of a CResMD-layout network sees.

    ``conv_first`` (3x3, stride 2) reads +-1 pixel, each of the ``2 nb`` trunk convs and ``upconv``
    +-1 half-resolution pixel (2 pixels), ``HRconv`` and ``conv_last`` +-1 pixel each, plus the
    rounding of the stride-2 grid: ``4 nb + 6`` (134 for nb = 32). Tiles whose borders lie at
    least this far from the pixels they keep reproduce the untiled output.
    """
    return 4 * nb + 6


def make_architecture(nf: int, nb: int, cond_dim: int = 3, in_nc: int = 3, controller_hidden: int = 32,
                      shared_maps: int = 0, channels: list[list[int] | None] | None = None) -> dict:
    """An architecture dict (module docstring). ``channels[k]`` is the fixed channel list of map
    k (None: a controller picks them per task; only allowed for task-specific maps); default:
    every map fixed at all ``nf`` channels (CResMD with its first ``shared_maps`` maps shared)."""
    specs = searchable_maps(nb, nf)
    if channels is None:
        channels = [list(range(nf))] * len(specs)
    if len(channels) != len(specs):
        raise ValueError(f"expected {len(specs)} channel entries (one per map), got {len(channels)}")
    maps = []
    for k, (spec, chosen) in enumerate(zip(specs, channels)):
        shared = k < shared_maps
        maps.append({"index": spec.index, "name": spec.name, "shared": shared,
                     "selection": "controller" if chosen is None else "fixed",
                     "channels": None if chosen is None else sorted(int(c) for c in chosen)})
    arch = {"format": FORMAT, "version": VERSION, "in_nc": in_nc, "nf": nf, "nb": nb, "cond_dim": cond_dim,
            "controller_hidden": controller_hidden, "shared_maps": shared_maps, "maps": maps}
    return validate_architecture(arch)


def validate_architecture(architecture: Mapping) -> dict:
    """Check an architecture dict and return its core part (a deep copy, extra keys dropped)."""
    arch = architecture
    if not isinstance(arch, dict):
        # Hydra instantiates TASNet with a DictConfig architecture (TASNetFinetune's net config
        # and its checkpoint hparams); omegaconf is imported only then, so loading stays light
        from omegaconf import DictConfig, OmegaConf

        if isinstance(arch, DictConfig):
            arch = OmegaConf.to_container(arch, resolve=True)
    if not isinstance(arch, Mapping):
        raise ValueError(f"a TASNet architecture must be a dict, got {type(arch).__name__}")
    if arch.get("format") != FORMAT:
        raise ValueError(f"not a TASNet architecture (format {arch.get('format')!r}, expected {FORMAT!r})")
    if int(arch.get("version", -1)) > VERSION:
        raise ValueError(f"TASNet architecture version {arch.get('version')} is newer than this code ({VERSION})")
    core = {key: arch[key] for key in ("in_nc", "nf", "nb", "cond_dim", "controller_hidden", "shared_maps")}
    for key, value in core.items():
        if not isinstance(value, int) or value < 0 or (key != "shared_maps" and value < 1):
            raise ValueError(f"architecture.{key}={value!r} must be a positive integer")
    nf, nb = core["nf"], core["nb"]
    specs = searchable_maps(nb, nf)
    maps = arch.get("maps")
    if not isinstance(maps, (list, tuple)) or len(maps) != len(specs):
        raise ValueError(f"architecture.maps must list the {len(specs)} maps of a CResMD with nb={nb}")
    if core["shared_maps"] > len(specs):
        raise ValueError(f"architecture.shared_maps={core['shared_maps']} exceeds the {len(specs)} maps")
    clean = []
    for k, (spec, entry) in enumerate(zip(specs, maps)):
        where = f"architecture.maps[{k}] ({spec.name})"
        shared, selection, chosen = bool(entry["shared"]), entry["selection"], entry.get("channels")
        if shared != (k < core["shared_maps"]):
            raise ValueError(f"{where}: shared={shared} but the first {core['shared_maps']} maps are the shared ones")
        if selection not in SELECTIONS:
            raise ValueError(f"{where}: selection {selection!r} must be one of {SELECTIONS}")
        if selection == "controller":
            if shared:
                raise ValueError(f"{where}: a shared map has fixed channels, not a controller")
            chosen = None
        else:
            if chosen is None:
                raise ValueError(f"{where}: a fixed map needs its channel list")
            chosen = [int(c) for c in chosen]
            if sorted(set(chosen)) != chosen or any(c < 0 or c >= nf for c in chosen):
                raise ValueError(f"{where}: channels must be distinct, sorted indices in 0..{nf - 1}")
        clean.append({"index": spec.index, "name": spec.name, "shared": shared, "selection": selection, "channels": chosen})
    return {"format": FORMAT, "version": VERSION, **core, "maps": clean}


def fixed_channels(architecture: Mapping) -> list[tuple[int, ...] | None]:
    """Per map k of a validated architecture: its fixed channels, or None where a controller
    picks them per task."""
    return [None if m["selection"] == "controller" else tuple(m["channels"]) for m in architecture["maps"]]


__all__ = ["FORMAT", "SELECTIONS", "VERSION", "fixed_channels", "make_architecture", "receptive_radius",
           "validate_architecture"]
