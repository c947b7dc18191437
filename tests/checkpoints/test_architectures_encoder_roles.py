"""DistilBERT's, DeBERTa's, DeBERTa-v2's, GPT-J's, CodeGen's and ALBERT's block Linears get roles q, k, v, o, qkv,
up, down.

They were role ``other``: ``spectra train --roles q,v`` refused DistilBERT ("its roles are head, other") and reports
put its whole blocks under other. The references are the models themselves, built from config in float64: the
outputs of the modules given q, k and v (DeBERTa's fused in_proj split by :func:`fused_projections`) are the queries,
keys and values whose attention (written out here, softmax(q·kᵀ/√d)·v per head) is what the module given o reads;
the module given down reads the activation (written out here) of what the module given up returns.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from spectra.checkpoints import architectures
from spectra.checkpoints.architectures import fused_projections, module_info
from tests.models import meta_models, quiet_transformers, role_rules_without

HEADS, WIDTH = 4, 32


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _build(name: str):
    import transformers as tf

    common = dict(vocab_size=64, max_position_embeddings=32)
    if name == "distilbert":
        cls, config = tf.DistilBertModel, tf.DistilBertConfig(dim=WIDTH, n_heads=HEADS, hidden_dim=48, n_layers=2,
                                                              **common)
    elif name in ("deberta", "deberta-v2"):
        config_cls = tf.DebertaConfig if name == "deberta" else tf.DebertaV2Config
        cls = tf.DebertaModel if name == "deberta" else tf.DebertaV2Model
        config = config_cls(hidden_size=WIDTH, num_attention_heads=HEADS, intermediate_size=48, num_hidden_layers=2,
                            **common)
    elif name == "albert":
        cls, config = tf.AlbertModel, tf.AlbertConfig(embedding_size=16, hidden_size=WIDTH, num_attention_heads=HEADS,
                                                      intermediate_size=48, num_hidden_layers=2, **common)
    elif name == "gptj":
        cls, config = tf.GPTJModel, tf.GPTJConfig(n_embd=WIDTH, n_head=HEADS, n_layer=2, rotary_dim=4,
                                                  vocab_size=64, n_positions=32)
    else:
        cls, config = tf.CodeGenModel, tf.CodeGenConfig(n_embd=WIDTH, n_head=HEADS, n_layer=2, rotary_dim=4,
                                                        vocab_size=64, n_positions=32)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).double().eval()
    with torch.no_grad():  # DeBERTa's q_bias and v_bias start at zero: make them count
        for n, p in model.named_parameters():
            if n.endswith(("q_bias", "v_bias")):
                p.normal_()
    return model


def _layer0(model, config: dict):
    """{role: (module name, input, output)} of layer 0's Linears, by spectra's roles, after one forward pass."""
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            info = module_info(name, config)
            # ALBERT's shared layers have no number: its first call is recorded
            if info.layer in (0, None) and info.role not in ("other", "head", "embed", "pos_embed"):
                def hook(module, inputs, output, name=name, role=info.role):
                    seen.setdefault(role, (name, inputs[0], output))

                hooks.append(module.register_forward_hook(hook))
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    for h in hooks:
        h.remove()
    return seen


def _attention(q, k, v):
    split = lambda x: x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


@pytest.mark.parametrize("name", ["distilbert", "deberta-v2", "deberta"])
def test_the_attention_roles_are_the_queries_keys_values_and_output(name):
    """o's input is the attention of q's, k's and v's outputs (DeBERTa: in_proj's rows by fused_projections, plus its
    q_bias and v_bias); swapping q and k (a wrong role) misses it: the negative control."""
    model = _build(name)
    config = model.config.to_dict()
    seen = _layer0(model, config)
    if name == "deberta":
        assert set(seen) == {"qkv", "o", "up", "down"}
        fused_name, _, out = seen["qkv"]
        rows = {p.role: p.rows for p in fused_projections(fused_name, "qkv", out.shape[-1], config)}
        assert set(rows) == {"q", "k", "v"}
        attention = model.encoder.layer[0].attention.self
        q, k, v = (out[..., list(rows[r])] for r in ("q", "k", "v"))
        q, v = q + attention.q_bias, v + attention.v_bias
    else:
        assert set(seen) == {"q", "k", "v", "o", "up", "down"}, sorted(seen)
        q, k, v = (seen[r][2] for r in ("q", "k", "v"))
    context = seen["o"][1]
    torch.testing.assert_close(_attention(q, k, v), context, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(_attention(k, q, v), context, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("name", ["distilbert", "deberta-v2", "deberta", "gptj", "codegen", "albert"])
def test_down_reads_the_activation_of_up(name):
    """The module given down reads gelu (GPT-J, CodeGen, ALBERT: the tanh gelu) of what the module given up
    returns."""
    model = _build(name)
    seen = _layer0(model, model.config.to_dict())
    act = _gelu_new if name in ("gptj", "codegen", "albert") else _gelu
    up_name, _, up_out = seen["up"]
    down_name, down_in, _ = seen["down"]
    assert up_name.endswith(("lin1", "intermediate.dense", "fc_in", "ffn")) and down_name.endswith(
        ("lin2", "output.dense", "fc_out", "ffn_output"))
    torch.testing.assert_close(act(up_out), down_in, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(up_out, down_in)


def test_deberta_in_proj_rows_are_interleaved_per_head():
    """fused_projections gives DeBERTa's in_proj (heads·3·d rows) per head [q_h; k_h; v_h], the order its forward's
    view(heads, 3·d).chunk(3) reads; without the model type (no config) the layout is unknown: no split."""
    rows = {p.role: p.rows for p in fused_projections("encoder.layer.0.attention.self.in_proj", "qkv", 96,
                                                      {"model_type": "deberta", "num_attention_heads": 4})}
    assert rows["q"][:8] == tuple(range(0, 8)) and rows["k"][:8] == tuple(range(8, 16))
    assert rows["q"][8:16] == tuple(range(24, 32))
    assert fused_projections("encoder.layer.0.attention.self.in_proj", "qkv", 96, None) == []


# The rules this file adds (their patterns) → the changes they may make, by the module name's end: each was other
_NEW_RULES = {r"attention\.q_lin": "q", r"attention\.k_lin": "k", r"attention\.v_lin": "v",
              r"attention\.out_lin": "o", r"ffn\.lin1": "up", r"ffn\.lin2": "down",
              r"attention\.self\.query_proj": "q", r"attention\.self\.key_proj": "k",
              r"attention\.self\.value_proj": "v", r"attention\.self\.in_proj": "qkv",
              r"mlp\.fc_in": "up", r"mlp\.fc_out": "down", r"albert_layers\.\d+\.ffn": "up",
              r"albert_layers\.\d+\.ffn_output": "down"}
# model type → the module-name endings whose role changed there (nothing else may change, in no other model type)
_EXPECTED = {
    "distilbert": {"attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin", "ffn.lin1",
                   "ffn.lin2"},
    "deberta": {"attention.self.in_proj"},
    "deberta-v2": {"attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"},
    "sew-d": {"attention.self.query_proj", "attention.self.key_proj", "attention.self.value_proj"},
    "gptj": {"mlp.fc_in", "mlp.fc_out"},
    "codegen": {"mlp.fc_in", "mlp.fc_out"},
    "albert": {"ffn", "ffn_output"},
}


@pytest.mark.slow
def test_the_encoder_rules_change_no_other_module_of_any_transformers_class(monkeypatch):
    """Every transformers class built on the meta device: each Linear's role with and without this file's rules
    (:data:`_NEW_RULES`). They differ only at the expected modules (other → the rule's role) of DistilBERT, DeBERTa,
    DeBERTa-v2, SEW-D (DeBERTa-v2's attention), GPT-J, CodeGen and ALBERT; every such model type changes."""
    kept = role_rules_without(_NEW_RULES)
    changed: dict[str, set[str]] = {}
    with quiet_transformers():
        for model_type, model in meta_models():
            config = model.config.to_dict()
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            now = {n: module_info(n, config).role for n in linears}
            with monkeypatch.context() as patch:
                patch.setattr(architectures, "_ROLE_REGEXES", kept)
                before = {n: module_info(n, config).role for n in linears}
            for n in linears:
                if now[n] != before[n]:
                    ending = next((e for e in _EXPECTED.get(model_type, ()) if n.endswith("." + e)), None)
                    assert ending is not None, (model_type, n, before[n], now[n])
                    pattern = next(p for p in _NEW_RULES if re.search(rf"(^|\.){p}$", n))
                    assert (before[n], now[n]) == ("other", _NEW_RULES[pattern]), (model_type, n)
                    changed.setdefault(model_type, set()).add(ending)
    assert changed == _EXPECTED


@pytest.mark.parametrize("name, cls, expected", [
    ("distilbert", "DistilBertForSequenceClassification", ("attention.q_lin", "attention.v_lin")),
    ("deberta-v2", "DebertaV2ForSequenceClassification", ("attention.self.query_proj", "attention.self.value_proj")),
])
def test_train_roles_q_v_adapt_the_queries_and_values(name, cls, expected):
    """train's --roles q,v on a DistilBERT (DeBERTa-v2) classifier: PEFT puts a LoRA on exactly each layer's q_lin
    and v_lin (query_proj, value_proj), none on another block Linear. Before, DistilBERT was refused (its roles were
    head and other) and DeBERTa-v2's queries and values were no role's."""
    import transformers as tf
    from peft import get_peft_model

    from spectra.lora.train import TrainConfig, lora_config
    from tests.models import peft_wrapped

    model = getattr(tf, cls)(_build(name).config)
    peft_model = get_peft_model(model, lora_config(model, TrainConfig(rank=2, roles=("q", "v")), task="seq_cls"))
    adapted = sorted(n for n in peft_wrapped(peft_model) if ".layer." in n)
    assert adapted and all(n.endswith(expected) for n in adapted), adapted
    assert len(adapted) == 2 * 2  # two layers, q and v each
