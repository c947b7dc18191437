"""Whether TUNED reads as a fine-tune of BASE, from the size of its updates.

A fine-tune moves each weight by a small fraction of it; two independent initialisations of
one architecture differ by ‖W₁ − W₂‖_F/‖W₁‖_F ≈ √2 (independent weights of equal norm). So
when the median module's ‖ΔW‖_F/‖W_base‖_F reaches :data:`UNRELATED_SIZE`, the pair is
most likely not a fine-tune and its ΔW compares unrelated weights. analyze, extract and
sweep each say so in the same words (:func:`unrelated_note`). A PEFT adapter as TUNED is not
judged so: its update is its own whatever BASE is (its recorded base is checked instead).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

from spectra.linalg import sketch

# the median ‖ΔW‖/‖W‖ from which a pair reads as two unrelated checkpoints: ΔW as large as W itself is no fine-tune
# (independent initialisations of one architecture give √2; full fine-tunes move weights by well under 1)
UNRELATED_SIZE = 1.0


def squared_norms(d) -> tuple[float, float]:
    """(‖ΔW‖_F², ‖W_base‖_F²) of a :class:`~spectra.checkpoints.pairing.DeltaW` read ``with_weights``.

    The subtraction's own where it took them on the way, else
    :func:`~spectra.linalg.sketch.squared_norm` of the tensors (within ~1e-6 relative).
    """
    fro2 = sketch.squared_norm(d.delta) if d.delta_sq is None else d.delta_sq
    base2 = sketch.squared_norm(d.base) if d.base_sq is None else d.base_sq
    return fro2, base2


def relative_size(fro: float, base_fro: float) -> float:
    """‖ΔW‖_F / ‖W_base‖_F: 0 for an unchanged zero weight, inf for a change of a zero one."""
    return fro / base_fro if base_fro else (0.0 if fro == 0 else math.inf)


def unrelated_note(sizes: Iterable[float]) -> str | None:
    """What to tell a user whose changed modules' ‖ΔW‖/‖W‖ (`sizes`) have a median at or above
    :data:`UNRELATED_SIZE`; None below it, or with no sizes."""
    sizes = [float(s) for s in sizes]
    median = statistics.median(sizes) if sizes else None
    if median is None or median < UNRELATED_SIZE:
        return None
    return (f"the median module's ‖ΔW‖/‖W‖ is {median:.2f}: TUNED differs from BASE by as much as the weights "
            f"themselves (two independent initialisations of one architecture give √2 ≈ 1.41; a fine-tune moves a "
            f"weight by a small fraction of it). Check that TUNED is a fine-tune of BASE.")
