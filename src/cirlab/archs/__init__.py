"""Plain ``nn.Module`` networks (no Lightning inside)."""

from cirlab.archs.cresmd import CResMDNet

__all__ = ["CResMDNet"]
