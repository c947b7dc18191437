"""XLM's, FlauBERT's, Phi's, Persimmon's (Fuyu's), MPNet's, Longformer's (LED's) and MobileBERT's block Linears get
the roles of what they compute.

They were role ``other`` (XLM's and FlauBERT's attentions.N and ffns.N had no layer either): ``spectra train --roles
q,v`` refused XLM and MPNet, Phi's and Persimmon's attention output (``self_attn.dense``) was no ``o``, and
MobileBERT's ``bottleneck.attention.dense`` (the shared input of its queries and keys) was read as an ``o``. The
references are the models themselves, built from config in float64: the module given o reads the attention (written
out here, softmax(q·kᵀ/√d + bias)·v per head) of what the modules given q, k and v return (Persimmon's fused
query_key_value split by :func:`fused_projections`), and the module given down reads the activation of what the
module given up returns. Negative controls: a swapped q and k, and the contiguous [q; k; v] split, miss.
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

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def _gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def _gelu_new(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _config(name: str):
    import transformers as tf

    sizes = dict(vocab_size=64, hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS,
                 intermediate_size=48)
    if name in ("xlm", "flaubert"):
        config_cls = tf.XLMConfig if name == "xlm" else tf.FlaubertConfig
        return config_cls(vocab_size=64, emb_dim=WIDTH, n_layers=2, n_heads=HEADS, max_position_embeddings=32)
    if name == "phi":
        return tf.PhiConfig(**sizes, partial_rotary_factor=0.5)
    if name == "persimmon":
        return tf.PersimmonConfig(**sizes, partial_rotary_factor=0.5, qk_layernorm=False)
    if name == "mpnet":
        return tf.MPNetConfig(**sizes, max_position_embeddings=40)
    if name == "longformer":
        return tf.LongformerConfig(**sizes, attention_window=4, max_position_embeddings=40)
    return tf.MobileBertConfig(**sizes, embedding_size=16, intra_bottleneck_size=16, true_hidden_size=16,
                               num_feedforward_networks=3, max_position_embeddings=40)


_MODELS = {"xlm": "XLMModel", "flaubert": "FlaubertModel", "phi": "PhiModel", "persimmon": "PersimmonModel",
           "mpnet": "MPNetModel", "longformer": "LongformerModel", "mobilebert": "MobileBertModel"}


def _build(name: str, cls: str | None = None):
    import transformers as tf

    config = _config(name)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    return getattr(tf, cls or _MODELS[name])(config).double().eval()


def _layer0(model, ids=None, **inputs) -> dict[str, tuple]:
    """{module name: (input, output)} of every layer-0 Linear (by spectra's layer), after one forward pass."""
    config = model.config.to_dict()
    seen, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module_info(name, config).layer == 0:
            def hook(module, args, output, name=name):
                # clones: Longformer divides query_global's output by √d in place
                seen.setdefault(name, (args[0].clone(), output.clone()))

            hooks.append(module.register_forward_hook(hook))
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1)) if ids is None else ids
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), **inputs)
    for h in hooks:
        h.remove()
    return seen


def _by_role(seen: dict, config: dict) -> dict[str, list[str]]:
    roles: dict[str, list[str]] = {}
    for name in seen:
        roles.setdefault(module_info(name, config).role, []).append(name)
    return roles


def _heads(x):  # (batch, seq, heads·d) -> (batch, heads, seq, d)
    return x.view(x.shape[0], x.shape[1], HEADS, -1).transpose(1, 2)


def _attention(q, k, v, bias=None, *, causal=False):
    """softmax(q·kᵀ/√d + bias)·v per head, (batch, heads, seq, d) -> (batch, seq, heads·d)."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if bias is not None:
        scores = scores + bias
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


# family → each layer's Linears, by their names after the layer's (attentions.N., layer.N., layers.N.), and the role
# each gets (every Linear of the layer)
_ROLES = {
    "xlm": {"q_lin": "q", "k_lin": "k", "v_lin": "v", "out_lin": "o", "lin1": "up", "lin2": "down"},
    "phi": {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.dense": "o",
            "mlp.fc1": "up", "mlp.fc2": "down"},
    "persimmon": {"self_attn.query_key_value": "qkv", "self_attn.dense": "o", "mlp.dense_h_to_4h": "up",
                  "mlp.dense_4h_to_h": "down"},
    "mpnet": {"attention.attn.q": "q", "attention.attn.k": "k", "attention.attn.v": "v", "attention.attn.o": "o",
              "intermediate.dense": "up", "output.dense": "down"},
    "longformer": {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                   "attention.self.query_global": "q", "attention.self.key_global": "k",
                   "attention.self.value_global": "v", "attention.output.dense": "o", "intermediate.dense": "up",
                   "output.dense": "down"},
    # the bottleneck's three Linears map between hidden_size and the bottleneck's width: other
    "mobilebert": {"bottleneck.input.dense": "other", "bottleneck.attention.dense": "other",
                   "attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
                   "attention.output.dense": "o", "ffn.0.intermediate.dense": "up", "ffn.0.output.dense": "down",
                   "ffn.1.intermediate.dense": "up", "ffn.1.output.dense": "down", "intermediate.dense": "up",
                   "output.dense": "down", "output.bottleneck.dense": "other"},
}
_ROLES["flaubert"] = _ROLES["xlm"]


@pytest.mark.parametrize("name", sorted(_ROLES))
def test_every_linear_of_a_layer_has_its_role_and_layer(name):
    """Each family's Linears of layers 0 and 1: spectra's role by name, and the layer read off the name (XLM's and
    FlauBERT's attentions.N, ffns.N had none)."""
    model = _build(name)
    config = model.config.to_dict()
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for layer in (0, 1):
        got = {}
        for n in linears:
            info, match = module_info(n, config), architectures._LAYER.search(n)
            if info.layer == layer:
                assert match is not None and int(match.group(1)) == layer
                got[n[match.end():]] = info.role
        assert got == _ROLES[name], (layer, got)
    outside = ("pooler.", "embeddings.")  # no layer's: BERT's pooler, MobileBERT's embedding_transformation
    assert all(module_info(n, config).layer is not None for n in linears if not n.startswith(outside))


@pytest.mark.parametrize("name", ["xlm", "flaubert", "mpnet"])
def test_o_reads_the_attention_of_q_k_and_v(name):
    """o's input is softmax(q·kᵀ/√d + bias)·v of q's, k's and v's outputs (MPNet's bias: the relative-position
    bias its encoder passes each layer, read off the call); q and k swapped miss it."""
    model = _build(name)
    config = model.config.to_dict()
    bias = {}
    if name == "mpnet":
        attn = model.encoder.layer[0].attention.attn
        attn.register_forward_pre_hook(lambda _, args: bias.update(b=args[2]))  # a hook returns None
    seen = _layer0(model)
    roles = _by_role(seen, config)
    q, k, v = (_heads(seen[roles[r][0]][1]) for r in ("q", "k", "v"))
    context = seen[roles["o"][0]][0]
    # XLM's softmax runs in float32 (scores.float()): its rounding bounds the tolerance
    torch.testing.assert_close(_attention(q, k, v, bias.get("b")), context, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(_attention(k, q, v, bias.get("b")), context, rtol=1e-3, atol=1e-4)


def _spy_attention(module, monkeypatch) -> list:
    """The (query, key, value, output) of each call of `module`'s eager attention function."""
    calls = []
    original = module.eager_attention_forward

    def spy(attn, query, key, value, *args, **kwargs):
        out = original(attn, query, key, value, *args, **kwargs)
        calls.append((query, key, value, out[0]))
        return out

    monkeypatch.setattr(module, "eager_attention_forward", spy)
    return calls


@pytest.mark.parametrize("name", ["phi", "persimmon"])
def test_self_attn_dense_reads_the_attention_of_the_queries_keys_and_values(name, monkeypatch):
    """Phi's and Persimmon's self_attn.dense (role o) reads the causal attention of q's, k's and v's outputs
    (Persimmon: query_key_value's rows by fused_projections, per head [q_h; k_h; v_h]): the values are what the
    attention function receives, the queries' and keys' unrotated half (partial_rotary_factor 0.5) too, and the
    attention written out from what it receives is dense's input. Negative control: the contiguous [q; k; v] split
    (GPT-2's layout) gives other values."""
    import importlib

    module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    calls = _spy_attention(module, monkeypatch)
    model = _build(name)
    config = model.config.to_dict()
    seen = _layer0(model)
    roles = _by_role(seen, config)
    query, key, value, _ = calls[0]  # (batch, heads, seq, d), after rotary embedding
    if name == "persimmon":
        fused_name = roles["qkv"][0]
        out = seen[fused_name][1]
        rows = {p.role: p.rows for p in fused_projections(fused_name, "qkv", out.shape[-1], config)}
        q, k, v = (_heads(out[..., list(rows[r])]) for r in ("q", "k", "v"))
        contiguous = _heads(out[..., 2 * WIDTH:])
        assert not torch.allclose(contiguous, value)
    else:
        q, k, v = (_heads(seen[roles[r][0]][1]) for r in ("q", "k", "v"))
    half = q.shape[-1] // 2  # the dims rotary embedding leaves as they are
    torch.testing.assert_close(v, value, rtol=0, atol=0)
    torch.testing.assert_close(q[..., half:], query[..., half:], rtol=0, atol=0)
    torch.testing.assert_close(k[..., half:], key[..., half:], rtol=0, atol=0)
    (o_name,) = roles["o"]
    assert o_name.endswith("self_attn.dense")
    torch.testing.assert_close(_attention(query, key, value, causal=True), seen[o_name][0], rtol=1e-5, atol=1e-6)


def test_fuyu_query_key_value_is_split_as_persimmons():
    """Fuyu's language model is a Persimmon, sized by its text_config (transformers' FuyuConfig leaves the top
    level's sizes None): its query_key_value splits as Persimmon's does, and self_attn.dense is its o."""
    import transformers as tf

    fuyu = tf.FuyuConfig(text_config=_config("persimmon").to_dict()).to_dict()
    name = "model.language_model.layers.0.self_attn.query_key_value"
    persimmon = fused_projections(name, "qkv", 3 * WIDTH, _config("persimmon").to_dict())
    assert fused_projections(name, "qkv", 3 * WIDTH, fuyu) == persimmon
    assert persimmon[0].rows[: 2 * WIDTH // HEADS] == (*range(8), *range(24, 32))  # q_0 then q_1: per head
    assert module_info("model.language_model.layers.0.self_attn.dense", fuyu).role == "o"


def test_longformer_global_projections_give_the_global_tokens_attention():
    """Longformer with token 0 global: o's input at token 0 is the full attention (every token, no window) of
    query_global's output over key_global's and value_global's (roles q, k, v, beside the local query, key and
    value). Negative control: the local projections' attention misses it."""
    model = _build("longformer")
    config = model.config.to_dict()
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    globals_ = torch.zeros_like(ids)
    globals_[:, 0] = 1
    seen = _layer0(model, ids, global_attention_mask=globals_)
    roles = _by_role(seen, config)
    local = {r: next(n for n in roles[r] if not n.endswith("_global")) for r in ("q", "k", "v")}
    glob = {r: next(n for n in roles[r] if n.endswith("_global")) for r in ("q", "k", "v")}
    to_batch = lambda x: x.transpose(0, 1)  # noqa: E731  Longformer's attention runs (seq, batch, width)
    q = _heads(to_batch(seen[glob["q"]][1]))  # (batch, heads, 1, d): the one global token's query
    k, v = (_heads(to_batch(seen[glob[r]][1])) for r in ("k", "v"))
    context = seen[roles["o"][0]][0][:, :1]  # (batch, 1, width): token 0's attention output
    torch.testing.assert_close(_attention(q, k, v), context, rtol=1e-5, atol=1e-6)
    ql, kl, vl = (_heads(to_batch(seen[local[r]][1])) for r in ("q", "k", "v"))
    assert not torch.allclose(_attention(ql[:, :, :1], kl, vl), context, rtol=1e-3, atol=1e-4)


def test_led_encoder_attention_roles():
    """LED's encoder attention is Longformer's: longformer_self_attn.query, key, value (and _global) are q, k, v,
    and self_attn.output, role o, reads what longformer_self_attn returns."""
    import transformers as tf

    config = tf.LEDConfig(vocab_size=64, d_model=WIDTH, encoder_layers=1, decoder_layers=1,
                          encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=48,
                          decoder_ffn_dim=48, attention_window=4, max_encoder_position_embeddings=40,
                          max_decoder_position_embeddings=40)
    torch.manual_seed(0)
    model = tf.LEDModel(config).double().eval()
    cfg = model.config.to_dict()
    attention = model.encoder.layers[0].self_attn
    roles = {n: module_info(f"encoder.layers.0.self_attn.{n}", cfg).role
             for n, m in attention.named_modules() if isinstance(m, torch.nn.Linear)}
    assert roles == {"longformer_self_attn.query": "q", "longformer_self_attn.key": "k",
                     "longformer_self_attn.value": "v", "longformer_self_attn.query_global": "q",
                     "longformer_self_attn.key_global": "k", "longformer_self_attn.value_global": "v", "output": "o"}
    seen = {}
    attention.longformer_self_attn.register_forward_hook(lambda _, __, out: seen.update(attn=out[0]))
    attention.output.register_forward_hook(lambda _, args, __: seen.update(o=args[0]))
    ids = torch.randint(4, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids[:, :3])
    torch.testing.assert_close(seen["o"], seen["attn"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["xlm", "flaubert", "mpnet", "phi", "persimmon", "mobilebert"])
def test_down_reads_the_activation_of_up(name):
    """In each MLP of layer 0 (MobileBERT: its two extra ffn.N and its own), the module given down reads the
    activation (gelu; Phi's the tanh gelu, Persimmon's relu², MobileBERT's relu) of what its up returns."""
    model = _build(name)
    config = model.config.to_dict()
    seen = _layer0(model)
    act = {"phi": _gelu_new, "persimmon": lambda x: torch.relu(x) ** 2, "mobilebert": torch.relu}.get(name, _gelu)
    ups = [n for n in seen if module_info(n, config).role == "up"]
    downs = [n for n in seen if module_info(n, config).role == "down"]
    assert len(ups) == len(downs) == (3 if name == "mobilebert" else 1)
    for up in ups:
        prefix = up.rsplit(".", 2)[0] if ".ffn." in up else None
        down = next(d for d in downs if (d.startswith(prefix + ".") if prefix else ".ffn." not in d))
        torch.testing.assert_close(act(seen[up][1]), seen[down][0], rtol=1e-9, atol=1e-12)
        assert not torch.allclose(seen[up][1], seen[down][0])


def test_mobilebert_bottleneck_attention_is_the_input_of_queries_and_keys():
    """MobileBERT's bottleneck.attention.dense (role other, not o) reads the layer's input and its output, normed,
    is what query and key read; attention.output.dense (o) reads the attention of query's, key's and value's
    outputs."""
    model = _build("mobilebert")
    layer = model.encoder.layer[0]
    config = model.config.to_dict()
    got = {}
    layer.register_forward_pre_hook(lambda _, args: got.update(layer_in=args[0]))  # hooks return None
    layer.bottleneck.attention.register_forward_hook(lambda _, __, out: got.update(shared=out))
    seen = _layer0(model)
    roles = _by_role(seen, config)
    name = "encoder.layer.0.bottleneck.attention.dense"
    assert module_info(name, config).role == "other"
    torch.testing.assert_close(seen[name][0], got["layer_in"], rtol=0, atol=0)
    for r in ("q", "k"):
        torch.testing.assert_close(seen[roles[r][0]][0], got["shared"], rtol=0, atol=0)
    q, k, v = (_heads(seen[roles[r][0]][1]) for r in ("q", "k", "v"))
    torch.testing.assert_close(_attention(q, k, v), seen[roles["o"][0]][0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name, cls, roles, expected", [
    ("xlm", "XLMForSequenceClassification", ("q", "v"), ("q_lin", "v_lin")),
    ("mpnet", "MPNetForSequenceClassification", ("q", "v"), ("attention.attn.q", "attention.attn.v")),
    ("phi", "PhiForCausalLM", ("o",), ("self_attn.dense",)),
    ("longformer", "LongformerForSequenceClassification", ("v",), ("attention.self.value",
                                                                   "attention.self.value_global")),
])
def test_train_roles_adapt_the_named_modules(name, cls, roles, expected):
    """train's --roles on each family: PEFT puts a LoRA on exactly each layer's modules of those roles (XLM's q_lin
    and v_lin, MPNet's attn.q and attn.v, Phi's self_attn.dense, Longformer's value and value_global), on no other
    block Linear. Before, XLM and MPNet were refused (their roles were other) and Phi's --roles o adapted nothing."""
    from peft import get_peft_model

    from spectra.lora.train import TrainConfig, lora_config
    from tests.models import peft_wrapped

    model = _build(name, cls).float()
    task = "causal_lm" if cls.endswith("CausalLM") else "seq_cls"
    peft_model = get_peft_model(model, lora_config(model, TrainConfig(rank=2, roles=roles), task=task))
    adapted = [(m.group(1), n[m.end():]) for n in peft_wrapped(peft_model)
               if (m := architectures._LAYER.search(n)) is not None]
    assert sorted(adapted) == sorted((str(layer), e) for layer in (0, 1) for e in expected)


@pytest.mark.parametrize("cls", ["XLMWithLMHeadModel", "FlaubertWithLMHeadModel", "MambaForCausalLM"])
def test_a_vocabulary_named_embeddings_is_embed_and_xlms_head_is_head(cls):
    """XLM's and FlauBERT's (transformer.)embeddings and Mamba's backbone.embeddings are the model's input embedding
    (transformers' get_input_embeddings): role embed, the only one; XLM's pred_layer.proj is its output embedding:
    role head. They were other, which recommend's default plan takes."""
    import transformers as tf

    if cls == "MambaForCausalLM":
        model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=64, hidden_size=WIDTH, num_hidden_layers=2,
                                                   state_size=4))
    else:
        model = _build("xlm" if cls.startswith("XLM") else "flaubert", cls)
    config = model.config.to_dict()
    roles = {n: module_info(n, config).role for n, m in model.named_modules() if n and hasattr(m, "weight")}
    (embed,) = [n for n, r in roles.items() if r == "embed"]
    assert model.get_submodule(embed) is model.get_input_embeddings()
    (head,) = [n for n, r in roles.items() if r == "head"]
    assert model.get_submodule(head) is model.get_output_embeddings()


# The rules this file tests (their patterns) → the role each gives
_NEW_RULES = {r"bottleneck\.attention\.dense": "other",
              r"attentions\.\d+\.q_lin": "q", r"attentions\.\d+\.k_lin": "k", r"attentions\.\d+\.v_lin": "v",
              r"attentions\.\d+\.out_lin": "o", r"ffns\.\d+\.lin1": "up", r"ffns\.\d+\.lin2": "down",
              r"self_attn\.dense": "o", r"attention\.attn\.q": "q", r"attention\.attn\.k": "k",
              r"attention\.attn\.v": "v", r"attention\.attn\.o": "o", r"query_global": "q", r"key_global": "k",
              r"value_global": "v", r"longformer_self_attn\.query": "q", r"longformer_self_attn\.key": "k",
              r"longformer_self_attn\.value": "v", r"self_attn\.output": "o", r"ffn\.\d+\.output\.dense": "down",
              r"embeddings": "embed", r"pred_layer\.proj": "head"}
_OLD_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|deepstack_merger_list|merger_list)\.(\d+)\.")
# model type → {module-name ending with its layer number as \d+: (role before, role now)}; XLM's and FlauBERT's got
# their layer too
_XLM = {r"attentions\.\d+\.q_lin": ("other", "q"), r"attentions\.\d+\.k_lin": ("other", "k"),
        r"attentions\.\d+\.v_lin": ("other", "v"), r"attentions\.\d+\.out_lin": ("other", "o"),
        r"ffns\.\d+\.lin1": ("other", "up"), r"ffns\.\d+\.lin2": ("other", "down")}
_EXPECTED = {
    "xlm": {**_XLM, r"pred_layer\.proj": ("other", "head")},  # its class here has the language-model head
    "flaubert": _XLM,
    **{family: {r"self_attn\.dense": ("other", "o")} for family in ("phi", "persimmon", "fuyu")},
    "mpnet": {r"attention\.attn\.q": ("other", "q"), r"attention\.attn\.k": ("other", "k"),
              r"attention\.attn\.v": ("other", "v"), r"attention\.attn\.o": ("other", "o")},
    "longformer": {r"query_global": ("other", "q"), r"key_global": ("other", "k"), r"value_global": ("other", "v")},
    "led": {r"query_global": ("other", "q"), r"key_global": ("other", "k"), r"value_global": ("other", "v"),
            r"longformer_self_attn\.query": ("other", "q"), r"longformer_self_attn\.key": ("other", "k"),
            r"longformer_self_attn\.value": ("other", "v"), r"self_attn\.output": ("other", "o")},
    "mobilebert": {r"bottleneck\.attention\.dense": ("o", "other"), r"ffn\.\d+\.output\.dense": ("other", "down")},
}


@pytest.mark.slow
def test_the_rules_change_no_other_module_of_any_transformers_class(monkeypatch):
    """Every transformers class built on the meta device: each Linear's role and layer with and without this
    file's rules (:data:`_NEW_RULES`) and layer lists (attentions.N, ffns.N). They differ only at the expected
    modules (:data:`_EXPECTED`) of XLM, FlauBERT, Phi, Persimmon, Fuyu, MPNet, Longformer, LED and MobileBERT, and
    every such change happens; a layer changes only at XLM's and FlauBERT's. Every weight of a module named
    embeddings (role embed now) is the model's input embedding (get_input_embeddings)."""
    kept = role_rules_without(_NEW_RULES)
    changed: dict[str, set[str]] = {}
    vocabularies = set()
    with quiet_transformers():
        for model_type, model in meta_models():
            config = model.config.to_dict()
            linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
            now = {n: module_info(n, config) for n in linears}
            with monkeypatch.context() as patch:
                patch.setattr(architectures, "_ROLE_REGEXES", kept)
                patch.setattr(architectures, "_LAYER", _OLD_LAYER)
                before = {n: module_info(n, config) for n in linears}
            for n, _ in model.named_parameters():
                if re.search(r"(^|\.)embeddings$", n.removesuffix(".weight")):
                    module = model.get_submodule(n.removesuffix(".weight"))
                    assert module is model.get_input_embeddings(), (model_type, n)
                    assert module_info(n.removesuffix(".weight"), config).role == "embed"
                    vocabularies.add(model_type)
            for n in linears:
                if now[n].layer != before[n].layer:
                    assert model_type in ("xlm", "flaubert") and before[n].layer is None, (model_type, n)
                if now[n].role != before[n].role:
                    ending = next((e for e in _EXPECTED.get(model_type, ()) if re.search(rf"(^|\.){e}$", n)),
                                  None)
                    assert ending is not None, (model_type, n, before[n].role, now[n].role)
                    assert (before[n].role, now[n].role) == _EXPECTED[model_type][ending], (model_type, n)
                    changed.setdefault(model_type, set()).add(ending)
    assert changed == {t: set(e) for t, e in _EXPECTED.items()}
    assert vocabularies >= {"xlm", "flaubert", "mamba", "rwkv", "nemotron_h"}
