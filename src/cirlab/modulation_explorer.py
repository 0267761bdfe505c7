"""Interactive modulation of one image (``notebooks/modulation_explorer.ipynb``): CResMD and TASNet
outputs for a task vector picked with three sliders (deblur, denoise, de-JPEG), side by side, with
the FLOPs of each output.

:class:`ModulationExplorer` holds one input image and the two networks. TASNet's shared prefix
(TASNet Fig. 2b, task-agnostic) is run once per image, on the first :meth:`~ModulationExplorer.render`,
and kept; every later render (a slider move) runs only the task-specific part on it, so its
output equals :func:`cirlab.inference.restore` of the same image and task vector while the prefix
is not recomputed (``tasnet.runtime.prefix_calls`` counts its runs). CResMD has no prefix: it runs
whole per render. :func:`explorer_widget` wraps an explorer in ipywidgets (the ``notebooks`` extra).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from cirlab.archs.common import pad_to_even
from cirlab.archs.cresmd import CResMDNet
from cirlab.archs.flops import cresmd_flops
from cirlab.archs.tasnet import TASNet
from cirlab.checkpoints import load_network
from cirlab.inference import check_tasks

#: slider name -> component of the task vector (cirlab.tasks: (t_blur, t_noise, t_jpeg))
SLIDERS = ("deblur", "denoise", "dejpeg")


@dataclass
class Rendering:
    """One render: ``images`` name -> (3, H, W) in [0, 1] (clamped); ``flops`` name -> analytic
    convolution FLOPs of that output on its own (TASNet: shared prefix + task-specific part, as
    :meth:`TASNet.cost` splits it); ``flops_this_render`` name -> FLOPs actually run by this call
    (TASNet: the task-specific part only once the prefix is cached); ``task`` the (3,) task vector."""

    task: Tensor
    images: dict[str, Tensor]
    flops: dict[str, int]
    flops_this_render: dict[str, int]


def _network(source, kind: type, key: str) -> nn.Module:
    net = load_network(source, key=key)
    if not isinstance(net, kind):
        raise ValueError(f"{key}: expected a {kind.__name__} checkpoint, got a {type(net).__name__}")
    return net.eval()


def _image(image: Tensor | str | Path) -> Tensor:
    """(3, H, W) float32 in [0, 1] from a tensor (float in [0, 1] or uint8) or an image file."""
    if isinstance(image, (str, Path)):
        from cirlab.data.image_files import load_image

        image = load_image(image)
    image = image[0] if image.ndim == 4 and image.shape[0] == 1 else image
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image: expected (3, H, W) RGB, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        return image.float() / 255
    image = image.float()
    if not torch.isfinite(image).all() or float(image.min()) < 0 or float(image.max()) > 1:
        raise ValueError("image: float values must be finite and in [0, 1]")
    return image


class ModulationExplorer:
    """CResMD and TASNet restoring one image under a task vector chosen interactively.

    Args:
        cresmd: a CResMDNet or a checkpoint :func:`load_network` reads (``CResMD`` module), or None.
        tasnet: a TASNet or a checkpoint (``tasnet.ckpt`` of ``cirlab-derive``, ``TASNetFinetune``), or None.
        image: the degraded input, (3, H, W) in [0, 1] (or uint8), or an image file.
        channels_last: the layout of TASNet's passes (default: on CPU, as :func:`cirlab.inference.restore`).

    At least one network is needed. Networks are used in eval mode on their own devices. The
    cached prefix belongs to the weights it was computed with: after changing TASNet's weights,
    call :meth:`set_image` again.
    """

    def __init__(self, cresmd=None, tasnet=None, image: Tensor | str | Path | None = None, *,
                 channels_last: bool | None = None) -> None:
        if cresmd is None and tasnet is None:
            raise ValueError("ModulationExplorer needs a CResMD or a TASNet checkpoint (both None)")
        self.nets: dict[str, nn.Module] = {}
        if cresmd is not None:
            self.nets["CResMD"] = _network(cresmd, CResMDNet, "cresmd")
        if tasnet is not None:
            self.nets["TASNet"] = _network(tasnet, TASNet, "tasnet")
        self._channels_last = channels_last
        self._prefix: dict | None = None
        self._padded: Tensor | None = None
        self.image: Tensor | None = None
        if image is not None:
            self.set_image(image)

    @property
    def tasnet(self) -> TASNet | None:
        return self.nets.get("TASNet")

    def set_image(self, image: Tensor | str | Path) -> None:
        """Use another input image; TASNet's cached prefix is dropped (recomputed on the next render)."""
        self.image = _image(image)
        self._prefix = None
        self._padded = None

    def _tasnet_prefix(self) -> tuple[dict, Tensor]:
        """TASNet's prefix output on the current image, computed on first use and kept."""
        if self._prefix is None:
            net = self.tasnet
            device = next(net.parameters()).device
            nhwc = self._channels_last if self._channels_last is not None else device.type == "cpu"
            padded = pad_to_even(self.image[None].to(device))
            padded = padded.contiguous(memory_format=torch.channels_last if nhwc else torch.contiguous_format)
            with torch.no_grad():
                self._prefix = net.runtime.run_prefix(padded)
            self._padded = padded
        return self._prefix, self._padded

    def render(self, task) -> Rendering:
        """Outputs of every network for one task vector ``task`` (3 values in [0, 1]: deblur,
        denoise, de-JPEG), clamped to [0, 1], with their FLOPs (see :class:`Rendering`)."""
        if self.image is None:
            raise ValueError("ModulationExplorer.render: no image set (set_image)")
        tasks = check_tasks(task, 3, key="task")
        if tasks.shape[0] != 1:
            raise ValueError(f"task: one task vector per render, got {tasks.shape[0]}")
        height, width = self.image.shape[-2:]
        images, flops, now = {}, {}, {}
        for name, net in self.nets.items():
            device = next(net.parameters()).device
            t = tasks.to(device)
            with torch.no_grad():
                if isinstance(net, TASNet):
                    cached = self._prefix is not None
                    prefix, padded = self._tasnet_prefix()
                    (_, sels), = net.runtime.groups(t)  # one task vector: one group
                    out = net.runtime.run_specific(prefix, padded, t, sels)[0, :, :height, :width]
                    cost = net.cost(t, height, width)
                    flops[name] = cost["total"]
                    now[name] = cost["per_task"][0] + (0 if cached else cost["shared"])
                else:
                    out = net(self.image[None].to(device), t)[0]
                    flops[name] = now[name] = cresmd_flops(net.nf, net.nb, height, width, tasks=1,
                                                           in_channels=net.in_nc, out_channels=net.out_nc)
            images[name] = out.float().clamp(0, 1).cpu()
        return Rendering(tasks[0], images, flops, now)


def explorer_widget(explorer: ModulationExplorer, initial=(0.0, 0.0, 0.0)):
    """An ipywidgets box: three sliders (``SLIDERS``) above the input and each network's output
    (``ipywidgets.Image``) with their FLOPs. Moving a slider renders again. Returns the box; its
    ``sliders`` (name -> FloatSlider), ``pictures`` (name -> Image), ``label`` (HTML) and
    ``last`` (the latest :class:`Rendering`) attributes let code drive and read it."""
    try:
        import ipywidgets as widgets
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("explorer_widget needs ipywidgets: pip install 'cirlab[notebooks]'") from error
    import io

    from cirlab.figures import to_pil

    def png(image: Tensor) -> bytes:
        buffer = io.BytesIO()
        to_pil(image).save(buffer, format="PNG")
        return buffer.getvalue()

    sliders = {name: widgets.FloatSlider(value=float(v), min=0.0, max=1.0, step=0.05, description=name,
                                         continuous_update=False)
               for name, v in zip(SLIDERS, initial)}
    pictures = {"input": widgets.Image(value=png(explorer.image), format="png")}
    pictures.update({name: widgets.Image(format="png") for name in explorer.nets})
    captions = {name: widgets.HTML(f"<b>{name}</b>") for name in pictures}
    label = widgets.HTML()
    columns = [widgets.VBox([captions[name], pictures[name]]) for name in pictures]
    box = widgets.VBox([widgets.HBox(list(sliders.values())), widgets.HBox(columns), label])

    def update(_change=None) -> None:
        result = explorer.render([sliders[name].value for name in SLIDERS])
        for name, image in result.images.items():
            pictures[name].value = png(image)
        parts = [f"{name}: {result.flops[name] / 1e9:.3f} GFLOPs per output"
                 f" ({result.flops_this_render[name] / 1e9:.3f} G run for this move)" for name in result.flops]
        label.value = "t = (" + ", ".join(f"{v:.2f}" for v in result.task.tolist()) + ")<br>" + "<br>".join(parts)
        box.last = result

    for slider in sliders.values():
        slider.observe(update, names="value")
    box.sliders, box.pictures, box.label = sliders, pictures, label
    update()
    return box


__all__ = ["SLIDERS", "ModulationExplorer", "Rendering", "explorer_widget"]
