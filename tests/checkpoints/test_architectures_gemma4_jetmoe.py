"""Two attentions whose keys and values come from one projection: Gemma 4's ``k_proj`` under ``attention_k_eq_v`` and
JetMoE's ``kv_proj``.

Gemma 4 with ``attention_k_eq_v`` holds no ``v_proj`` in its full-attention layers and reads ``k_proj``'s output as
keys and values: that ``k_proj`` is role ``kv`` (DeepSeek-V4's K = V role, taken by ``--roles k`` or ``v``), decided per
layer from the config; a sliding layer's ``k_proj`` stays ``k``. It was ``k``, so ``--roles v`` missed those layers'
values. JetMoE's ``kv_proj`` is a contiguous ``[k; v]``: role ``other`` as before, its rows ``k`` and ``v`` (it was
``other`` with no rows, taken by no ``--roles``). The references are the models built from config and their own
forwards (the key and value tensors each attention computes, float64).
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.analysis import AnalysisConfig, AnalysisResult, analyze
from spectra.checkpoints.architectures import (fused_projections, fused_roles, module_info, role_named,
                                               role_selected)
from tests.cli.test_cli import run
from tests.models import flat_update, on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
KV_HEADS, KV_CHANNELS = 2, 4  # JetMoE's kv_proj: (2·2·4, 32)


def tiny_gemma4(k_eq_v: bool, *, seed: int = 0):
    """A four-layer Gemma 4 text causal LM, width 32, layers sliding, full, sliding, full (:data:`LAYER_TYPES`), on
    the 2⁻¹² grid, eager attention."""
    import transformers as tf

    config = tf.Gemma4TextConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, global_head_dim=16, num_global_key_value_heads=1, attention_k_eq_v=k_eq_v,
        layer_types=list(LAYER_TYPES), sliding_window=4, hidden_size_per_layer_input=0, vocab_size_per_layer_input=64,
        attn_implementation="eager")
    return on_grid(tf.Gemma4ForCausalLM, config, seed=seed)


def tiny_jetmoe(*, seed: int = 0):
    """A two-layer JetMoE causal LM (3 attention and MLP experts, top 2), width 32, on the 2⁻¹² grid, eager."""
    import transformers as tf

    config = tf.JetMoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_key_value_heads=KV_HEADS,
                             kv_channels=KV_CHANNELS, intermediate_size=48, num_local_experts=3, num_experts_per_tok=2,
                             attn_implementation="eager")
    return on_grid(tf.JetMoeForCausalLM, config, seed=seed)


def _attention_inputs(model, module, monkeypatch, ids) -> dict[int, tuple]:
    """Each layer's attention: (its input hidden states, the keys and values its attention function receives)."""
    seen, inputs = {}, {}
    original = module.eager_attention_forward

    def spy(attn, query, key, value, *args, **kwargs):
        seen[attn.layer_idx] = (key, value)
        return original(attn, query, key, value, *args, **kwargs)

    monkeypatch.setattr(module, "eager_attention_forward", spy)

    def keep(i):
        return lambda _, args, kwargs: inputs.__setitem__(i, kwargs.get("hidden_states", args[0] if args else None))

    attentions = [getattr(layer, "self_attn", None) or layer.self_attention for layer in model.model.layers]
    hooks = [attn.register_forward_pre_hook(keep(i), with_kwargs=True) for i, attn in enumerate(attentions)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {i: (inputs[i], *seen[i]) for i in seen}


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_gemma4_k_proj_is_kv_exactly_where_its_output_is_the_values(k_eq_v, monkeypatch):
    """float64 forward of the tiny Gemma 4: in each layer spectra gives k_proj role kv, the values the attention
    function receives are v_norm(k_proj(x)) and the layer holds no v_proj; where it gives k (sliding layers, or every
    layer without attention_k_eq_v: the control), they are v_norm(v_proj(x)) and not v_norm(k_proj(x))."""
    from transformers.models.gemma4 import modeling_gemma4 as g4

    model = tiny_gemma4(k_eq_v).double()
    config = model.config.to_dict()
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    seen = _attention_inputs(model, g4, monkeypatch, ids)
    assert sorted(seen) == [0, 1, 2, 3]
    roles = {}
    for i, (x, _, value) in seen.items():
        attn = model.model.layers[i].self_attn
        roles[i] = module_info(f"model.layers.{i}.self_attn.k_proj", config).role
        shape = (*x.shape[:-1], -1, attn.head_dim)
        from_k = attn.v_norm(attn.k_proj(x).view(shape)).transpose(1, 2)  # (B, kv_heads, T, head_dim)
        if roles[i] == "kv":
            assert attn.v_proj is None
            torch.testing.assert_close(value, from_k, rtol=0, atol=1e-12)
        else:
            from_v = attn.v_norm(attn.v_proj(x).view(shape)).transpose(1, 2)
            torch.testing.assert_close(value, from_v, rtol=0, atol=1e-12)
            assert not torch.allclose(value, from_k)
            assert module_info(f"model.layers.{i}.self_attn.v_proj", config).role == "v"
    assert roles == ({0: "k", 1: "kv", 2: "k", 3: "kv"} if k_eq_v else dict.fromkeys(range(4), "k"))


def test_gemma4_kv_is_decided_by_the_layer_types_and_the_whole_models_text_config():
    """The whole model's config.json (text_config nested) decides as the text config does; a tower's k_proj (the
    vision stack) stays k; without layer_types, Gemma 4's default pattern (every sixth layer full) and a last layer
    forced full, as transformers' config builds them; with no config, k."""
    import transformers as tf

    text = tiny_gemma4(True).config.to_dict()
    whole = tf.Gemma4Config(text_config=text).to_dict()
    name = "model.language_model.layers.{}.self_attn.k_proj"
    assert [module_info(name.format(i), whole).role for i in range(4)] == ["k", "kv", "k", "kv"]
    assert module_info("model.vision_tower.encoder.layers.1.self_attn.k_proj", whole).role == "k"
    assert module_info("model.layers.1.self_attn.k_proj").role == "k"
    defaults = tf.Gemma4TextConfig(num_hidden_layers=8, attention_k_eq_v=True)  # builds layer_types itself
    bare = {k: v for k, v in defaults.to_dict().items() if k != "layer_types"}
    expected = ["k" if t == "sliding_attention" else "kv" for t in defaults.layer_types]
    assert expected == ["k"] * 5 + ["kv", "k", "kv"]
    assert [module_info(f"model.layers.{i}.self_attn.k_proj", bare).role for i in range(8)] == expected
    assert module_info("model.layers.1.self_attn.q_proj", text).role == "q"  # only k_proj moves


def test_analyze_roles_v_takes_gemma4s_values_wherever_they_come_from(tmp_path):
    """A tiny k_eq_v Gemma 4 pair with an update in every attention projection: --roles v analyses the sliding
    layers' v_proj and the full layers' k_proj (role kv), --roles k every k_proj, --roles q no k_proj."""
    base = tiny_gemma4(True)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, p) in enumerate(tuned.named_parameters()):
            if p.dim() == 2 and ".self_attn." in name:
                p += flat_update(tuple(p.shape), 1, seed=i).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    names = {}
    for asked in ("v", "k", "q"):
        result = analyze(b, t, AnalysisConfig(roles=(asked,)), cache_dir=False, progress=False).to_dict()
        names[asked] = {(r["name"].split(".")[2], r["name"].rpartition(".")[2], r["role"]) for r in result["modules"]
                        if r["kind"] == "matrix"}
    assert names["v"] == {("0", "v_proj", "v"), ("1", "k_proj", "kv"), ("2", "v_proj", "v"), ("3", "k_proj", "kv")}
    assert names["k"] == {("0", "k_proj", "k"), ("1", "k_proj", "kv"), ("2", "k_proj", "k"), ("3", "k_proj", "kv")}
    assert {n for _, n, _ in names["q"]} == {"q_proj"}


def test_jetmoe_kv_proj_rows_are_the_keys_and_values_its_forward_reads(monkeypatch):
    """float64 forward of the tiny JetMoE: kv_proj's rows split as spectra splits them ([k] the first half, [v] the
    second) give exactly the values the attention function receives (each expert's copy) and the keys before rotary
    embedding; the halves swapped (the negative control) give neither."""
    from transformers.models.jetmoe import modeling_jetmoe as jm

    model = tiny_jetmoe().double()
    config = model.config.to_dict()
    rotated = {}
    original_rope = jm.apply_rotary_pos_emb

    def rope_spy(q, k, cos, sin, *args, **kwargs):
        rotated[len(rotated)] = k
        return original_rope(q, k, cos, sin, *args, **kwargs)

    monkeypatch.setattr(jm, "apply_rotary_pos_emb", rope_spy)
    ids = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(0))
    seen = _attention_inputs(model, jm, monkeypatch, ids)
    assert sorted(seen) == [0, 1] == sorted(rotated)
    for i, (x, _, value) in seen.items():
        name = f"model.layers.{i}.self_attention.kv_proj"
        weight = model.model.layers[i].self_attention.kv_proj.weight  # (2·kv_heads·kv_channels, hidden)
        info = module_info(name, config)
        assert (info.role, info.layer) == ("other", i) and fused_roles(name) == {"k", "v"}
        split = {p.role: weight[p.rows] for p in fused_projections(name, info.role, weight.shape[0], config)}
        assert set(split) == {"k", "v"} and split["k"].shape == (KV_HEADS * KV_CHANNELS, 32)

        def heads(w):  # x @ wᵀ viewed (B, kv_heads, T, kv_channels), as its forward views it
            return (x @ w.T).view(*x.shape[:-1], -1, KV_CHANNELS).transpose(1, 2)

        top_k = model.config.num_experts_per_tok
        torch.testing.assert_close(value, heads(split["v"]).repeat(1, top_k, 1, 1), rtol=0, atol=1e-12)
        torch.testing.assert_close(rotated[i], heads(split["k"]), rtol=0, atol=1e-12)
        assert not torch.allclose(rotated[i], heads(split["v"])) and not torch.allclose(value[:, :KV_HEADS],
                                                                                        heads(split["k"]))


def test_jetmoe_kv_proj_is_selected_by_k_or_v_and_split_only_where_sized():
    """--roles k or v take kv_proj whole where a module is adapted (role_selected) and its rows of that role in an
    analysis (role_named of the projections, not of the whole, which is other); q, o and the cross-attention roles
    do not; another model's kv_proj (DeepSeek-V4's self_attn, its compressor's) holds no rows; a config that sizes
    kv_proj otherwise, or odd rows, split nothing."""
    name = "model.layers.0.self_attention.kv_proj"
    config = tiny_jetmoe().config.to_dict()
    for asked in (("k",), ("v",), ("q", "v")):
        assert role_selected("other", asked, name)
    assert not role_named("other", ("k", "v"))
    for asked in (("q",), ("o",), ("xk", "xv"), ("kv",)):
        assert not role_selected("other", asked, name), asked
    for other in ("model.layers.0.self_attn.kv_proj", "model.layers.0.self_attn.compressor.kv_proj",
                  "model.layers.0.self_attention.experts.input_linear"):
        assert fused_roles(other) & {"k", "v"} == frozenset(), other
    assert [p.role for p in fused_projections(name, "other", 16, config)] == ["k", "v"]
    assert [p.role for p in fused_projections(name, "other", 16, None)] == ["k", "v"]
    assert fused_projections(name, "other", 32, config) == []  # 2·2·4 = 16 rows, not 32
    assert fused_projections(name, "other", 15, None) == []
    assert fused_projections(name, "other", 16, {"model_type": "llama"}) == []


def test_analyze_reports_jetmoes_key_and_value_rows(tmp_path, monkeypatch, capsys):
    """A tiny JetMoE pair with a rank-2 update in layer 1's kv_proj value rows alone: kv_proj[v] holds it (energy
    rank 2), kv_proj[k] nothing; `analyze --roles v` analyses the [v] rows alone, --roles k the [k] rows alone."""
    base = tiny_jetmoe()
    tuned = copy.deepcopy(base)
    rows = KV_HEADS * KV_CHANNELS
    with torch.no_grad():
        tuned.model.layers[1].self_attention.kv_proj.weight[rows:] += flat_update((rows, 32), 2, seed=3).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    kv = "model.layers.1.self_attention.kv_proj"
    modules = {m["name"]: m for m in analyze(b, t, cache_dir=False, progress=False).to_dict()["modules"]}
    assert (modules[f"{kv}[v]"]["role"], modules[f"{kv}[v]"]["energy_rank"]["0.9"]) == ("v", 2)
    assert modules[f"{kv}[k]"]["role"] == "k" and modules[f"{kv}[k]"]["fro_norm"] == 0
    assert modules[kv]["role"] == "other" and modules[kv]["energy_rank"]["0.9"] == 2
    for asked, part in (("v", "[v]"), ("k", "[k]")):
        out = tmp_path / f"r-{asked}"
        code, _, err = run(monkeypatch, capsys, "analyze", b, t, "-o", out, "--no-cache", "-q", "--roles", asked)
        assert code == 0, err
        assert {m["name"] for m in AnalysisResult.load(out).modules} == {
            f"model.layers.{i}.self_attention.kv_proj{part}" for i in (0, 1)}


def _k_eq_v_models():
    """(model type, config dict, model) of every transformers class whose (text) config holds attention_k_eq_v,
    built on the meta device with it set and two layers, sliding then full (:func:`tests.models.meta_models`'s
    class choice)."""
    import transformers as tf

    from tests.models import default_configs

    for model_type, cls, config in default_configs():
        text = getattr(config, "text_config", None) or config
        if not hasattr(text, "attention_k_eq_v"):
            continue
        text.attention_k_eq_v, text.num_hidden_layers = True, 2
        text.layer_types = ["sliding_attention", "full_attention"]
        if hasattr(text, "num_kv_shared_layers"):
            text.num_kv_shared_layers = 0
        with torch.device("meta"):
            model = getattr(tf, cls)._from_config(config)
        yield model_type, config.to_dict(), model


@pytest.mark.slow
def test_every_k_eq_v_class_gets_kv_where_it_holds_no_v_proj():
    """Every transformers class whose config holds attention_k_eq_v (Gemma 4 and its unified and assistant models),
    built with it: each self_attn.k_proj is role kv exactly where its attention holds no v_proj (the model's own
    structure, not spectra's reading of the config), k elsewhere, and both occur in each class's language model."""
    import warnings

    import transformers as tf

    seen = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = tf.utils.logging.get_verbosity()
        tf.utils.logging.set_verbosity_error()
        try:
            for model_type, config, model in _k_eq_v_models():
                roles = {}
                for name, module in model.named_modules():
                    if name.endswith(".self_attn.k_proj"):
                        attn = model.get_submodule(name.rpartition(".")[0])
                        info = module_info(name, config)
                        assert info.role == ("kv" if getattr(attn, "v_proj", None) is None else "k"), (model_type,
                                                                                                     name)
                        roles.setdefault(info.stack, set()).add(info.role)
                assert roles.get(None) == {"k", "kv"}, (model_type, roles)
                seen.add(model_type)
        finally:
            tf.utils.logging.set_verbosity(verbosity)
    assert {"gemma4", "gemma4_text", "gemma4_unified"} <= seen, sorted(seen)


def test_train_targets_take_the_values_wherever_they_come_from():
    """What train, extract and the memory model adapt (role_targets, from the model's own config): --roles v takes
    Gemma 4's sliding layers' v_proj and full layers' k_proj, and JetMoE's kv_proj whole; --roles q neither's (JetMoE's
    queries are its attention experts' 3-D input_linear weights, which --roles q,o,gate,up,down take as
    target_parameters, no module: tests/checkpoints/test_jetmoe_experts.py); the default roles take JetMoE's kv_proj
    (no default role took it: role other) and its experts, never its routers."""
    from spectra.checkpoints.adapted import role_targets

    gemma = tiny_gemma4(True)
    assert sorted(role_targets(gemma, ("v",))[0]) == ["model.layers.0.self_attn.v_proj",
                                                      "model.layers.1.self_attn.k_proj",
                                                      "model.layers.2.self_attn.v_proj",
                                                      "model.layers.3.self_attn.k_proj"]
    assert not [n for n in role_targets(gemma, ("q",))[0] if "k_proj" in n or "v_proj" in n]
    jet = tiny_jetmoe()
    kv = [f"model.layers.{i}.self_attention.kv_proj" for i in (0, 1)]
    assert sorted(role_targets(jet, ("v",))[0]) == kv
    modules, parameters = role_targets(jet, ("q", "o", "gate", "up", "down"))  # its experts are 3-D weights
    assert modules == [] and sorted(parameters) == [
        f"model.layers.{i}.{kind}.weight" for i in (0, 1)
        for kind in ("mlp.input_linear", "mlp.output_linear", "self_attention.experts.input_linear",
                     "self_attention.experts.output_linear")]
    default, default_parameters = role_targets(jet, None)
    assert set(kv) <= set(default) and not [n for n in default + default_parameters if "router" in n]
    assert sorted(default_parameters) == sorted(parameters)
