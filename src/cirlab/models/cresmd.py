"""The CResMD baseline as a LightningModule.

Trains ``cirlab.archs.cresmd.CResMDNet`` with L1 on degradation pairs. Whether the pairs use
absolute ground truth (CResMD's setting, ``sampling=absolute``) or relative ground truth
(TASNet eq. 11, ``sampling=relative``) is a data setting, so the same module serves both.
The reference recipe (docs/method.md section 2) is ``experiment=cresmd_paper``.
"""

from __future__ import annotations

from cirlab.models.restoration import RestorationModule


class CResMD(RestorationModule):
    """CResMD baseline: every behaviour comes from ``RestorationModule``; the network from config."""
