"""BLIP-2, GPT-2 with cross-attention and SwitchTransformers: roles, fused splits, pairing and extraction.

Each model is built tiny from config, its weights on the 2⁻¹² grid of :mod:`tests.models`, so planted updates
come back exactly. The references are the models themselves: roles and experts read off their submodules; the
rows of a fused tensor that spectra calls q (or xk) are checked against the query (key) that the model's own
attention receives in a forward pass; PEFT's loading and merge referee the extracted adapters.

- BLIP-2's Q-Former names its projections ``attention.attention.query`` and
  ``crossattention.attention.query`` (they were role other), its query tokens' MLP
  ``intermediate_query.dense`` / ``output_query.dense`` (other); its vision tower fuses q, k and v in one
  ``self_attn.qkv`` Linear (other, never split) and projects with ``self_attn.projection`` (other).
- GPT-2 with ``add_cross_attention`` adds ``crossattention.q_attn`` (queries), ``crossattention.c_attn`` (a Conv1D
  projecting the encoder's states to [k; v]) and ``crossattention.c_proj``: all three were other.
- SwitchTransformers' experts ``experts.expert_N.wi``/``wo`` had no expert index and role other, its router
  ``router.classifier`` was a head.
"""

from __future__ import annotations

import copy

import pytest
import torch

from spectra.checkpoints.architectures import fused_projections, module_info, role_selected
from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.lora.extract import extract_adapter
from tests.checkpoints.test_pairing import F64, assert_exact
from tests.lora.test_extract import merged_state
from tests.models import add_to_parameter, low_rank, on_grid, save


def tiny(family: str, **overrides):
    """A tiny model of `family` with eager attention (so its attention inputs can be captured), weights on the grid."""
    import transformers as tf

    if family == "blip2":
        qformer = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=24,
                       encoder_hidden_size=16, cross_attention_frequency=2, vocab_size=64, max_position_embeddings=32)
        config = tf.Blip2Config(
            vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                               image_size=28, patch_size=14, qkv_bias=True),
            qformer_config=qformer | overrides,
            text_config=dict(model_type="opt", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, ffn_dim=24,
                             vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=16),
            num_query_tokens=4)
        cls = tf.Blip2ForConditionalGeneration
    elif family == "gpt2_cross":
        config = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
                               vocab_size=64, add_cross_attention=True)
        cls = tf.GPT2LMHeadModel
    elif family == "switch":  # encoder: block 0 dense (mlp.wi, mlp.wo), block 1 sparse; decoder: both sparse
        config = tf.SwitchTransformersConfig(d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2,
                                             num_heads=4, num_experts=3, encoder_sparse_step=2, decoder_sparse_step=1,
                                             relative_attention_num_buckets=8, vocab_size=64,
                                             decoder_start_token_id=0)
        cls = tf.SwitchTransformersForConditionalGeneration
    else:
        raise ValueError(family)
    config._attn_implementation = "eager"
    return on_grid(cls, config)


def linears(model) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def pair(root, base, tuned):
    return save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


# -- BLIP-2 ---------------------------------------------------------------------------------------------------------

# A Linear's (role, stack) by its path inside one layer of each stack; the reference for every Linear of BLIP-2.
BLIP2_ROLES = {
    "vision": {"self_attn.qkv": "qkv", "self_attn.projection": "o", "mlp.fc1": "up", "mlp.fc2": "down"},
    "qformer": {"attention.attention.query": "q", "attention.attention.key": "k", "attention.attention.value": "v",
                "attention.output.dense": "o", "crossattention.attention.query": "xq",
                "crossattention.attention.key": "xk", "crossattention.attention.value": "xv",
                "crossattention.output.dense": "xo", "intermediate_query.dense": "up", "output_query.dense": "down",
                "intermediate.dense": "up", "output.dense": "down"},  # the last two: use_qformer_text_input
    None: {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
           "fc1": "up", "fc2": "down"},
}


def _blip2_expected(model) -> dict[str, tuple[str, int | None, str | None]]:
    """Every Linear → (role, layer, stack), read off the model's own layer lists."""
    out = {"language_projection": ("projector", None, "projector"), "language_model.lm_head": ("head", None, None)}
    stacks = (("vision_model.encoder.layers", model.vision_model.encoder.layers, "vision"),
              ("qformer.encoder.layer", model.qformer.encoder.layer, "qformer"),
              ("language_model.model.decoder.layers", model.language_model.model.decoder.layers, None))
    for prefix, layers, stack in stacks:
        for i, layer in enumerate(layers):
            for path, module in layer.named_modules():
                if isinstance(module, torch.nn.Linear):
                    out[f"{prefix}.{i}.{path}"] = (BLIP2_ROLES[stack][path], i, stack)
    return out


@pytest.mark.parametrize("text_input", [False, True])
def test_blip2_every_linear_gets_its_role_layer_and_stack(text_input):
    """The Q-Former's q/k/v and xq/xk/xv were other, its MLPs other, the vision tower's qkv and projection other."""
    model = tiny("blip2", use_qformer_text_input=text_input)
    config = model.config.to_dict()
    expected = _blip2_expected(model)
    assert sorted(linears(model)) == sorted(expected)  # the reference covers every Linear
    for name in linears(model):
        info = module_info(name, config)
        assert (info.role, info.layer, info.stack) == expected[name], name
    qformer_roles = {role for role, _, stack in expected.values() if stack == "qformer"}
    assert qformer_roles == {"q", "k", "v", "o", "xq", "xk", "xv", "xo", "up", "down"}
    assert ("qformer.encoder.layer.0.output.dense" in expected) == text_input


def _capture_attention(monkeypatch, module_path: str, model, run):
    """(query, key, value) as the attention at `module_path` hands them to its attention function, (b, heads, t, d)."""
    import transformers.models.blip_2.modeling_blip_2 as blip2
    import transformers.models.gpt2.modeling_gpt2 as gpt2

    target, seen = model.get_submodule(module_path), {}
    for modeling in (blip2, gpt2):
        original = modeling.eager_attention_forward

        def capture(module, query, key, value, *args, _original=original, **kwargs):
            if module is target:
                seen["qkv"] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
            return _original(module, query, key, value, *args, **kwargs)

        monkeypatch.setattr(modeling, "eager_attention_forward", capture)
    with torch.no_grad():
        run(model)
    return seen["qkv"]


def _by_heads(y: torch.Tensor, heads: int) -> torch.Tensor:
    """(b, t, heads·d) → (b, heads, t, d), as multi-head attention views its projections."""
    b, t, width = y.shape
    return y.view(b, t, heads, width // heads).transpose(1, 2)


def _check_rows_are_the_models(monkeypatch, base, name: str, attention: str, roles, run, x, heads: int):
    """A planted update in the rows spectra calls `roles[i]` changes the model's i-th attention input (query, key or
    value; None: one it does not compute from this tensor) by exactly x @ ΔWᵀ, and nothing else."""
    config = base.config.to_dict()
    weight = base.get_parameter(name + ".weight")
    conv1d = weight.shape[0] != weight.shape[1] and name.endswith("c_attn")  # GPT-2's Conv1D: (in, out)
    out_features = weight.shape[1] if conv1d else weight.shape[0]
    projections = fused_projections(name, module_info(name, config).role, out_features, config)
    assert [p.role for p in projections] == [r for r in roles if r is not None]
    before = _capture_attention(monkeypatch, attention, base, run)
    for seed, proj in enumerate(projections, 1):
        rows = range(*proj.rows.indices(out_features))
        delta = low_rank(len(rows), weight.shape[0] if conv1d else weight.shape[1], 1, seed=seed)
        tuned = copy.deepcopy(base)
        add_to_parameter(tuned, name + ".weight", delta, conv1d=conv1d, rows=proj.rows)
        after = _capture_attention(monkeypatch, attention, tuned, run)
        for i, role in enumerate(roles):
            if role == proj.role:
                expected = _by_heads(x @ delta.float().T, heads)
                torch.testing.assert_close(after[i] - before[i], expected, rtol=0, atol=1e-6, msg=role)
            else:
                assert torch.equal(after[i], before[i]), (proj.role, i)


def test_blip2_vision_qkv_rows_are_the_query_key_and_value_the_model_computes(monkeypatch):
    """fused_projections' q, k and v rows of BLIP-2's self_attn.qkv (it had no split) are, in the model's forward,
    the query, key and value (the embeddings' output is the attention's input: the layer norm is captured too)."""
    base = tiny("blip2")
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    layer = base.vision_model.encoder.layers[0]
    seen = {}
    layer.self_attn.register_forward_pre_hook(lambda m, a, k: seen.update(x=k["hidden_states"].detach().clone()),
                                              with_kwargs=True)
    with torch.no_grad():
        base.vision_model(pixels)
    _check_rows_are_the_models(monkeypatch, base, "vision_model.encoder.layers.0.self_attn.qkv",
                               "vision_model.encoder.layers.0.self_attn", ("q", "k", "v"),
                               lambda m: m.vision_model(pixels), seen["x"], heads=2)


BLIP2_PLANTED = {  # module → (rows of its (out, in) weight or None, rank)
    "vision_model.encoder.layers.0.self_attn.qkv": ((0, 16), 1),  # q rows only
    "vision_model.encoder.layers.0.self_attn.projection": (None, 2),
    "qformer.encoder.layer.0.attention.attention.key": (None, 1),
    "qformer.encoder.layer.0.crossattention.attention.value": (None, 2),
    "qformer.encoder.layer.1.intermediate_query.dense": (None, 1),
    "qformer.encoder.layer.1.output_query.dense": (None, 2),
}


def _planted(base, planted: dict, *, conv1d=()):
    """tuned = base + a low-rank update per module (in the given rows): (tuned, {module: its whole ΔW (out, in)})."""
    tuned, deltas = copy.deepcopy(base), {}
    for seed, (module, (rows, rank)) in enumerate(planted.items(), 10):
        weight = base.get_parameter(module + ".weight")
        out_f, in_f = weight.shape[::-1] if module in conv1d else weight.shape
        lo, hi = rows or (0, out_f)
        delta = low_rank(hi - lo, in_f, rank, seed=seed)
        add_to_parameter(tuned, module + ".weight", delta, conv1d=module in conv1d, rows=slice(lo, hi))
        whole = torch.zeros(out_f, in_f, dtype=torch.float64)
        whole[lo:hi] = delta
        deltas[module] = whole
    return tuned, deltas


def _planted_pair(root, base, planted: dict, *, conv1d=()):
    """`base` and its :func:`_planted` fine-tune, saved under `root`: (base, tuned, deltas, b, t)."""
    tuned, deltas = _planted(base, planted, conv1d=conv1d)
    return base, tuned, deltas, *pair(root, base, tuned)


@pytest.fixture(scope="module")
def blip2_pair(tmp_path_factory):
    return _planted_pair(tmp_path_factory.mktemp("blip2"), tiny("blip2"), BLIP2_PLANTED)


def test_blip2_pairing_is_the_planted_update_with_the_vision_qkv_split(blip2_pair):
    _, _, deltas, b, t = blip2_pair
    qkv = "vision_model.encoder.layers.0.self_attn.qkv"
    expected = dict(deltas) | {f"{qkv}[q]": deltas[qkv][:16]}  # [k], [v] must come back zero
    seen = assert_exact(Pairing(b, t, F64), expected)
    assert [(seen[f"{qkv}[{r}]"].role, seen[f"{qkv}[{r}]"].shape, seen[f"{qkv}[{r}]"].stack) for r in "qkv"] == [
        (r, (16, 16), "vision") for r in "qkv"]
    assert {r: (seen[n].role, seen[n].layer, seen[n].stack) for r, n in (
        ("key", "qformer.encoder.layer.0.attention.attention.key"),
        ("cross value", "qformer.encoder.layer.0.crossattention.attention.value"))} == {
        "key": ("k", 0, "qformer"), "cross value": ("xv", 0, "qformer")}
    by_role = {d.name for d in Pairing(b, t, PairingOptions(roles=("q",), load=False))}
    assert f"{qkv}[q]" in by_role and "qformer.encoder.layer.0.crossattention.attention.query" in by_role


def test_blip2_extracted_adapter_merges_to_the_planted_update(blip2_pair, tmp_path):
    """Default roles take the vision qkv (whole) and projection, the Q-Former's self- and cross-attention and MLPs;
    rank 2 is exact on these rank ≤ 2 updates, and PEFT's merge on Blip2ForConditionalGeneration is the tuned model."""
    base, tuned, _, b, t = blip2_pair
    result = extract_adapter(b, t, 2, tmp_path / "ad", progress=False)
    names = {m.name for m in result.modules}
    assert set(BLIP2_PLANTED) <= names  # the unchanged ones are selected too, and left out of the adapter
    assert "qformer.encoder.layer.0.crossattention.attention.query" in names | set(result.unchanged)
    state, _ = merged_state(base, tmp_path / "ad")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


# -- GPT-2 with cross-attention --------------------------------------------------------------------------------------

def test_gpt2_cross_attention_roles_and_kv_split():
    model = tiny("gpt2_cross")
    config = model.config.to_dict()
    roles = {n.split(".", 3)[3]: module_info(n, config).role for n in linears(model) if ".h.0." in n}
    assert roles == {"attn.c_attn": "qkv", "attn.c_proj": "o", "crossattention.c_attn": "other",
                     "crossattention.q_attn": "xq", "crossattention.c_proj": "xo", "mlp.c_fc": "up",
                     "mlp.c_proj": "down"}
    name = "transformer.h.0.crossattention.c_attn"
    assert [(p.role, p.rows) for p in fused_projections(name, "other", 64, config)] == [
        ("xk", slice(0, 32)), ("xv", slice(32, 64))]
    assert fused_projections("transformer.h.0.attn.c_proj", "o", 32, config) == []  # negative control
    # a LoRA on c_attn adapts the cross-attention's k and v: --roles k, v, xk or xv take it, q and xq do not
    assert [role_selected("other", roles, name) for roles in (("k",), ("xv",), ("q",), ("xq",), ("o",))] == [
        True, True, False, False, False]
    assert not role_selected("other", ("k",), "transformer.wpe")


def test_gpt2_cross_attention_kv_rows_are_the_key_and_value_the_model_computes(monkeypatch):
    """xk and xv of crossattention.c_attn (a Conv1D, stored (in, 2·out)) are the key and value the cross-attention
    computes from the encoder's states; its query (q_attn's) does not move."""
    base = tiny("gpt2_cross")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    encoder = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(1))
    _check_rows_are_the_models(monkeypatch, base, "transformer.h.0.crossattention.c_attn",
                               "transformer.h.0.crossattention", (None, "xk", "xv"),
                               lambda m: m(ids, encoder_hidden_states=encoder, use_cache=False), encoder, heads=4)


GPT2_PLANTED = {"transformer.h.0.crossattention.c_attn": ((0, 32), 1), "transformer.h.1.crossattention.c_attn":
                ((32, 64), 2), "transformer.h.0.crossattention.q_attn": (None, 2),
                "transformer.h.1.crossattention.c_proj": (None, 1), "transformer.h.1.attn.c_attn": ((64, 96), 1)}


@pytest.fixture(scope="module")
def gpt2_cross_pair(tmp_path_factory):
    return _planted_pair(tmp_path_factory.mktemp("gpt2-cross"), tiny("gpt2_cross"), GPT2_PLANTED,
                         conv1d=set(GPT2_PLANTED))


def test_gpt2_cross_attention_pairing_is_the_planted_update(gpt2_cross_pair):
    _, _, deltas, b, t = gpt2_cross_pair
    x0, x1 = "transformer.h.0.crossattention.c_attn", "transformer.h.1.crossattention.c_attn"
    expected = dict(deltas) | {f"{x0}[xk]": deltas[x0][:32], f"{x1}[xv]": deltas[x1][32:],
                               "transformer.h.1.attn.c_attn[v]": deltas["transformer.h.1.attn.c_attn"][64:]}
    seen = assert_exact(Pairing(b, t, F64), expected)  # x0[xv], x1[xk] and the self-attention's q, k: zero
    assert [(seen[n].role, seen[n].shape, seen[n].conv1d, seen[n].fused_name) for n in (f"{x0}[xk]", f"{x1}[xv]")] == [
        ("xk", (32, 32), True, x0), ("xv", (32, 32), True, x1)]
    assert seen[x0].role == "other" and seen["transformer.h.0.crossattention.q_attn"].role == "xq"
    picked = {d.name for d in Pairing(b, t, PairingOptions(roles=("xv",), load=False))}
    assert picked == {f"transformer.h.{i}.crossattention.c_attn[xv]" for i in (0, 1)}


@pytest.mark.parametrize("roles, adapted", [
    (None, set(GPT2_PLANTED)),  # default roles: q, k, v, o … take both c_attn, q_attn and c_proj
    (("xv",), {"transformer.h.1.crossattention.c_attn", "transformer.h.0.crossattention.c_attn"}),
    (("xq",), {"transformer.h.0.crossattention.q_attn"}),
])
def test_gpt2_cross_attention_extracted_adapter_merges_to_the_planted_update(gpt2_cross_pair, tmp_path, roles,
                                                                             adapted):
    """The cross-attention's Conv1D modules are written fan_in_fan_out; PEFT's merge gives the tuned weight on the
    adapted modules (rank 2 is exact on these rank ≤ 2 updates) and the base's elsewhere."""
    base, tuned, _, b, t = gpt2_cross_pair
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=roles, progress=False)
    assert result.config["fan_in_fan_out"] is True
    state, _ = merged_state(base, tmp_path / "ad")
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    for module in GPT2_PLANTED:
        expected = tuned_state if module in adapted else base_state
        torch.testing.assert_close(state[module + ".weight"], expected[module + ".weight"], rtol=0, atol=1e-6,
                                   msg=module)


# -- SwitchTransformers ---------------------------------------------------------------------------------------------

def _switch_expected(model) -> dict[str, tuple[str, int | None, int | None]]:
    """Every Linear of the feed-forward layers → (role, layer, expert), from the model's own experts ModuleDicts."""
    out = {}
    for stack in ("encoder", "decoder"):
        for i, block in enumerate(getattr(model, stack).block):
            ff = block.layer[-1]  # SwitchTransformersLayerFF: mlp dense (wi, wo) or sparse (router, experts)
            prefix = f"{stack}.block.{i}.layer.{len(block.layer) - 1}.mlp"
            if hasattr(ff.mlp, "experts"):
                out[f"{prefix}.router.classifier"] = ("other", i, None)
                for key in ff.mlp.experts:
                    e = int(key.removeprefix("expert_"))
                    out |= {f"{prefix}.experts.{key}.wi": ("up", i, e), f"{prefix}.experts.{key}.wo": ("down", i, e)}
            else:
                out |= {f"{prefix}.wi": ("up", i, None), f"{prefix}.wo": ("down", i, None)}
    return out


def test_switch_experts_routers_and_dense_mlps_get_role_layer_and_expert():
    """Experts had no index and role other, the router (router.classifier) was a head."""
    model = tiny("switch")
    config = model.config.to_dict()
    expected = _switch_expected(model)
    assert len(expected) == 3 * (1 + 2 * 3) + 2  # three sparse blocks (router + 3 experts), one dense block
    mlp = [n for n in linears(model) if ".mlp." in n]
    assert sorted(mlp) == sorted(expected)
    for name in mlp:
        info = module_info(name, config)
        assert (info.role, info.layer, info.expert) == expected[name], name
    assert module_info("lm_head", config).role == "head"  # a head stays one


def test_nllb_moe_experts_router_and_dense_ffn_get_role_layer_and_expert():
    """NLLB-MoE names its experts experts.expert_N.fc1/fc2 and its dense layers' MLP ffn.fc1/fc2 (all were other), its
    router ffn.router.classifier (a head)."""
    import transformers as tf

    model = tf.NllbMoeForConditionalGeneration(tf.NllbMoeConfig(
        vocab_size=64, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, num_experts=2, encoder_sparse_step=2,
        decoder_sparse_step=2, max_position_embeddings=32))
    config = model.config.to_dict()
    expected = {}
    for stack in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model.model, stack).layers):
            prefix = f"model.{stack}.layers.{i}.ffn"
            if hasattr(layer.ffn, "experts"):  # NllbMoeSparseMLP: router, experts ModuleDict
                expected[f"{prefix}.router.classifier"] = ("other", i, None)
                for key in (k for k in layer.ffn.experts if k.startswith("expert_")):  # beside a token_dropout
                    e = int(key.removeprefix("expert_"))
                    expected |= {f"{prefix}.experts.{key}.fc1": ("up", i, e),
                                 f"{prefix}.experts.{key}.fc2": ("down", i, e)}
            else:
                expected |= {f"{prefix}.fc1": ("up", i, None), f"{prefix}.fc2": ("down", i, None)}
    ffn = [n for n in linears(model) if ".ffn." in n]
    assert sorted(ffn) == sorted(expected) and len(expected) == 2 * (2 + 1 + 2 * 2)
    for name in ffn:
        info = module_info(name, config)
        assert (info.role, info.layer, info.expert) == expected[name], name


SWITCH_PLANTED = {"decoder.block.1.layer.2.mlp.experts.expert_1.wi": (None, 2),
                  "decoder.block.1.layer.2.mlp.experts.expert_2.wo": (None, 1),
                  "encoder.block.1.layer.1.mlp.router.classifier": (None, 1),
                  "encoder.block.0.layer.1.mlp.wi": (None, 2)}


@pytest.fixture(scope="module")
def switch_pair(tmp_path_factory):
    return _planted_pair(tmp_path_factory.mktemp("switch"), tiny("switch"), SWITCH_PLANTED)


def test_switch_pairing_is_the_planted_update(switch_pair):
    _, _, deltas, b, t = switch_pair
    seen = assert_exact(Pairing(b, t, F64), deltas)
    assert [(seen[n].role, seen[n].layer, seen[n].expert, seen[n].stack) for n in SWITCH_PLANTED] == [
        ("up", 1, 1, None), ("down", 1, 2, None), ("other", 1, None, "encoder"), ("up", 0, None, "encoder")]
    heads = {d.name for d in Pairing(b, t, PairingOptions(roles=("head",), load=False))}
    assert heads == set()  # the routers no longer; lm_head is tied to shared (reported under the embedding)


def test_switch_extracted_experts_and_router_merge_to_the_planted_update(switch_pair, tmp_path):
    """Each expert's wi/wo and the router's classifier are Linears of the model: target_modules, no parameters."""
    base, tuned, _, b, t = switch_pair
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("up", "down", "other"), progress=False)
    assert not result.config.get("target_parameters")
    assert result.config["task_type"] == "SEQ_2_SEQ_LM"
    state, _ = merged_state(base, tmp_path / "ad")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)


# -- modules of role other that are no Linear: an Embedding, a convolution ------------------------------------------

def test_extracted_relative_attention_bias_is_an_embedding_lora_that_merges(tmp_path):
    """SwitchTransformers' (and T5's) relative_attention_bias is an nn.Embedding (role pos_embed; it was other): written
    as a Linear's lora_A/lora_B, PEFT loaded none of it (only a warning) and its merge kept the base's bias."""
    base = tiny("switch")
    bias = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias"  # (buckets 8, heads 4)
    tuned, _ = _planted(base, {bias: (None, 2), "decoder.block.0.layer.2.mlp.router.classifier": (None, 1)})
    b, t = pair(tmp_path, base, tuned)
    extract_adapter(b, t, 2, tmp_path / "ad", roles=("pos_embed", "other"), progress=False)
    state, model = merged_state(base, tmp_path / "ad")
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6, msg=key)
    assert not torch.equal(tuned.state_dict()[bias + ".weight"], base.state_dict()[bias + ".weight"])


def test_extracted_convolution_is_a_conv_lora_that_merges_to_the_truncation(tmp_path):
    """BLIP-2's patch embedding (a Conv2d, (16, 3, 14, 14), paired flattened as (16, 588)): its factors were written
    2-D and PEFT refused to load the adapter. Rank 2 of a rank-3 update merges to the best rank-2 ΔW (float64 SVD of
    the flattened update), viewed back as the kernel."""
    base = tiny("blip2")
    conv = "vision_model.embeddings.patch_embedding"
    delta = low_rank(16, 3 * 14 * 14, 3, seed=5)
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.get_parameter(conv + ".weight").add_(delta.view(16, 3, 14, 14).float())
    b, t = pair(tmp_path, base, tuned)
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("other",), progress=False)
    assert conv in {m.name for m in result.modules}
    state, _ = merged_state(base, tmp_path / "ad")
    U, S, Vh = torch.linalg.svd(delta)
    best = (U[:, :2] * S[:2]) @ Vh[:2]  # Eckart–Young, float64
    merged = state[conv + ".weight"].double() - base.state_dict()[conv + ".weight"].double()
    torch.testing.assert_close(merged.reshape(16, -1), best, rtol=0, atol=2e-6)
    assert (merged.reshape(16, -1) - delta).norm() > 1e-3  # the rank-3 update is not reproduced at rank 2
    (read,) = [d for d in Pairing(b, tmp_path / "ad", PairingOptions(vectors=False)) if d.name == conv]
    torch.testing.assert_close(read.delta.double(), best, rtol=0, atol=2e-6)  # the adapter read back: refused before


@pytest.mark.parametrize("dora", [False, True])
def test_a_peft_adapter_on_a_convolution_is_read_as_peft_merges_it(tmp_path, dora):
    """A PEFT LoRA (DoRA) on BLIP-2's patch embedding, A (r, 3, 14, 14), B (16, r, 1, 1) (magnitude (1, 16, 1, 1)):
    the adapter reader refused a 4-D base tensor; its ΔW, flattened (out, in·k…), is PEFT's merge minus the base."""
    from tests.models import random_adapter

    base = tiny("blip2")
    b = save(base, tmp_path / "b", "safetensors")
    peft_model = random_adapter(base, tmp_path / "ad", r=2, lora_alpha=4, use_dora=dora,
                                target_modules=["patch_embedding", "self_attn.qkv"])
    merged = peft_model.merge_and_unload().state_dict()
    yielded = {d.name: d for d in Pairing(b, tmp_path / "ad", PairingOptions(vectors=False, dtype="float64"))}
    conv, qkv = "vision_model.embeddings.patch_embedding", "vision_model.encoder.layers.0.self_attn.qkv"
    assert set(yielded) == {conv, qkv, *(f"{qkv}[{r}]" for r in "qkv")}
    for name in (conv, qkv):
        expected = merged[name + ".weight"].double() - base.state_dict()[name + ".weight"].double()
        flat = expected.reshape(expected.shape[0], -1)  # the conv's (16, 3, 14, 14) as (16, 588); qkv's (48, 16)
        assert yielded[name].shape == tuple(flat.shape)
        torch.testing.assert_close(yielded[name].delta, flat, rtol=1e-5, atol=1e-6, msg=name)


def test_a_grouped_convolution_is_refused_not_written():
    """PEFT cannot merge a LoRA on a grouped convolution (Wav2Vec2's positional conv): extract refuses it by name."""
    from types import SimpleNamespace

    from spectra.errors import ConfigError
    from spectra.lora.extract import _conv_kernels

    model = torch.nn.Module()
    model.conv = torch.nn.Conv1d(8, 8, 3, groups=2)
    model.dense = torch.nn.Conv1d(8, 8, 3)
    shapes = {"conv.weight": (8, 4, 3), "dense.weight": (8, 8, 3)}
    pairing = SimpleNamespace(base=SimpleNamespace(info=lambda n: SimpleNamespace(shape=shapes[n])))
    entry = lambda name: SimpleNamespace(name=name, base_tensor=name + ".weight", expert_index=None)  # noqa: E731
    names = {"conv": "conv", "dense": "dense"}
    assert _conv_kernels([entry("dense")], names, pairing, model) == {"dense": (3,)}
    with pytest.raises(ConfigError, match="conv: a convolution of 2 groups"):
        _conv_kernels([entry("dense"), entry("conv")], names, pairing, model)
