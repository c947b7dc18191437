"""An analysis.json written before spectra gave a vision-only model its stack reads with the stack a new run gives.

What was wrong (session 20): a ViT analysed before single_stack existed holds rows without a ``stack``;
AnalysisResult.load kept them so (the report's stack: the language model), and recommend read each row's stack off
its name alone, where a ViT's (``encoder.layer.0.attention.attention.query``) says nothing: ``--stacks vision`` on
it was refused ("its stacks are language"). Both now read the rows through :func:`spectra.groups.rows_with_stacks`,
by the name and ``pairing.config_model_type`` (which every analysis.json holds), as a new run labels them. The files
are hand-written as the older spectra wrote them; a Llama's is the negative control that stays the language model's.
"""

from __future__ import annotations

import json

import pytest

from spectra.analysis import AnalysisResult
from spectra.errors import ConfigError
from spectra.ranks.policy import RankPolicy
from spectra.ranks.recommend import recommend_ranks
from spectra.report.tables import stacks_of


def _old_analysis(model_type: str, names: dict[str, str]) -> dict:
    """An analysis.json as an older spectra wrote it: no row names a stack. Each ΔW has singular values 0.4, 0.3."""
    row = {"kind": "matrix", "shape": [32, 32], "layer": 0, "expert": None, "fused_name": None, "conv1d": False,
           "fro_norm": 0.5, "energy_rank": {"0.9": 2, "0.99": 2}, "singular_values": [0.4, 0.3]}
    modules = [{**row, "name": n, "role": r, "base_tensor": f"{n}.weight"} for n, r in names.items()]
    return {"schema_version": 1, "config": {"thresholds": [0.9, 0.99]}, "base": {"path": "base"},
            "tuned": {"path": "tuned"}, "versions": {}, "timings": {},
            "pairing": {"entries": len(modules), "config_model_type": model_type}, "modules": modules}


_VIT = {"encoder.layer.0.attention.attention.query": "q", "encoder.layer.0.attention.attention.value": "v"}
_LLAMA = {"model.layers.0.self_attn.q_proj": "q", "model.layers.0.self_attn.v_proj": "v"}


def test_an_old_vit_analysis_reads_as_the_vision_stack(tmp_path):
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(_old_analysis("vit", _VIT)))
    loaded = AnalysisResult.load(path)
    assert {m.get("stack") for m in loaded.modules} == {"vision"}
    assert stacks_of(loaded.to_dict()) == ["vision"]  # the report's one stack: vision, not "language model"
    plan = recommend_ranks(path, RankPolicy(energy=0.99, stacks="vision"))
    assert {m.name: m.rank for m in plan.modules} == dict.fromkeys(_VIT, 2)
    with pytest.raises(ConfigError, match="its stacks are vision"):
        recommend_ranks(path, RankPolicy(energy=0.99, stacks="language"))


def test_an_old_llama_analysis_stays_the_language_model(tmp_path):
    """Negative control: an LM's rows get no stack (None, the language model), so its file reads as written."""
    path = tmp_path / "analysis.json"
    written = _old_analysis("llama", _LLAMA)
    path.write_text(json.dumps(written))
    assert AnalysisResult.load(path).modules == written["modules"]
    plan = recommend_ranks(path, RankPolicy(energy=0.99, stacks="language"))
    assert {m.name: m.rank for m in plan.modules} == dict.fromkeys(_LLAMA, 2)
    with pytest.raises(ConfigError, match="its stacks are language"):
        recommend_ranks(path, RankPolicy(energy=0.99, stacks="vision"))
