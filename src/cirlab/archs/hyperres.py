"""HyperRes: a hypernetwork that generates a restoration network for any degradation level.

Written from docs/method.md section 5 and the paper (arXiv 2206.05970, section 3). Two plain
``nn.Module``s share one topology, the *main network*::

    f0 = conv1(x)                                  3x3, stride 2: the trunk runs at (H/2, W/2)
    f  = f0;  f <- f + conv_b(relu(conv_a(f)))     nb residual blocks (16), no normalisation
    f  = conv2(f) + f0                             long skip over the trunk
    y  = conv5(relu(conv4(relu(shuffle(conv3(f))))))   conv3: nf -> 4 nf, PixelShuffle(2)

All convolutions are 3x3 with padding 1 and bias; there is no image-level residual.

* :class:`MainNet` holds ordinary weights: it is one generated network, and the *dedicated
  baseline* (a network of the same architecture trained at one level). The reference shape
  (nf 64, nb 16, RGB) has 1,406,787 parameters.
* :class:`HyperResNet` keeps the head (``conv1``) and tail (``conv2`` .. ``conv5``) as ordinary
  weights shared by every generated network, and replaces the 2 nb trunk convolutions by *meta
  blocks* (:class:`MetaConv`): the weights and bias of trunk conv j are an affine function of the
  level vector c in R^D::

      theta_j(c) = B_j + sum_d c_d W_j[d]        (a ``Linear(D, out * (in * 9 + 1))``)

  D = 1 is the paper (c = level / 255, a scalar); D = 3 is this project's task-vector variant
  (c = t in [0, 1]^3, docs/method.md section 5 "beyond the paper"). The generated vector's layout is
  the reference's: the first ``out * in * 9`` entries are the weight (out, in, 3, 3), the last
  ``out`` the bias. The reference RGB model (nf 64, nb 16, D = 1) has 2,588,483 parameters.

Initialisation (reference, docs/method.md section 5): every Conv2d and Linear, meta blocks included,
Kaiming normal (fan_in, a = 0) times 0.1, zero bias. For a meta block fan_in = D, so at
initialisation the generated trunk weights are ``c * N(0, 0.02 / D)`` (and 0 at c = 0).

Runtime (docs/method.md section 5 [choice]): levels are given per sample.

* All samples at one level: the 2 nb convolutions are generated once (:meth:`HyperResNet.
  trunk_weights`, 2 nb tiny affine maps) and the main network runs with plain convolutions.
  :meth:`HyperResNet.generate` returns that network as a standalone :class:`MainNet`.
* A batch that mixes levels runs in ONE forward pass, with one of two exact identities
  (``mixed_mode``):

  - ``"affine"``: since theta is affine in c, conv(x, B + sum_d c_d W[d]) = conv(x, B) +
    sum_d c_d conv(x, W[d]) (biases likewise). The 1 + D basis kernels run as one convolution
    with (1 + D) x out channels, then each sample combines them with its own c. Costs 1 + D
    times the trunk's multiply-adds, independent of how many levels the batch holds.
  - ``"grouped"`` (default): each sample's kernels are generated (B affine maps) and the trunk
    convolutions run as one grouped convolution (groups = B). Same multiply-adds as a
    single-level pass; on CPU it is the faster of the two (``cirlab.bench.hyperres``).

* Training (paper, Fig. 1): :meth:`HyperResNet.forward_levels` takes k inputs of B samples each
  and k levels: the shared head and tail run once on the k x B batch, the trunk once per level
  with that level's generated weights (``k_mode="loop"``: k main networks, exactly the paper),
  or as one grouped convolution over the k levels (``k_mode="grouped"``).

Inputs with odd H or W are padded (replicate) to even size and the output is cropped back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cirlab.archs.common import init_scaled_kaiming, pad_to_even

__all__ = ["HyperResNet", "MainNet", "MetaConv", "as_level_matrix", "reference_state_dict_to_cirlab"]

MIXED_MODES = ("grouped", "affine")
K_MODES = ("loop", "grouped")


def _check_sizes(in_nc: int, out_nc: int, nf: int, nb: int, cond_dim: int = 1) -> None:
    for name, value in (("in_nc", in_nc), ("out_nc", out_nc), ("nf", nf), ("nb", nb), ("cond_dim", cond_dim)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"model.net.{name}={value!r} must be an integer >= 1")


def as_level_matrix(level, batch: int, cond_dim: int, like: Tensor) -> Tensor:
    """Levels as a ``(batch, cond_dim)`` tensor on ``like``'s device and dtype.

    Accepted: a number or 0-d tensor (every sample, ``cond_dim`` must be 1); a 1-D tensor of
    ``batch`` values (``cond_dim`` 1) or of ``cond_dim`` values (one level vector for every
    sample); a ``(batch, cond_dim)`` or ``(1, cond_dim)`` tensor.
    """
    c = torch.as_tensor(level, dtype=like.dtype, device=like.device)
    if c.ndim == 0:
        if cond_dim != 1:
            raise ValueError(f"a scalar level needs cond_dim=1; this network takes level vectors of size {cond_dim}")
        c = c.reshape(1, 1)
    elif c.ndim == 1:
        if cond_dim == 1:
            c = c.reshape(-1, 1)
        elif c.shape[0] == cond_dim:
            c = c.reshape(1, cond_dim)
        else:
            raise ValueError(f"expected a level vector of size {cond_dim}, got shape {tuple(c.shape)}")
    if c.ndim != 2 or c.shape[1] != cond_dim or c.shape[0] not in (1, batch):
        raise ValueError(f"expected levels of shape ({batch}, {cond_dim}) (or one level for all), got {tuple(c.shape)}")
    if not torch.isfinite(c).all():
        raise ValueError("levels must be finite")
    return c.expand(batch, cond_dim)


class MetaConv(nn.Module):
    """A meta block: generates one 3x3 convolution (weight and bias) as an affine map of c in R^D.

    ``fc = Linear(cond_dim, out_ch * (in_ch * 9 + 1))``: ``fc.bias`` is the constant term B,
    ``fc.weight[:, d]`` the slope W[d] (see the module docstring for the layout).
    """

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int = 1, kernel_size: int = 3) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.cond_dim, self.kernel_size = in_ch, out_ch, cond_dim, kernel_size
        self.weight_numel = out_ch * in_ch * kernel_size * kernel_size
        self.fc = nn.Linear(cond_dim, self.weight_numel + out_ch, bias=True)

    def _split(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        lead = theta.shape[:-1]
        k = self.kernel_size
        return theta[..., : self.weight_numel].reshape(*lead, self.out_ch, self.in_ch, k, k), theta[..., self.weight_numel :]

    def generate(self, c: Tensor) -> tuple[Tensor, Tensor]:
        """``c`` (..., D) -> weight (..., out, in, 3, 3) and bias (..., out) of the generated conv(s)."""
        if self.cond_dim == 1:  # c * w + b elementwise: the same value as fc(c), about 3x cheaper than a K=1 GEMM
            return self._split(torch.addcmul(self.fc.bias, self.fc.weight[:, 0], c))
        return self._split(F.linear(c, self.fc.weight, self.fc.bias))

    def basis(self) -> tuple[Tensor, Tensor]:
        """The 1 + D basis kernels: weight (1 + D, out, in, 3, 3), bias (1 + D, out); index 0 = B."""
        theta = torch.cat([self.fc.bias[None], self.fc.weight.t()], dim=0)
        return self._split(theta)

    def conv_shared(self, x: Tensor, c: Tensor) -> Tensor:
        """All samples of ``x`` (B, in, h, w) at one level ``c`` (D,)."""
        weight, bias = self.generate(c)
        return F.conv2d(x, weight, bias, padding=self.kernel_size // 2)

    def conv_mixed(self, x: Tensor, c: Tensor, mode: str = "grouped") -> Tensor:
        """Sample i of ``x`` (B, in, h, w) at its own level ``c[i]`` (c: (B, D)), in one call."""
        batch, _, height, width = x.shape
        pad = self.kernel_size // 2
        if mode == "affine":
            weight, bias = self.basis()
            out = F.conv2d(x, weight.flatten(0, 1), bias.flatten(), padding=pad)
            out = out.view(batch, 1 + self.cond_dim, self.out_ch, out.shape[-2], out.shape[-1])
            coefficients = torch.cat([torch.ones_like(c[:, :1]), c], dim=1)
            return torch.einsum("bd,bdchw->bchw", coefficients, out)
        if mode == "grouped":
            weight, bias = self.generate(c)
            out = F.conv2d(x.reshape(1, batch * self.in_ch, height, width), weight.flatten(0, 1), bias.flatten(),
                           padding=pad, groups=batch)
            return out.view(batch, self.out_ch, out.shape[-2], out.shape[-1])
        raise ValueError(f"mixed_mode={mode!r} must be one of {MIXED_MODES}")


class _MainBody(nn.Module):
    """Head and tail of the main network (shared by every generated network)."""

    def __init__(self, in_nc: int, out_nc: int, nf: int, nb: int) -> None:
        super().__init__()
        self.in_nc, self.out_nc, self.nf, self.nb = in_nc, out_nc, nf, nb
        self.conv1 = nn.Conv2d(in_nc, nf, 3, 2, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv3 = nn.Conv2d(nf, 4 * nf, 3, 1, 1, bias=True)
        self.shuffle = nn.PixelShuffle(2)
        self.conv4 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv5 = nn.Conv2d(nf, out_nc, 3, 1, 1, bias=True)

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_nc:
            raise ValueError(f"expected input of shape (B, {self.in_nc}, H, W), got {tuple(x.shape)}")

    def tail(self, feature: Tensor, head: Tensor) -> Tensor:
        out = self.conv2(feature) + head
        out = F.relu(self.shuffle(self.conv3(out)))
        out = F.relu(self.conv4(out))
        if torch.is_autocast_enabled(out.device.type):
            # [choice] under mixed precision the image-making conv runs in float32: with no image-level
            # skip, a bf16 conv5 would round every output pixel to 8 mantissa bits (~1/256 near 1)
            with torch.autocast(out.device.type, enabled=False):
                return self.conv5(out.float())
        return self.conv5(out)

    def flops(self, height: int, width: int, levels: int = 1) -> dict[str, int]:
        """Multiply-adds x 2 of one forward pass at (height, width) (even sizes), and of generating
        ``levels`` networks (hypernetwork only): ``{"main", "generation"}``."""
        h2, w2 = (height + 1) // 2, (width + 1) // 2
        mac = 9 * (self.in_nc * self.nf * h2 * w2 + (2 * self.nb + 1) * self.nf * self.nf * h2 * w2
                   + self.nf * 4 * self.nf * h2 * w2 + self.nf * self.nf * height * width + self.nf * self.out_nc * height * width)
        generation = 0
        for module in self.modules():
            if isinstance(module, MetaConv):
                generation += levels * module.fc.weight.numel()  # one multiply-add per slope entry
        return {"main": 2 * mac, "generation": 2 * generation}


class _PlainBlock(nn.Module):
    def __init__(self, nf: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1, bias=True)

    def forward(self, f: Tensor) -> Tensor:
        return f + self.conv2(F.relu(self.conv1(f)))


class MainNet(_MainBody):
    """The main network with ordinary weights: one generated network, or a dedicated baseline.

    ``forward(x, level=None)`` ignores ``level`` (accepted so it is a drop-in for
    :class:`HyperResNet` in modules and evaluations). Reference shape: 1,406,787 parameters.
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 16) -> None:
        _check_sizes(in_nc, out_nc, nf, nb)
        super().__init__(in_nc, out_nc, nf, nb)
        self.blocks = nn.ModuleList(_PlainBlock(nf) for _ in range(nb))
        init_scaled_kaiming([self])

    def forward(self, x: Tensor, level=None) -> Tensor:
        """``x`` (B, in_nc, H, W) -> (B, out_nc, H, W), not clamped."""
        self._check_input(x)
        height, width = x.shape[-2:]
        head = self.conv1(pad_to_even(x))
        feature = head
        for block in self.blocks:
            feature = block(feature)
        return self.tail(feature, head)[..., :height, :width]

    def forward_levels(self, inputs: Tensor, levels=None) -> Tensor:
        """``inputs`` (k, B, C, H, W) -> (k, B, out_nc, H, W): one network, so one pass over k x B."""
        k, batch = inputs.shape[:2]
        return self(inputs.flatten(0, 1)).unflatten(0, (k, batch))


class _MetaBlock(nn.Module):
    def __init__(self, nf: int, cond_dim: int) -> None:
        super().__init__()
        self.meta1 = MetaConv(nf, nf, cond_dim)
        self.meta2 = MetaConv(nf, nf, cond_dim)


class HyperResNet(_MainBody):
    """Hypernetwork + shared head/tail (see the module docstring).

    Args:
        in_nc, out_nc: image channels (3 for RGB).
        nf: trunk width (64 in the reference).
        nb: residual blocks, i.e. 2 nb generated convolutions (16 in the reference).
        cond_dim: size D of the level vector (1: the paper's scalar level; 3: task vectors).
        mixed_mode: how a batch that mixes levels runs: ``"grouped"`` or ``"affine"``.
        k_mode: how :meth:`forward_levels` runs the k networks' trunks: ``"loop"`` or ``"grouped"``.
    """

    def __init__(self, in_nc: int = 3, out_nc: int = 3, nf: int = 64, nb: int = 16, cond_dim: int = 1,
                 mixed_mode: str = "grouped", k_mode: str = "loop") -> None:
        _check_sizes(in_nc, out_nc, nf, nb, cond_dim)
        if mixed_mode not in MIXED_MODES:
            raise ValueError(f"model.net.mixed_mode={mixed_mode!r} must be one of {MIXED_MODES}")
        if k_mode not in K_MODES:
            raise ValueError(f"model.net.k_mode={k_mode!r} must be one of {K_MODES}")
        super().__init__(in_nc, out_nc, nf, nb)
        self.cond_dim, self.mixed_mode, self.k_mode = cond_dim, mixed_mode, k_mode
        self.blocks = nn.ModuleList(_MetaBlock(nf, cond_dim) for _ in range(nb))
        init_scaled_kaiming([self])

    # ------------------------------------------------------------------ generation
    def meta_convs(self) -> Iterable[MetaConv]:
        for block in self.blocks:
            yield block.meta1
            yield block.meta2

    def trunk_weights(self, level) -> list[tuple[Tensor, Tensor]]:
        """The 2 nb generated (weight, bias) pairs for one level (a scalar, or a (D,) vector)."""
        c = as_level_matrix(level, 1, self.cond_dim, self.conv1.weight)[0]
        return [meta.generate(c) for meta in self.meta_convs()]

    @torch.no_grad()
    def generate(self, level) -> MainNet:
        """A standalone :class:`MainNet` for ``level``: shared head/tail copied, trunk generated."""
        net = MainNet(self.in_nc, self.out_nc, self.nf, self.nb).to(self.conv1.weight)
        for name in ("conv1", "conv2", "conv3", "conv4", "conv5"):
            getattr(net, name).load_state_dict(getattr(self, name).state_dict())
        weights = self.trunk_weights(level)
        for i, block in enumerate(net.blocks):
            for j, conv in enumerate((block.conv1, block.conv2)):
                conv.weight.copy_(weights[2 * i + j][0])
                conv.bias.copy_(weights[2 * i + j][1])
        return net.eval()

    # ------------------------------------------------------------------ forward
    def _trunk_shared(self, feature: Tensor, weights: list[tuple[Tensor, Tensor]]) -> Tensor:
        for i in range(self.nb):
            (w1, b1), (w2, b2) = weights[2 * i], weights[2 * i + 1]
            feature = feature + F.conv2d(F.relu(F.conv2d(feature, w1, b1, padding=1)), w2, b2, padding=1)
        return feature

    def _trunk_mixed(self, feature: Tensor, c: Tensor) -> Tensor:
        for block in self.blocks:
            residual = F.relu(block.meta1.conv_mixed(feature, c, self.mixed_mode))
            feature = feature + block.meta2.conv_mixed(residual, c, self.mixed_mode)
        return feature

    def forward(self, x: Tensor, level) -> Tensor:
        """Restore ``x`` (B, in_nc, H, W) at ``level`` (normalised: c = level / 255 for the paper's
        tasks; see :func:`as_level_matrix` for the accepted shapes). Samples may have different
        levels. Returns (B, out_nc, H, W), not clamped."""
        self._check_input(x)
        height, width = x.shape[-2:]
        c = as_level_matrix(level, x.shape[0], self.cond_dim, self.conv1.weight)
        head = self.conv1(pad_to_even(x))
        if bool((c == c[:1]).all()):
            feature = self._trunk_shared(head, [meta.generate(c[0]) for meta in self.meta_convs()])
        else:
            feature = self._trunk_mixed(head, c)
        return self.tail(feature, head)[..., :height, :width]

    def forward_levels(self, inputs: Tensor, levels) -> Tensor:
        """The training forward of k main networks: ``inputs`` (k, B, C, H, W), network i sees
        ``inputs[i]`` at ``levels[i]`` (levels: (k,) or (k, D)). Returns (k, B, out_nc, H, W)."""
        if inputs.ndim != 5:
            raise ValueError(f"expected inputs of shape (k, B, {self.in_nc}, H, W), got {tuple(inputs.shape)}")
        k, batch = inputs.shape[:2]
        c = as_level_matrix(levels, k, self.cond_dim, self.conv1.weight)
        height, width = inputs.shape[-2:]
        flat = inputs.flatten(0, 1)
        self._check_input(flat)
        head = self.conv1(pad_to_even(flat))
        if self.k_mode == "grouped":
            feature = self._trunk_mixed_k(head, c, k, batch)
        else:
            parts = [self._trunk_shared(part, [meta.generate(c[i]) for meta in self.meta_convs()])
                     for i, part in enumerate(head.unflatten(0, (k, batch)))]
            feature = torch.cat(parts, dim=0)
        out = self.tail(feature, head)[..., :height, :width]
        return out.unflatten(0, (k, batch))

    def _trunk_mixed_k(self, head: Tensor, c: Tensor, k: int, batch: int) -> Tensor:
        """The k trunks as grouped convolutions: the k levels are groups, the batch stays the batch."""
        _, nf, h, w = head.shape
        feature = head.view(k, batch, nf, h, w).transpose(0, 1).reshape(batch, k * nf, h, w)
        for block in self.blocks:
            w1, b1 = block.meta1.generate(c)
            w2, b2 = block.meta2.generate(c)
            residual = F.relu(F.conv2d(feature, w1.flatten(0, 1), b1.flatten(), padding=1, groups=k))
            feature = feature + F.conv2d(residual, w2.flatten(0, 1), b2.flatten(), padding=1, groups=k)
        return feature.view(batch, k, nf, h, w).transpose(0, 1).reshape(k * batch, nf, h, w)


# ---------------------------------------------------------------------------- reference names
_REFERENCE_KEY = re.compile(r"res_blocks_meta\.(\d+)\.hy_conv([12])\.fc\.(weight|bias)")


def reference_state_dict_to_cirlab(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename a state_dict of the reference implementation (ifryed/HyperRes) to this module's names.

    Reference names: ``conv1.module.weight`` .. ``conv5.module.bias`` (shared convs) and
    ``res_blocks_meta.{i}.hy_conv{1,2}.fc.{weight,bias}`` with i = 1..nb (index 0 is an
    identity). A ``module.`` prefix (DataParallel) is dropped. The layouts are the same, so
    the tensors are taken as they are.
    """
    out = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        match = _REFERENCE_KEY.fullmatch(key)
        if match:
            block, conv, kind = int(match[1]) - 1, match[2], match[3]
            out[f"blocks.{block}.meta{conv}.fc.{kind}"] = value
        elif re.fullmatch(r"conv[1-5]\.module\.(weight|bias)", key):
            out[key.replace(".module.", ".")] = value
        else:
            raise KeyError(f"unexpected key {key!r} in a reference HyperRes state_dict")
    return out
