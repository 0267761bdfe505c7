"""No-reference quality: NIQE and BRISQUE from ``pyiqa`` as DDP-safe ``torchmetrics`` metrics.

pyiqa is the optional extra ``cirlab[iqa]`` (PolyForm Noncommercial, and ~50 packages that these
two metrics do not use); without it, constructing :class:`NIQE` or :class:`BRISQUE` raises
``ModuleNotFoundError`` naming the extra. The rest of this module works without pyiqa.

Lower is better for both. Input: ``(B, 3, H, W)`` RGB (or ``(B, 1, H, W)`` grey) float in
``[0, 1]`` (clamped before scoring). What pyiqa (checked on 0.1.16) does with it:

* **NIQE** (``pyiqa.create_metric("niqe")``, the original LIVE pristine model): RGB is reduced to
  luma with pyiqa's default ``color_space="yiq"``, i.e. ``0.299 R + 0.587 G + 0.114 B`` (the
  MATLAB ``rgb2gray`` weights, *not* the offset BT.601 Y of ``rgb2ycbcr``), scaled to 0..255 and
  rounded; the image is cropped to whole 96 x 96 blocks (so each side must be at least 96 px;
  481 x 321 CBSD68 images are scored on 480 x 288), features at two scales, float64.
* **BRISQUE** (``pyiqa.create_metric("brisque")``, LIVE ``allmodel`` SVR, version "original"):
  the same rounded 0..255 luma, NSS features at two scales, RBF SVR (gamma 0.05, rho -153.591).

The pyiqa network is created lazily on the first ``update`` (``import pyiqa`` is slow and only
happens then), moved to the input's device, and kept in a plain dict attribute, so it is not a
submodule: it never shows up in ``state_dict()``, ``parameters()`` or ``.to()`` of the metric or
of a model holding the metric, and it is dropped when the metric is pickled or copied.

Parameter files: pyiqa keeps them in ``$TORCH_HOME/hub/pyiqa/`` (``~/.cache/torch/hub/pyiqa/``)
and would download missing ones. These metrics never let pyiqa download implicitly: the file is
looked up at construction (``weights_dir`` if given, else :func:`iqa_cache_dir`) and handed to
pyiqa as ``pretrained_model_path``; a missing file raises :class:`RuntimeError` saying where to
put it, unless ``allow_download=True``. :func:`install_iqa_weights` copies the two files
(``niqe_modelparameters.mat``, ``brisque_svm_weights.pth``) from a folder into the cache. Note
pyiqa freezes its own cache path at import time; :func:`iqa_cache_dir` reads ``TORCH_HOME`` when called, and since the path is always
passed explicitly, pyiqa's frozen value is never used.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cirlab.metrics.base import PerImageMean
from cirlab.metrics.conventions import check_batch

__all__ = [
    "BRISQUE",
    "IQA_WEIGHT_FILES",
    "NIQE",
    "install_iqa_weights",
    "iqa_cache_dir",
    "require_pyiqa",
    "resolve_iqa_weights",
]

#: how to get pyiqa, which is not a core dependency (licence and size: README, "Licences").
IQA_EXTRA_HINT = "pip install 'cirlab[iqa]'"


def require_pyiqa(metric: str = "NIQE/BRISQUE") -> None:
    """Raise ``ModuleNotFoundError`` naming the ``iqa`` extra when pyiqa cannot be imported.

    Checked without importing pyiqa (a slow import), so metrics fail at construction, before any
    training or evaluation starts.
    """
    try:
        found = importlib.util.find_spec("pyiqa") is not None
    except (ImportError, ValueError):  # a parent of a broken install, or a None in sys.modules
        found = False
    if not found:
        raise ModuleNotFoundError(
            f"{metric} needs the optional dependency pyiqa, which is not installed: {IQA_EXTRA_HINT} "
            f"(pyiqa is licensed PolyForm Noncommercial 1.0.0)",
            name="pyiqa",
        )


#: pyiqa metric name -> parameter file name (as pyiqa names it in its cache).
IQA_WEIGHT_FILES: dict[str, str] = {
    "niqe": "niqe_modelparameters.mat",
    "brisque": "brisque_svm_weights.pth",
}


def iqa_cache_dir() -> Path:
    """pyiqa's parameter cache, ``<torch hub dir>/pyiqa`` (``$TORCH_HOME/hub/pyiqa``), read now."""
    return Path(torch.hub.get_dir()) / "pyiqa"


def install_iqa_weights(source_dir: str | Path, target_dir: str | Path | None = None) -> list[Path]:
    """Copy the NIQE and BRISQUE parameter files into pyiqa's cache, for offline machines.

    Args:
        source_dir: folder holding ``niqe_modelparameters.mat`` and ``brisque_svm_weights.pth``.
        target_dir: destination; default :func:`iqa_cache_dir` (created if needed).

    Returns:
        The destination paths, in the order of :data:`IQA_WEIGHT_FILES`.

    Raises:
        FileNotFoundError: if a file is missing from ``source_dir`` (nothing is copied then).
    """
    source_dir = Path(source_dir)
    sources = [source_dir / name for name in IQA_WEIGHT_FILES.values()]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"IQA parameter files not found: {', '.join(missing)}")
    target = Path(target_dir) if target_dir is not None else iqa_cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources:
        dst = target / src.name
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def resolve_iqa_weights(metric: str, weights_dir: str | Path | None = None) -> Path:
    """Path of the parameter file of ``metric`` (``"niqe"`` or ``"brisque"``); never downloads.

    Looks in ``weights_dir`` when given, otherwise in :func:`iqa_cache_dir`.

    Raises:
        RuntimeError: the file is not there; the message names the file and where to put it.
    """
    fname = IQA_WEIGHT_FILES[metric]
    folder = Path(weights_dir) if weights_dir is not None else iqa_cache_dir()
    path = folder / fname
    if path.is_file():
        return path
    where = f"weights_dir={str(folder)!r}" if weights_dir is not None else f"pyiqa's cache {folder}"
    raise RuntimeError(
        f"{metric.upper()} needs its parameter file {fname!r}, which is not in {where}. "
        f"Copy it to {folder / fname} (cirlab.metrics.install_iqa_weights(<folder with the file>) "
        f"copies it into pyiqa's cache $TORCH_HOME/hub/pyiqa), or pass weights_dir=<folder with "
        f"the file>, or allow_download=True on a machine with internet."
    )


class _PyiqaNoReference(PerImageMean):
    """Mean of a pyiqa no-reference score over images; the pyiqa net is held outside the module tree."""

    higher_is_better = False
    _pyiqa_name = ""
    _min_side = 1

    def __init__(
        self,
        weights_dir: str | Path | None = None,
        allow_download: bool = False,
        **kwargs: Any,
    ) -> None:
        require_pyiqa(self._pyiqa_name.upper())
        super().__init__(**kwargs)
        self.allow_download = allow_download
        try:
            self.weights_path: Path | None = resolve_iqa_weights(self._pyiqa_name, weights_dir)
        except RuntimeError:
            if not allow_download:
                raise
            self.weights_path = None  # downloaded by pyiqa into iqa_cache_dir() on first update
        # Plain dict, not a submodule: invisible to state_dict()/parameters()/.to().
        self._iqa_holder: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_iqa_holder"] = {}  # do not pickle/copy the network; rebuilt lazily
        return state

    def _download(self) -> Path:
        from pyiqa.archs.arch_util import get_url_from_name
        from pyiqa.utils.download_util import load_file_from_url

        fname = IQA_WEIGHT_FILES[self._pyiqa_name]
        return Path(load_file_from_url(get_url_from_name(fname), model_dir=str(iqa_cache_dir())))

    def _network(self, device: torch.device) -> torch.nn.Module:
        net = self._iqa_holder.get("net")
        if net is None:
            require_pyiqa(self._pyiqa_name.upper())
            import pyiqa  # slow import, only when first needed

            if self.weights_path is None:
                self.weights_path = self._download()
            net = pyiqa.create_metric(
                self._pyiqa_name, device=torch.device("cpu"), pretrained_model_path=str(self.weights_path)
            )
            net.eval()
            self._iqa_holder["net"] = net
            self._iqa_holder["device"] = torch.device("cpu")
        if self._iqa_holder["device"] != device:
            net.to(device)
            self._iqa_holder["device"] = device
        return net

    def per_image(self, preds: Tensor, target: Tensor | None = None) -> Tensor:
        """``(B,)`` scores of ``(B, 3|1, H, W)`` float images in [0, 1]; ``target`` is ignored."""
        check_batch(preds, "preds")
        if preds.shape[1] not in (1, 3):
            raise ValueError(
                f"{self._pyiqa_name.upper()} needs RGB (3 channels) or grey (1 channel) images; "
                f"got shape {tuple(preds.shape)}"
            )
        if not preds.is_floating_point():
            raise ValueError(f"{self._pyiqa_name.upper()} expects float images in [0, 1], got {preds.dtype}")
        if min(preds.shape[-2:]) < self._min_side:
            raise ValueError(
                f"{self._pyiqa_name.upper()} needs images of at least {self._min_side} px per side, "
                f"got {tuple(preds.shape)}"
            )
        x = preds.detach().float().clamp(0.0, 1.0)
        net = self._network(x.device)
        with torch.no_grad():
            scores = net(x)
        return scores.reshape(-1)

    def extra_repr(self) -> str:
        return f"weights_path={str(self.weights_path)!r}"


class NIQE(_PyiqaNoReference):
    """Mean NIQE over images (pyiqa ``"niqe"``, original LIVE model); lower is better.

    Args:
        weights_dir: folder with ``niqe_modelparameters.mat``; default pyiqa's cache
            (:func:`iqa_cache_dir`).
        allow_download: if the file is missing, let pyiqa download it (needs internet) instead
            of raising ``RuntimeError``.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(preds[, target])``: ``(B, 3, H, W)`` RGB float in [0, 1], H and W >= 96 (scored on
    the largest multiple of 96 in each direction, on 0.299 R + 0.587 G + 0.114 B luma);
    ``target`` is accepted and ignored so it can sit in a ``MetricCollection`` with full-reference metrics.
    """

    _pyiqa_name = "niqe"
    _min_side = 96


class BRISQUE(_PyiqaNoReference):
    """Mean BRISQUE over images (pyiqa ``"brisque"``, LIVE SVR); lower is better.

    Args:
        weights_dir: folder with ``brisque_svm_weights.pth``; default pyiqa's cache
            (:func:`iqa_cache_dir`).
        allow_download: if the file is missing, let pyiqa download it (needs internet) instead
            of raising ``RuntimeError``.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    ``update(preds[, target])``: ``(B, 3, H, W)`` RGB float in [0, 1] (luma as for NIQE);
    ``target`` is accepted and ignored.
    """

    _pyiqa_name = "brisque"
    _min_side = 16
