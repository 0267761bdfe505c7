"""CResMD: the controllable residual network of He et al. (ECCV 2020), 3-D task vector version.

This is the supernetwork of the TASNet search (docs/method.md section 2). Parameter names follow
the reference implementation (``conv_first``, ``recon_trunk.{i}.conv1/conv2/local_scale``,
``upconv``, ``HRconv``, ``conv_last``, ``global_scale``) so its released state_dict loads with
``strict=True``. The reference configuration (nf=64, nb=32, cond_dim=3) has 2,559,759
parameters.

Data flow for an image x (B, 3, H, W) in [0, 1] and a task vector t (B, cond_dim) in [0, 1]:

    f_0 = conv_first(x)                           stride 2: the trunk runs at (H/2, W/2)
    f_i = f_{i-1} + conv2(relu(conv1(f_{i-1}))) * local_scale_i(t)      i = 1..nb
    y   = conv_last(relu(HRconv(relu(shuffle(upconv(f_nb))))))          back at (H, W)
    out = x + y * global_scale(t)

There is no long skip around the trunk (the reference has none). Inputs with odd H or W are
padded (replicate) to even size and the output is cropped back, so any size works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cirlab.archs.common import init_scaled_kaiming, pad_to_even


class ControllableResidualBlock(nn.Module):
    """``f + conv2(relu(conv1(f))) * local_scale(t)``; ``local_scale`` is Linear(cond_dim, nf)."""

    def __init__(self, nf: int = 64, cond_dim: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.local_scale = nn.Linear(cond_dim, nf, bias=True)
        init_scaled_kaiming([self.conv1, self.conv2, self.local_scale])

    def forward(self, feature: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """feature (B, nf, h, w), cond (B, cond_dim) -> (B, nf, h, w)."""
        residual = self.conv2(F.relu(self.conv1(feature)))
        return feature + residual * self.local_scale(cond)[:, :, None, None]


class CResMDNet(nn.Module):
    """CResMD network (plain ``nn.Module``; no training logic).

    Args:
        in_nc: input channels (3 for RGB).
        out_nc: output channels; must equal ``in_nc`` (the output is a residual on the input).
        nf: trunk width (64 in the reference).
        nb: number of controllable residual blocks (32 in the reference).
        cond_dim: task-vector size (3: blur, noise, JPEG).
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 32, cond_dim: int = 3) -> None:
        super().__init__()
        if in_nc != out_nc:
            raise ValueError(f"CResMDNet adds its output to the input: in_nc={in_nc} must equal out_nc={out_nc}")
        for name, value in (("nf", nf), ("nb", nb), ("cond_dim", cond_dim)):
            if value < 1:
                raise ValueError(f"model.net.{name}={value} must be >= 1")
        self.in_nc, self.out_nc, self.nf, self.nb, self.cond_dim = in_nc, out_nc, nf, nb, cond_dim
        self.global_scale = nn.Linear(cond_dim, out_nc, bias=True)
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 2, 1, bias=True)
        self.recon_trunk = nn.ModuleList(ControllableResidualBlock(nf, cond_dim) for _ in range(nb))
        self.upconv = nn.Conv2d(nf, nf * 4, 3, 1, 1, bias=True)
        self.pixel_shuffle = nn.PixelShuffle(2)
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1, bias=True)
        init_scaled_kaiming([self.conv_first, self.upconv, self.HRconv, self.conv_last, self.global_scale])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Restore ``x`` (B, in_nc, H, W) in [0, 1] under task vectors ``cond`` (B, cond_dim).

        Returns (B, out_nc, H, W), not clamped. Any H, W >= 1.
        """
        if x.ndim != 4 or x.shape[1] != self.in_nc:
            raise ValueError(f"expected input of shape (B, {self.in_nc}, H, W), got {tuple(x.shape)}")
        if cond.ndim != 2 or cond.shape != (x.shape[0], self.cond_dim):
            raise ValueError(f"expected task vectors of shape ({x.shape[0]}, {self.cond_dim}), got {tuple(cond.shape)}")
        height, width = x.shape[-2:]
        padded = pad_to_even(x)
        feature = self.conv_first(padded)
        for block in self.recon_trunk:
            feature = block(feature, cond)
        out = F.relu(self.pixel_shuffle(self.upconv(feature)))
        out = self.conv_last(F.relu(self.HRconv(out)))
        out = padded + out * self.global_scale(cond)[:, :, None, None]
        return out[..., :height, :width]
