"""A per-group mean that syncs over ranks: the per-task-vector tables of the evaluation grid."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class GroupedMean(Metric):
    """Mean of per-image values per group (e.g. per grid point), exact under DDP.

    ``update(values (N,), groups (N,) long)``; ``compute() -> (num_groups,)`` float64 with NaN
    for empty groups. States are float64 sums and counts reduced with ``sum``, so a sharded
    evaluation gives the same numbers as a single process.
    """

    full_state_update = False

    def __init__(self, num_groups: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.add_state("total", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(num_groups, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, groups: torch.Tensor) -> None:
        values = values.detach().to(torch.float64).flatten()
        groups = groups.to(self.total.device).long().flatten()
        if values.shape != groups.shape:
            raise ValueError(f"values {tuple(values.shape)} and groups {tuple(groups.shape)} must have the same length")
        self.total.index_add_(0, groups, values.to(self.total.device))
        self.count.index_add_(0, groups, torch.ones_like(values, device=self.total.device))

    def compute(self) -> torch.Tensor:
        return self.total / self.count

    def overall(self) -> torch.Tensor:
        """Mean over every image of every group (each image weighs the same)."""
        return self.total.sum() / self.count.sum()
