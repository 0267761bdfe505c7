"""Image quality metrics for cirlab.

Full reference (``(B, C, H, W)`` float in [0, 1], one value per image, set value = mean over
images, never a PSNR of the concatenated batch):

* "torchmetrics" convention (training monitoring): :func:`psnr_per_image`, :func:`ssim_per_image`
  (raw float, ``data_range=1.0``);
* "paper" convention (tables, BasicSR-like): :func:`paper_psnr`, :func:`paper_ssim` (clamp,
  uint8 rounding half-to-even, optional BT.601 Y as MATLAB ``rgb2ycbcr``, optional border crop,
  0..255 scale; SSIM Gaussian 11/1.5 valid windows, mean over channels). Set means over a run:
  :class:`~cirlab.metrics.grouped.GroupedMean` (per grid point) or a :class:`PerImageMean`.

No reference (pyiqa, lower is better, network created lazily and kept out of ``state_dict``):
:class:`NIQE`, :class:`BRISQUE`; offline parameter files via :func:`install_iqa_weights`.

Details of every convention are in the docstrings of :mod:`cirlab.metrics.conventions`,
:mod:`cirlab.metrics.fidelity` and :mod:`cirlab.metrics.iqa`. Importing this package does not
import pyiqa.
"""

from cirlab.metrics.base import PerImageMean
from cirlab.metrics.conventions import quantize_uint8, rgb_to_y_bt601
from cirlab.metrics.fidelity import (
    paper_psnr,
    paper_ssim,
    psnr_per_image,
    ssim_per_image,
)
from cirlab.metrics.iqa import (
    BRISQUE,
    IQA_WEIGHT_FILES,
    NIQE,
    install_iqa_weights,
    iqa_cache_dir,
    resolve_iqa_weights,
)

__all__ = [
    "BRISQUE",
    "IQA_WEIGHT_FILES",
    "NIQE",
    "PerImageMean",
    "install_iqa_weights",
    "iqa_cache_dir",
    "paper_psnr",
    "paper_ssim",
    "psnr_per_image",
    "quantize_uint8",
    "resolve_iqa_weights",
    "rgb_to_y_bt601",
    "ssim_per_image",
]
