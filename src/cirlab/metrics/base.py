"""Base ``torchmetrics.Metric`` for "mean over images of a per-image score".

State: ``score_sum`` (float64 sum of the per-image scores) and ``count`` (number of images),
both reduced with ``dist_reduce_fx="sum"``, so under DDP every image counts once whatever the
per-rank batch sizes, and :meth:`~torchmetrics.Metric.merge_state` of two instances gives the
mean over the union of their images.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PerImageMean"]


class PerImageMean(Metric):
    """Average of per-image scores; subclasses implement :meth:`per_image`.

    ``update(preds, target)`` computes one score per image of the ``(B, C, H, W)`` batch and
    accumulates them; ``compute()`` returns the mean over all images seen (a float64 scalar,
    NaN before any update). Extra keyword arguments go to :class:`torchmetrics.Metric`
    (``dist_sync_on_step``, ``sync_on_compute``, ``compute_on_cpu``, ...).
    """

    is_differentiable = False
    full_state_update = False

    score_sum: Tensor
    count: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @abstractmethod
    def per_image(self, preds: Tensor, target: Tensor | None) -> Tensor:
        """Return the ``(B,)`` per-image scores of a batch (each subclass defines it)."""

    def update(self, preds: Tensor, target: Tensor | None = None) -> None:
        scores = self.per_image(preds, target).detach().reshape(-1)
        self.score_sum += scores.to(device=self.score_sum.device, dtype=torch.float64).sum()
        self.count += scores.numel()

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another instance's (or state dict's) sums and counts to this one.

        Unlike :meth:`torchmetrics.Metric.merge_state` (1.9), this also drops the cached result
        of an earlier ``compute()``, which torchmetrics would otherwise keep returning.
        """
        super().merge_state(incoming_state)
        self._computed = None

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.score_sum.device)
        return self.score_sum / self.count
