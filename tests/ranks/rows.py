"""Analysis rows with planted spectra, shared by the rank tests."""

from __future__ import annotations

import numpy as np


def make_row(name, sv, *, shape=(32, 32), role="q", layer=0, tail=(), noise_rank=None, conv1d=False,
             fused_name=None, top_k=None):
    """An analysis matrix row with planted singular values ``sv`` (plus an unlisted ``tail``)."""
    sv = np.asarray(sv, dtype=np.float64)
    fro = float(np.sqrt((sv**2).sum() + (np.asarray(tail, dtype=np.float64) ** 2).sum()))
    known = sv if top_k is None else sv[:top_k]
    return {"name": name, "role": role, "layer": layer, "expert": None, "kind": "matrix",
            "fused_name": fused_name, "conv1d": conv1d, "shape": list(shape), "fro_norm": fro,
            "singular_values": known.tolist(), "gd_rank": int((sv > 0).sum()),
            "noise": {"sigma": 0.0, "fro": 0.0, "mp_edge": 0.0,
                      "rank_above": int((sv > 0).sum()) if noise_rank is None else noise_rank}}


def analysis(*rows):
    return {"schema_version": 1, "config": {}, "base": {"path": "base", "fingerprint": "abc"}, "modules": list(rows)}


# σ² = 16, 9, 4, 1: cumulative energy 16/30, 25/30, 29/30, 1
PLANTED = [4.0, 3.0, 2.0, 1.0]
