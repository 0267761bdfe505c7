"""Plain ``nn.Module`` networks (no Lightning inside)."""

from cirlab.models.cresmd import CResMDNet

__all__ = ["CResMDNet"]
