"""Multi-head latent attention (DeepSeek-V2/V3, Kimi-K2, MiniCPM3, …): its factors get roles q_a, q_b, kv_a, kv_b.

They were role ``other``: no role analysed, trained or extracted them by default, and reports lumped them with
routers. The references are the models themselves, built from config: the Linears each attention holds (scanned,
not listed), and the attention's own ``expand_kv`` for which rows of ``kv_b_proj`` are keys and which values.
"""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch

from spectra.analysis import AnalysisResult, analyze
from spectra.checkpoints import architectures
from spectra.checkpoints.architectures import (fused_projections, fused_roles, module_info, module_stack, role_named,
                                               role_selected)
from spectra.report.tables import summary_rows
from tests.models import flat_update, meta_models, on_grid, save
from tests.cli.test_cli import run

# What each Linear of an MLA attention computes, by its attribute name, written out here rather than asked of spectra
MLA_ROLES = {"q_proj": "q", "q_a_proj": "q_a", "q_b_proj": "q_b", "kv_a_proj_with_mqa": "kv_a", "kv_b_proj": "kv_b",
             "o_proj": "o"}
HEADS, NOPE, ROPE, VALUE, KV_LORA = 4, 4, 4, 8, 8


def tiny_mla(family: str, *, q_lora_rank: int | None = 16, seed: int = 0):
    """A two-layer DeepSeek-V3 or -V2 causal LM (layer 0 dense, layer 1 routed), width 32, on the 2⁻¹² grid;
    ``q_lora_rank`` None: DeepSeek-V2-Lite's plain q_proj instead of q_a_proj and q_b_proj."""
    import transformers as tf

    sizes = dict(hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=2,
                 num_attention_heads=HEADS, num_key_value_heads=HEADS, n_routed_experts=3, num_experts_per_tok=2,
                 n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=q_lora_rank, kv_lora_rank=KV_LORA,
                 qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=VALUE, vocab_size=64)
    if family == "deepseek_v3":
        return on_grid(tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config(n_group=1, topk_group=1, **sizes), seed=seed)
    return on_grid(tf.DeepseekV2ForCausalLM, tf.DeepseekV2Config(**sizes), seed=seed)


def tiny_mla_pair(root: Path):
    """(base model, base dir, tuned dir): :func:`tiny_mla`'s DeepSeek-V3 and a fine-tune with a rank-1
    :func:`~tests.models.flat_update` in every weight matrix but the embeddings and the LM head (the router's
    included), saved as safetensors under ``root/b`` and ``root/t``."""
    base = tiny_mla("deepseek_v3")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        for i, (name, p) in enumerate(tuned.named_parameters()):
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                p += flat_update(tuple(p.shape), 1, seed=i).float()
    return base, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


FAMILIES = [("deepseek_v3", 16), ("deepseek_v2", 16), ("deepseek_v2", None)]


@pytest.mark.parametrize(("family", "q_lora_rank"), FAMILIES)
def test_every_linear_of_the_attention_gets_its_role(family, q_lora_rank):
    """Every Linear inside each layer's self_attn, scanned off the built model, has the role of what it computes;
    none is left other. V2-Lite's (q_lora_rank None) query is one q_proj, role q."""
    model = tiny_mla(family, q_lora_rank=q_lora_rank)
    config = model.config.to_dict()
    attention = [(name, name.rpartition(".")[2]) for name, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and ".self_attn." in name]
    held = {attr for _, attr in attention}
    assert held == ({"q_a_proj", "q_b_proj"} if q_lora_rank else {"q_proj"}) | {"kv_a_proj_with_mqa", "kv_b_proj",
                                                                                   "o_proj"}
    for name, attr in attention:
        info = module_info(name, config)
        assert (info.role, info.layer, info.stack) == (MLA_ROLES[attr], int(name.split(".")[2]), None), name


@pytest.mark.parametrize("family", ["deepseek_v3", "deepseek_v2"])
def test_kv_b_projections_are_the_rows_the_attention_reads_as_keys_and_values(family):
    """kv_b_proj's k and v projections are the rows whose outputs the attention's own expand_kv returns as every
    head's k_nope and value. Negative control: the contiguous halves a [k; v] layout would take are not them."""
    model = tiny_mla(family)
    attn = model.model.layers[0].self_attn
    weight = attn.kv_b_proj.weight.detach().double()  # (heads·(nope + v), kv_lora_rank)
    projections = {p.role: list(p.rows) for p in fused_projections("model.layers.0.self_attn.kv_b_proj", "kv_b",
                                                                    weight.shape[0], model.config.to_dict())}
    assert set(projections) == {"k", "v"} and sorted(projections["k"] + projections["v"]) == list(range(len(weight)))
    latent = torch.randn(1, 1, 5, KV_LORA, generator=torch.Generator().manual_seed(0))  # (batch, 1, seq, d)
    with torch.no_grad():
        keys, values = attn.expand_kv(latent, torch.zeros(1, 1, 5, ROPE))  # (batch, heads, seq, ·)
    k_nope = keys[0, :, :, :NOPE].transpose(0, 1).reshape(5, -1).double()  # (seq, heads·nope), head-major
    values = values[0].transpose(0, 1).reshape(5, -1).double()  # (seq, heads·v)
    x = latent[0, 0].double()
    torch.testing.assert_close(x @ weight[projections["k"]].T, k_nope, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x @ weight[projections["v"]].T, values, rtol=1e-6, atol=1e-6)
    half = HEADS * NOPE
    assert not torch.allclose(x @ weight[:half].T, k_nope, atol=1e-3)


def test_kv_b_is_split_only_where_the_config_sizes_it():
    """No config, or one whose heads × (nope + v) is not the tensor's rows: analysed whole only. A layer without
    rotary embedding (Mistral Large 4's) reads qk_nope_head_dim + qk_rope_head_dim per head as keys."""
    name, config = "model.layers.0.self_attn.kv_b_proj", {"num_attention_heads": 2, "qk_nope_head_dim": 2,
                                                          "qk_rope_head_dim": 1, "v_head_dim": 3}
    assert fused_projections(name, "kv_b", 10, None) == []
    assert fused_projections(name, "kv_b", 11, config) == []
    assert [(p.role, p.rows) for p in fused_projections(name, "kv_b", 10, config)] == [("k", (0, 1, 5, 6)),
                                                                                        ("v", (2, 3, 4, 7, 8, 9))]
    assert [(p.role, p.rows) for p in fused_projections(name, "kv_b", 12, {"text_config": config})] == [
        ("k", (0, 1, 2, 6, 7, 8)), ("v", (3, 4, 5, 9, 10, 11))]


def test_roles_select_the_factors_by_what_they_compute():
    """--roles q takes q_a and q_b (in an analysis too: they compute nothing but the query); k or v takes kv_a and
    kv_b whole where modules are adapted, as --roles v takes GPT-2's c_attn, and in an analysis kv_b's projection of
    that role only (role_named); a factor's own role takes it alone."""
    for role in ("q_a", "q_b"):
        assert role_named(role, ("q",)) and role_selected(role, ("q",)) and role_selected(role, (role,))
        assert not role_selected(role, ("k", "v", "o", "xq")) and not role_named(role, ("kv_a", "kv_b"))
    for role in ("kv_a", "kv_b"):
        assert role_selected(role, ("k",)) and role_selected(role, ("v",)) and role_selected(role, (role,))
        assert not role_named(role, ("k", "v")) and not role_selected(role, ("q", "o", "xk", "xv", "qkv"))
    assert not role_selected("q", ("q_a", "q_b", "kv_a", "kv_b")) and not role_selected("o", ("kv_b",))


def test_analyze_reports_each_factor_and_kv_bs_keys_and_values_in_block_order(tmp_path, monkeypatch, capsys):
    """A tiny DeepSeek-V3 pair with planted ranks in each factor and in kv_b's key rows alone: every analysis row
    has its role and planted rank, kv_b[k] holds kv_b's update and kv_b[v] none; the per-role table lists them in
    the order the attention meets them, before o. --roles q analyses q_a and q_b, --roles v kv_b[v] alone."""
    base = tiny_mla("deepseek_v3")
    tuned = copy.deepcopy(base)
    key_rows = [h * (NOPE + VALUE) + i for h in range(HEADS) for i in range(NOPE)]
    planted = {"model.layers.0.self_attn.q_a_proj": 2, "model.layers.1.self_attn.q_b_proj": 1,
               "model.layers.0.self_attn.kv_a_proj_with_mqa": 3, "model.layers.1.self_attn.o_proj": 1}
    params = dict(tuned.named_parameters())
    with torch.no_grad():
        for i, (name, rank) in enumerate(planted.items()):
            params[name + ".weight"] += flat_update(tuple(params[name + ".weight"].shape), rank, seed=i).float()
        params["model.layers.1.self_attn.kv_b_proj.weight"][key_rows] += flat_update((len(key_rows), KV_LORA), 2,
                                                                                       seed=9).float()
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    analysis = analyze(b, t, cache_dir=False, progress=False).to_dict()
    rows = {r["name"]: r for r in analysis["modules"]}
    kv_b = "model.layers.1.self_attn.kv_b_proj"
    expected = {**planted, kv_b: 2, f"{kv_b}[k]": 2}
    roles = {**{n: MLA_ROLES[n.rpartition(".")[2]] for n in planted}, kv_b: "kv_b", f"{kv_b}[k]": "k"}
    for name, rank in expected.items():
        assert (rows[name]["role"], rows[name]["energy_rank"]["0.9"]) == (roles[name], rank), name
    assert rows[f"{kv_b}[v]"]["role"] == "v" and rows[f"{kv_b}[v]"]["fro_norm"] == 0
    assert [e["label"] for e in summary_rows(analysis)] == ["k", "q_a", "q_b", "kv_a", "kv_b", "o"]
    for roles_asked, names in (("q", {"q_a_proj", "q_b_proj"}), ("v", {"kv_b_proj[v]"}),
                               ("kv_a", {"kv_a_proj_with_mqa"})):
        out = tmp_path / f"r-{roles_asked}"
        code, _, err = run(monkeypatch, capsys, "analyze", b, t, "-o", out, "--no-cache", "-q", "--roles", roles_asked)
        assert code == 0, err
        assert {m["name"].rpartition(".")[2] for m in AnalysisResult.load(out).modules} == names, roles_asked


def _meta_models():
    """(model type, config dict, names of its Linears) of every class :func:`tests.models.meta_models` builds."""
    for model_type, model in meta_models():
        linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
        yield model_type, model.config.to_dict(), linears


# The rules this scan checks, by their pattern: MLA's factors (AXK2's q_gate_proj with q_b_proj), DeepSeek-V4's
# compressors' gate_proj (a window's pooling weights, role other: it was the MLP's gate), AXK2's gated norms'
# mlp.fc1 and fc2 (other: they were the MLP's up and down), DeepSeek-V4's key-value head (kv) and output factors
# (o_a, o_b), its checkpoints' names for them (attn.wq_a …, shared_experts.w1 …: no model's module is so named, so they
# may change nothing here); and the projector stack's role (architectures._STACK_ROLES) for its Linears that no rule
# names. Beside the rules: Gemma 4's k_proj read as K = V (architectures._K_AS_V, role kv by the config: no default
# config sets attention_k_eq_v, so it may change nothing here; tests/checkpoints/test_architectures_gemma4_jetmoe.py
# builds the classes with it) and JetMoE's kv_proj rows (architectures._JETMOE_KV: role other, rows k and v). JetMoE's
# experts' rules (mlp.input_linear …: JetMoeParallelExperts, 3-D weights, no Linear) may change no Linear here
_NEW_RULES = ("q_a_proj", "(q_b_proj|q_gate_proj)", "kv_a_proj_with_mqa", "kv_b_proj",
              r"compressor\.(indexer\.)?gate_proj", r"(input|post_attention)_layernorm\.mlp\.(fc1|fc2)",
              r"self_attn\.kv_proj", "o_a_proj", "o_b_proj", r"attn\.wq_a", r"attn\.wq_b", r"attn\.wkv", r"attn\.wo_a",
              r"attn\.wo_b", r"shared_experts\.w1", r"shared_experts\.w3", r"shared_experts\.w2", "^embed", "^head",
              r"mlp\.input_linear(\.\d+)?", r"mlp\.output_linear(\.\d+)?",
              r"self_attention\.experts\.input_linear(\.\d+)?", r"self_attention\.experts\.output_linear(\.\d+)?")
# what a changed module's name ends with (TOP_LEVEL: is) → (its role without the new rules, with them): the only
# changes allowed
TOP_LEVEL = ("head", "embed")
_ALLOWED = {"q_a_proj": ("other", "q_a"), "q_b_proj": ("other", "q_b"), "q_gate_proj": ("other", "q_b"),
            "kv_a_proj_with_mqa": ("other", "kv_a"), "kv_b_proj": ("other", "kv_b"),
            "compressor.gate_proj": ("gate", "other"), "compressor.indexer.gate_proj": ("gate", "other"),
            **{f"{norm}_layernorm.mlp.{fc}": (role, "other") for norm in ("input", "post_attention")
               for fc, role in (("fc1", "up"), ("fc2", "down"))},
            "self_attn.kv_proj": ("other", "kv"), "self_attn.o_a_proj": ("other", "o_a"),
            "self_attn.o_b_proj": ("other", "o_b"),
            # a top-level head (V4's checkpoints' LM head; RWKV's model holds its LM head so) or embed: whole names
            "head": ("other", "head"), "embed": ("other", "embed")}
# what a module's fused_roles may become (each was empty): JetMoE's kv_proj's rows, in jetmoe alone
_ALLOWED_ROWS = {"self_attention.kv_proj": ("jetmoe", frozenset({"k", "v"}))}
_NEVER = re.compile(r"(?!)")


@pytest.mark.slow
def test_the_new_rules_change_no_other_module_of_any_transformers_class(monkeypatch):
    """Every transformers class built on the meta device (~570 of them): the role of each Linear under the rules,
    and under the rules without the MLA ones, DeepSeek-V4's and the projector's (:data:`_NEW_RULES`). They differ
    only at q_a_proj, q_b_proj, AXK2's q_gate_proj, kv_a_proj_with_mqa and kv_b_proj of an attention (which were
    other), at DeepSeek-V4's self_attn.compressor.gate_proj (which was gate), self_attn.kv_proj, o_a_proj and
    o_b_proj (which were other), at AXK2's gated norms' mlp.fc1 and fc2 (which were up and down), in the MLA model
    types (DeepSeek-V2/V3, Kimi-K2.5, MiniCPM3, AXK2, …) and DeepSeek-V4, and at Linears of the projector stack
    (which were other, now projector) in the multimodal model types (LLaVA, Qwen2-VL, BLIP-2, …). Rows: fused_roles
    (the roles of a fused tensor's rows where it has no fused role) change at JetMoE's self_attention.kv_proj alone
    (k and v); Gemma 4's K = V k_proj (kv by its config) changes nothing under the default configs."""
    import transformers as tf

    kept = tuple(r for r in architectures._ROLE_REGEXES if r[0].pattern.removeprefix("(^|\\.)").removesuffix("$")
                 not in _NEW_RULES)
    assert len(architectures._ROLE_REGEXES) - len(kept) == len(_NEW_RULES)  # each new rule found, and no other
    changed: dict[str, set[tuple[str, str, str]]] = {}
    rows: dict[str, set[tuple[str, frozenset, frozenset]]] = {}  # fused_roles changed
    built = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        verbosity = tf.utils.logging.get_verbosity()
        tf.utils.logging.set_verbosity_error()
        try:
            for model_type, config, linears in _meta_models():
                built += 1
                now = {name: module_info(name, config).role for name in linears}
                rows_now = {name: fused_roles(name) for name in linears}
                with monkeypatch.context() as patch:
                    patch.setattr(architectures, "_ROLE_REGEXES", kept)
                    patch.setattr(architectures, "_STACK_ROLES", {})
                    patch.setattr(architectures, "_K_AS_V", _NEVER)
                    patch.setattr(architectures, "_JETMOE_KV", _NEVER)
                    before = {name: module_info(name, config).role for name in linears}
                    rows_before = {name: fused_roles(name) for name in linears}
                for name in linears:
                    if now[name] != before[name]:
                        changed.setdefault(model_type, set()).add((re.sub(r"\.\d+\.", ".N.", name), before[name],
                                                                   now[name], module_stack(name, config)))
                    if rows_now[name] != rows_before[name]:
                        rows.setdefault(model_type, set()).add((re.sub(r"\.\d+\.", ".N.", name), rows_before[name],
                                                                rows_now[name]))
        finally:
            tf.utils.logging.set_verbosity(verbosity)
    assert built > 400
    assert set(rows) == {"jetmoe"}, sorted(rows)
    for model_type, changes in rows.items():
        for name, before, now in changes:
            ending = next((e for e in _ALLOWED_ROWS if name.endswith("." + e)), None)
            assert ending is not None and (model_type, now) == _ALLOWED_ROWS[ending] and not before, (model_type, name)
    assert {"deepseek_v2", "deepseek_v3", "kimi_k25", "minicpm3", "longcat_flash", "mistral4", "axk2",
            "deepseek_v4", "llava", "qwen2_vl", "blip-2", "idefics3"} <= set(changed)
    assert {(name, before, now) for name, before, now, _ in changed["deepseek_v4"]} >= {
        ("model.layers.N.self_attn.kv_proj", "other", "kv"), ("model.layers.N.self_attn.o_a_proj", "other", "o_a"),
        ("model.layers.N.self_attn.o_b_proj", "other", "o_b")}
    for model_type, changes in changed.items():
        for name, before, now, stack in changes:
            if stack == "projector":  # a projector's Linear that no rule names
                assert (before, now) == ("other", "projector"), (model_type, name, before, now)
                continue
            ending = next((e for e in _ALLOWED if name == e or name.endswith("." + e) and e not in TOP_LEVEL), None)
            assert ending is not None and (before, now) == _ALLOWED[ending], (model_type, name, before, now)
            if ending in TOP_LEVEL:
                assert name == ending, (model_type, name)
            elif ending.startswith(("compressor.", "self_attn.kv_proj", "self_attn.o_")):
                assert model_type == "deepseek_v4" and ".self_attn." in name, (model_type, name)
            elif "_layernorm." in ending:
                assert model_type == "axk2", (model_type, name)
            else:
                assert ".self_attn." in name and "indexer" not in name, (model_type, name)


def test_a_llamas_roles_are_unchanged():
    """Negative control: a Llama's Linears keep q, k, v, o, gate, up, down and head."""
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64)
    model = tf.LlamaForCausalLM(config)
    roles = {name.rpartition(".")[2]: module_info(name, config.to_dict()).role for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear)}
    assert roles == {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
                     "down_proj": "down", "lm_head": "head"}
