"""ModernBERT's and DBRX's fused attention and ModernBERT's MLP, by what their modules' own forwards compute.

ModernBERT: ``attn.Wqkv`` is contiguous [q; k; v] (``view(…, 3, -1, head_dim).unbind``), ``attn.Wo`` the attention's
output (role o), ``mlp.Wi`` [gate; up] (``input, gate = Wi(x).chunk(2)``; ``Wo(act(input) · gate)``: the first,
activated half plays Llama's gate), ``mlp.Wo`` down. DBRX: ``attn.Wqkv`` is q (d_model rows), k and v
(kv_n_heads·head_dim rows each). They were qkv left whole and other. References: float64 transformers modules built
from tiny configs, their q, k, v captured inside their own forward (before the rotary embedding, as the projection
gives them); the MLP's product checked against Wo's own input, with the halves swapped as negative control.
"""

from __future__ import annotations

import pytest
import torch

from spectra.checkpoints.architectures import fused_projections, module_info

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def _captured(module, monkeypatch):
    """Patch the modeling module's apply_rotary_pos_emb and eager_attention_forward to record q, k (before rotary)
    and v, each flattened to (batch, seq, heads·head_dim)."""
    seen = {}
    flat = lambda t: t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)  # noqa: E731
    rotary, eager = module.apply_rotary_pos_emb, module.eager_attention_forward

    def rope(q, k, *args, **kwargs):
        seen["q"], seen["k"] = flat(q), flat(k)
        return rotary(q, k, *args, **kwargs)

    def attention(mod, query, key, value, *args, **kwargs):
        seen["v"] = flat(value)
        return eager(mod, query, key, value, *args, **kwargs)

    monkeypatch.setattr(module, "apply_rotary_pos_emb", rope)
    monkeypatch.setattr(module, "eager_attention_forward", attention)
    return seen


def _check_split(name, weight, x, seen, config):
    info = module_info(name, config)
    assert info.role == "qkv"
    projections = fused_projections(name, info.role, weight.shape[0], config)
    assert [p.role for p in projections] == ["q", "k", "v"]
    for p in projections:
        assert torch.allclose(x @ weight[p.rows].T, seen[p.role], atol=1e-12), (name, p.role)
    # negative control: q's rows do not give the keys
    q = next(p for p in projections if p.role == "q")
    assert (x @ weight[q.rows].T).shape != seen["k"].shape or not torch.allclose(x @ weight[q.rows].T, seen["k"])


def test_modernbert_roles_and_splits_match_its_forward(monkeypatch):
    import transformers as tf
    from transformers.models.modernbert import modeling_modernbert

    torch.manual_seed(0)
    config = tf.ModernBertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=24,
                                 vocab_size=64, max_position_embeddings=32, pad_token_id=0)
    config._attn_implementation = "eager"
    model = tf.ModernBertModel(config).double().eval()
    cfg = config.to_dict()
    layer = model.layers[0]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    seen = _captured(modeling_modernbert, monkeypatch)
    position_embeddings = model.rotary_emb(x, torch.arange(5)[None].expand(2, -1), layer_type="full_attention")
    with torch.no_grad():
        layer.attn(x, position_embeddings=position_embeddings, attention_mask=None)
    _check_split("model.layers.0.attn.Wqkv", layer.attn.Wqkv.weight.detach(), x, seen, cfg)
    assert module_info("model.layers.0.attn.Wo", cfg).role == "o"

    inputs = {}
    layer.mlp.Wo.register_forward_hook(lambda m, args, out: inputs.setdefault("down", args[0]))
    with torch.no_grad():
        layer.mlp(x)
    wi = layer.mlp.Wi.weight.detach()
    info = module_info("model.layers.0.mlp.Wi", cfg)
    assert (info.role, module_info("model.layers.0.mlp.Wo", cfg).role) == ("gate_up", "down")
    rows = {p.role: p.rows for p in fused_projections("model.layers.0.mlp.Wi", info.role, wi.shape[0], cfg)}
    act = layer.mlp.act
    assert torch.allclose(act(x @ wi[rows["gate"]].T) * (x @ wi[rows["up"]].T), inputs["down"], atol=1e-12)
    assert not torch.allclose(act(x @ wi[rows["up"]].T) * (x @ wi[rows["gate"]].T), inputs["down"], atol=1e-6)


def test_dbrx_wqkv_split_matches_its_forward(monkeypatch):
    import transformers as tf
    from transformers.models.dbrx import modeling_dbrx

    torch.manual_seed(0)
    config = tf.DbrxConfig(d_model=32, n_heads=4, n_layers=1, max_seq_len=32, vocab_size=64,
                           attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 100.0},
                           ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 3, "moe_top_k": 2})
    config._attn_implementation = "eager"
    model = tf.DbrxModel(config).double().eval()
    cfg = config.to_dict()
    attn = model.blocks[0].norm_attn_norm.attn
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    seen = _captured(modeling_dbrx, monkeypatch)
    position_embeddings = model.rotary_emb(x, torch.arange(5)[None].expand(2, -1))
    with torch.no_grad():
        attn(x, position_embeddings=position_embeddings, attention_mask=None)
    weight = attn.Wqkv.weight.detach()
    assert weight.shape == (32 + 2 * 2 * 8, 32)
    _check_split("transformer.blocks.0.norm_attn_norm.attn.Wqkv", weight, x, seen, cfg)


_NEW_RULES = {r"attn\.Wo": "o", r"mlp\.Wi": "gate_up", r"mlp\.Wo": "down"}


@pytest.mark.slow
def test_the_new_rules_change_no_other_module_of_any_transformers_class(monkeypatch):
    """Every transformers class on the meta device: each Linear's role with and without these rules differs exactly
    at the Wo, Wi of a ModernBERT attention or MLP module (ModernBertAttention, ModernBertMLP, ModernBERT-decoder's,
    wherever a model holds one: ModernVBERT's, PE-Audio's text model …), other → o, gate_up, down."""
    import re

    from spectra.checkpoints import architectures
    from tests.models import meta_models, quiet_transformers, role_rules_without

    kept = role_rules_without(_NEW_RULES)
    changed_types = set()
    with quiet_transformers():
        for model_type, model in meta_models():
            config = model.config.to_dict()
            modules = dict(model.named_modules())
            linears = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)]
            now = {n: module_info(n, config).role for n in linears}
            with monkeypatch.context() as patch:
                patch.setattr(architectures, "_ROLE_REGEXES", kept)
                before = {n: module_info(n, config).role for n in linears}
            for n in linears:
                owner = type(modules[n.rpartition(".")[0]]).__name__
                ours = owner.startswith("ModernBert") and n.rpartition(".")[2] in ("Wo", "Wi")
                assert (now[n] != before[n]) == ours, (model_type, n, owner, before[n], now[n])
                if ours:
                    pattern = next(p for p in _NEW_RULES if re.search(rf"(^|\.){p}$", n))
                    assert (before[n], now[n]) == ("other", _NEW_RULES[pattern]), (model_type, n)
                    changed_types.add(model_type)
    assert {"modernbert", "modernbert-decoder"} <= changed_types
