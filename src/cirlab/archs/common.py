"""Small helpers shared by the networks of :mod:`cirlab.archs`."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def pad_to_even(x: Tensor) -> Tensor:
    """``x`` (..., H, W) padded bottom/right by one replicated row/column where H/W is odd;
    ``x`` itself when both are even. The stride-2 first convolution of these networks needs
    even sizes; callers crop the output back to (H, W)."""
    height, width = x.shape[-2:]
    if height % 2 or width % 2:
        return F.pad(x, (0, width % 2, 0, height % 2), mode="replicate")
    return x


def init_scaled_kaiming(modules: list[nn.Module], scale: float = 0.1) -> None:
    """The reference initialisation of CResMD and HyperRes: every Conv2d and Linear in
    ``modules`` (recursively) gets Kaiming normal weights (fan_in, a=0) times ``scale`` and a
    zero bias."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_in")
                m.weight.data.mul_(scale)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


__all__ = ["init_scaled_kaiming", "pad_to_even"]
