"""A multimodal checkpoint's two stacks through the whole analysis: rows, per-role table and heatmap keep them apart.

Gemma3ForConditionalGeneration holds a language model (``language_model.model.layers.N…``) and a SigLIP vision
tower (``vision_tower.encoder.layers.N…``), each numbered from 0: both have a layer-0 ``self_attn.q_proj`` of role
q. A rank-4 update planted in the tower's and a rank-1 update in the language model's must come back as 4 and 1,
not as one cell or one role whose median is 2.5.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

from spectra.analysis import AnalysisResult, analyze
from spectra.report.plots import plot_rank_heatmap
from spectra.report.tables import layer_role_grids, matrix_rows, rank_picture, role_table, summary_rows
from tests.models import planted_models, save

TEXT_Q = "language_model.model.layers.0.self_attn.q_proj"
VISION_Q = "vision_tower.encoder.layers.0.self_attn.q_proj"
# parameter (as the model names it) → planted rank; equal singular values, so every energy rank is the rank
PLANTED = {"model.language_model.layers.0.self_attn.q_proj.weight": 1,
           "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight": 4}
LLAMA_KEYS = ["name", "role", "layer", "expert", "kind", "fused_name", "conv1d", "shape", "base_dtype", "tuned_dtype",
              "base_tensor"]  # the first keys of a row, as analysis.json has always written them


def _planted_pair(root, family: str, planted: dict[str, int]):
    base, tuned = planted_models(family, planted, seed=40)
    return save(base, root / "base", "safetensors"), save(tuned, root / "tuned", "safetensors")


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    pair = _planted_pair(tmp_path_factory.mktemp("gemma3-multimodal"), "gemma3_multimodal", PLANTED)
    return analyze(*pair, cache_dir=False, progress=False).to_dict()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """The negative control: an ordinary LM, one stack, q planted at ranks 1 and 3 in its two layers."""
    planted = {"model.layers.0.self_attn.q_proj.weight": 1, "model.layers.1.self_attn.q_proj.weight": 3}
    pair = _planted_pair(tmp_path_factory.mktemp("llama"), "llama", planted)
    return analyze(*pair, cache_dir=False, progress=False).to_dict()


def _ranks(analysis) -> dict:
    return {(e["stack"], e["role"]): e["energy_rank_0.9"] for e in summary_rows(analysis)}


def _heatmap_grids(analysis) -> dict:
    return {g.stack: g for g in layer_role_grids(matrix_rows(analysis), lambda r: r["energy_rank"]["0.9"])}


def test_rows_carry_the_stack_of_their_tower(multimodal, llama):
    rows = {r["name"]: r for r in multimodal["modules"]}
    text, vision = rows[TEXT_Q], rows[VISION_Q]
    assert (text["role"], text["layer"], vision["role"], vision["layer"]) == ("q", 0, "q", 0)  # alike but for…
    assert vision["stack"] == "vision" and "stack" not in text  # …the stack (absent: the language model's)
    assert (text["energy_rank"]["0.9"], vision["energy_rank"]["0.9"]) == (1, 4)
    assert rows[VISION_Q + ".bias"]["stack"] == "vision"
    assert {r.get("stack") for r in multimodal["modules"]} == {None, "vision", "projector"}
    # control: a Llama's rows carry no stack, and their keys are those analysis.json has always written
    assert not any("stack" in r for r in llama["modules"])
    assert all(list(r)[:len(LLAMA_KEYS)] == LLAMA_KEYS for r in llama["modules"] if r["kind"] == "matrix")


def test_per_role_table_keeps_the_towers_apart(multimodal, llama):
    ranks = _ranks(multimodal)
    assert (ranks[(None, "q")]["median"], ranks[(None, "q")]["n"]) == (1, 1)  # not the median of 1 and 4
    assert (ranks[("vision", "q")]["median"], ranks[("vision", "q")]["n"]) == (4, 1)
    headers, body = role_table(multimodal)
    cells = {row[0]: dict(zip(headers, row)) for row in body}
    assert (cells["q"]["energy-90% rank"], cells["vision q"]["energy-90% rank"]) == ("1", "4")
    assert (cells["q"]["modules"], cells["vision q"]["modules"]) == ("1", "1")
    assert "vision q 25.0%" in rank_picture(multimodal)  # 4 of the tower's 16 (the language model's: 1 of 32)
    # control: one stack, one q over both layers, labelled with its bare role
    assert _ranks(llama)[(None, "q")]["median"] == 2
    assert [row[0] for row in role_table(llama)[1]] == [e["role"] for e in summary_rows(llama)]


def test_heatmap_data_keeps_the_towers_apart(multimodal, llama):
    grids = _heatmap_grids(multimodal)
    assert list(grids) == [None, "vision", "projector"]  # the language model first
    text, vision = grids[None], grids["vision"]
    assert (text.layers, vision.layers) == ([0, 1, None], [0, None])
    assert text.values[0, text.roles.index("q")] == 1 and vision.values[0, vision.roles.index("q")] == 4
    # the figure draws those grids, one panel per stack on one colour scale
    fig = plot_rank_heatmap(multimodal)
    images = [image for ax in fig.axes for image in ax.get_images()]
    assert len(images) == 3
    for image, grid in zip(images, grids.values()):
        np.testing.assert_array_equal(np.ma.filled(image.get_array(), np.nan), grid.values)
    assert len({(image.norm.vmin, image.norm.vmax) for image in images}) == 1
    assert "largest in vision q, layer 0 (4)" in fig.get_suptitle()
    # control: a Llama's one grid and one heatmap (and its colorbar), titled on the axes as before
    (grid,) = _heatmap_grids(llama).values()
    assert grid.stack is None and grid.layers == [0, 1, None]
    fig = plot_rank_heatmap(llama)
    assert len(fig.axes) == 2 and fig.get_suptitle() == ""
    assert fig.axes[0].get_title().endswith("largest in q, layer 1 (3)")


def test_analysis_json_keeps_the_stack_and_older_files_still_load(multimodal, tmp_path):
    """The field survives analysis.json; files written before it existed (no ``stack``) load with the stack a new
    run gives each row (by its name: ``vision_tower.…`` is the vision tower's) and render so. They had read as one
    stack, the towers' q as one (session 20: an old ViT's rows were the language model's)."""
    AnalysisResult(**{k: multimodal[k] for k in ("config", "base", "tuned", "modules")}).save(tmp_path / "new.json")
    assert ("vision", "q") in _ranks(AnalysisResult.load(tmp_path / "new.json").to_dict())
    old = copy.deepcopy(multimodal)
    for row in old["modules"]:
        row.pop("stack", None)
    AnalysisResult(**{k: old[k] for k in ("config", "base", "tuned", "modules")}).save(tmp_path / "analysis.json")
    loaded = AnalysisResult.load(tmp_path / "analysis.json")
    out = loaded.write_report(tmp_path / "report")
    assert (out / "report.md").is_file() and (out / "figures" / "rank_heatmap.png").is_file()
    assert all("stack" not in row for row in old["modules"])
    assert _ranks(loaded.to_dict())[(None, "q")]["n"] == 1  # the language model's q alone
    assert _ranks(loaded.to_dict())[("vision", "q")]["n"] == 1  # the tower's, by its name
