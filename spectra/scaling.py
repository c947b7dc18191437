"""PEFT's LoRA scale law, below every pipeline stage that needs it (the adapter reader, extract, the trainer and the
rank policy), so that none of them imports a later stage for it.

References
----------
.. [1] Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", arXiv:2106.09685.
.. [2] Kalajdzievski, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.
"""

from __future__ import annotations

import math


def rank_scale(rank: int, rslora: bool) -> float:
    """What α is divided by in PEFT's update scale s = α/r of a rank-r update s·B@A: r (LoRA [1]_), or √r
    (rsLoRA [2]_). The one place spectra writes that law: adapters read, extracted, planned and trained use it."""
    return math.sqrt(rank) if rslora else rank
