"""Image conventions shared by the metrics and the data: input checks, uint8 quantisation, BT.601 luma.

Tensors are image batches ``(B, C, H, W)``; float images are RGB (or grey) in ``[0, 1]``.

Conventions (the "paper" convention of :mod:`cirlab.metrics.fidelity`, BasicSR-like):

* **Quantisation** (:func:`quantize_uint8`): clamp to ``[0, 1]``, multiply by 255 and round with
  :func:`torch.round`, which rounds halves to even (``2.5 -> 2``, ``3.5 -> 4``), the same as
  :func:`numpy.round` and BasicSR's ``tensor2img`` (``(x * 255).round()``). MATLAB's
  ``im2uint8`` rounds halves away from zero; only exact ``k + 0.5`` values differ, which real
  network outputs essentially never hit.
* **Luma** (:func:`rgb_to_y_bt601`): ITU-R BT.601 "studio swing" Y as MATLAB ``rgb2ycbcr``::

      Y = 16 + 65.481 R + 128.553 G + 24.966 B     (R, G, B in [0, 1]; Y in [16, 235] on 0..255)

  The result stays floating point (BasicSR's ``to_y_channel`` convention); MATLAB's
  ``rgb2ycbcr`` on a uint8 image additionally rounds Y to uint8 (``round_output=True``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "BT601_Y_OFFSET",
    "BT601_Y_WEIGHTS",
    "check_batch",
    "check_pair",
    "quantize_uint8",
    "rgb_to_y_bt601",
]

#: MATLAB ``rgb2ycbcr`` luma weights for R, G, B in [0, 1], giving Y on the 0..255 scale.
BT601_Y_WEIGHTS = (65.481, 128.553, 24.966)
#: Luma offset on the 0..255 scale (black maps to 16, white to 235).
BT601_Y_OFFSET = 16.0


def check_batch(x: Tensor, name: str = "input") -> None:
    """Raise ``ValueError`` unless ``x`` has shape ``(B, C, H, W)`` with B, H, W > 0 (``TypeError`` if no tensor)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be an image batch of shape (B, C, H, W); got {x.ndim} dims, shape "
            f"{tuple(x.shape)} (add a batch dimension with x.unsqueeze(0) for a single image)"
        )
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")


def check_pair(pred: Tensor, target: Tensor) -> None:
    """Raise ``ValueError`` unless ``pred`` and ``target`` are ``(B, C, H, W)`` of equal shape."""
    check_batch(pred, "pred")
    check_batch(target, "target")
    if pred.shape != target.shape:
        raise ValueError(
            f"pred and target must have the same shape; got pred {tuple(pred.shape)} and "
            f"target {tuple(target.shape)}"
        )


def quantize_uint8(x: Tensor) -> Tensor:
    """Quantise a float image to 8 bits as saved to disk.

    The one uint8 quantiser of the package: the paper metrics score with it, and the synthetic
    degradations (:mod:`cirlab.data.degradations`, :mod:`cirlab.data.hyperres`) and evaluation
    sets store their images with it. Not differentiable (the input is detached).

    Args:
        x: float tensor of any shape, nominally in ``[0, 1]``; a ``uint8`` tensor is returned
            unchanged.

    Returns:
        ``torch.uint8`` tensor, same shape: ``round(clamp(x, 0, 1) * 255)`` with round half to
        even (:func:`torch.round`). NaN maps to 0.
    """
    if x.dtype == torch.uint8:
        return x
    if not x.is_floating_point():
        raise ValueError(f"quantize_uint8 expects a float or uint8 tensor, got {x.dtype}")
    x = torch.nan_to_num(x.detach(), nan=0.0)  # a new tensor: the rest is done in place
    return x.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)


def rgb_to_y_bt601(x: Tensor, data_range: float | None = None, round_output: bool = False) -> Tensor:
    """BT.601 luma Y of an RGB batch, as MATLAB ``rgb2ycbcr`` (studio swing, offset 16).

    Args:
        x: ``(B, 3, H, W)`` RGB. Float on the scale ``[0, data_range]``; ``uint8`` is taken
            on the 0..255 scale.
        data_range: scale of ``x`` and of the result: 1.0 (default for float input) gives
            Y in ``[16/255, 235/255]``; 255 (default for ``uint8`` input) gives Y in ``[16, 235]``.
        round_output: round Y to integers on the 0..255 scale, as MATLAB does for uint8 images
            (BasicSR and this package's paper metrics keep Y unrounded).

    Returns:
        ``(B, 1, H, W)`` Y on the same scale as the input; float64 for ``uint8`` input, otherwise
        the input's dtype.
    """
    check_batch(x, "x")
    if x.shape[1] != 3:
        raise ValueError(
            f"the Y channel (BT.601) needs RGB input with 3 channels; got {x.shape[1]} channels "
            f"(shape {tuple(x.shape)})"
        )
    if x.dtype == torch.uint8:
        x = x.to(torch.float64)
        data_range = 255.0 if data_range is None else float(data_range)
    elif not x.is_floating_point():
        raise ValueError(f"rgb_to_y_bt601 expects a float or uint8 tensor, got {x.dtype}")
    else:
        data_range = 1.0 if data_range is None else float(data_range)
    w = torch.tensor(BT601_Y_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    # Y on 0..255 from RGB in [0, 1], then back to the caller's scale.
    y = (x / data_range * w).sum(dim=1, keepdim=True) + BT601_Y_OFFSET
    if round_output:
        y = torch.round(y)
    return y * (data_range / 255.0)
