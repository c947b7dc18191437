"""Embedding tables looked up by position or segment have role pos_embed: position tables (GPT-2's wpe, BERT's
position_embeddings, BART's and OPT's embed_positions), token-type tables (BERT's token_type_embeddings) and
relative-position tables (T5's relative_attention_bias); a vocabulary's table keeps (or, CLIP's token_embedding, gets)
role embed.

What was wrong: they got role other, so ``recommend``'s default plan (every matrix but embeddings, heads and routers)
planned them and they took budget (audit F2). The references are the models themselves, built from config: which of
their modules are ``nn.Embedding`` and which one is the model's own input embedding (``get_input_embeddings``), and, in
the slow scan, every transformers class's modules.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from spectra.checkpoints import architectures
from spectra.checkpoints.architectures import module_info, role_selected
from spectra.checkpoints.roles import BLOCK_ROLES, default_roles
from tests.models import meta_models, on_grid, tiny_config

FAMILIES = ("gpt2", "bert", "bart", "t5", "opt")
# the tables the token-embedding rule (embed_tokens, wte, word_embeddings, shared …) did not name, by family
TABLES = {"gpt2": {"transformer.wpe"},
          "bert": {"bert.embeddings.position_embeddings", "bert.embeddings.token_type_embeddings"},
          "bart": {"model.encoder.embed_positions", "model.decoder.embed_positions"},
          "t5": {"encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
                 "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"},
          "opt": {"model.decoder.embed_positions"}}


def tiny_model(family: str):
    """A tiny model of `family` with its head, on the 2⁻¹² grid (OPT's config here, the rest from tests.models)."""
    import transformers as tf

    if family == "opt":
        config = tf.OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=32, word_embed_proj_dim=32, vocab_size=64)
        return on_grid(tf.OPTForCausalLM, config)
    classes = {"gpt2": tf.GPT2LMHeadModel, "bert": tf.BertForSequenceClassification,
               "bart": tf.BartForConditionalGeneration, "t5": tf.T5ForConditionalGeneration}
    return on_grid(classes[family], tiny_config(family))


def _roles(model) -> dict[str, tuple[str, str]]:
    """Module name → (its type, its role), for every module holding a weight."""
    config = model.config.to_dict()
    return {name: (type(m).__name__, module_info(name, config).role) for name, m in model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2}


# The token-embedding rule before the vocabularies under other names (CLIP's token_embedding …) joined it
_OLD_TOKEN_RULE = r"(embed_tokens|word_embeddings|wte|embed_in|tok_embeddings|shared)"


def _rules_before() -> tuple:
    """The role rules as they were: without the position-table rule, with the old token-embedding rule."""
    rules = []
    for regex, role in architectures._ROLE_REGEXES:
        if role == "pos_embed":
            continue
        if role == "embed" and "token_embedding" in regex.pattern:
            regex = re.compile(rf"(^|\.){_OLD_TOKEN_RULE}$")
        rules.append((regex, role))
    assert len(rules) == len(architectures._ROLE_REGEXES) - 1
    return tuple(rules)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_position_table_has_role_pos_embed(family):
    model = tiny_model(family)
    roles = _roles(model)
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    # the input embedding, and the tables that share its weight (BART's and T5's encoder and decoder embed_tokens)
    shared = model.get_input_embeddings().weight
    vocabulary = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding) and m.weight is shared}
    assert TABLES[family] <= embeddings  # the tables this test is about exist in the model
    assert {n for n, (_, role) in roles.items() if role == "pos_embed"} == embeddings - vocabulary == TABLES[family]
    assert {n for n, (_, role) in roles.items() if role == "embed"} == vocabulary  # the token embedding alone
    assert all(role not in ("embed", "pos_embed") for name, (_, role) in roles.items() if name not in embeddings)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_rule_the_tables_were_other(family, monkeypatch):
    """Negative control: the rules as they were give these tables role other, and the rest the roles they have."""
    model = tiny_model(family)
    now = _roles(model)
    monkeypatch.setattr(architectures, "_ROLE_REGEXES", _rules_before())
    before = _roles(model)
    assert {n for n in now if now[n] != before[n]} == TABLES[family]
    assert all(before[n][1] == "other" and now[n][1] == "pos_embed" for n in TABLES[family])


def test_roles_pos_embed_selects_the_tables_and_no_default_does():
    """--roles pos_embed takes a position table; --roles embed (the token embedding), --roles other and no command's
    default roles (train's, extract's, memory's, the sweep's: block roles) do."""
    for name in TABLES["gpt2"] | TABLES["t5"] | TABLES["bert"]:
        role = module_info(name).role
        assert role_selected(role, ("pos_embed",), name)
        assert not role_selected(role, default_roles(None), name) and role not in BLOCK_ROLES
        assert not role_selected(role, ("embed",), name) and not role_selected(role, ("other",), name)
    assert not role_selected("embed", ("pos_embed",), "transformer.wte")


def test_vocabularies_under_other_names_are_embed():
    """CLIP's token_embedding, XLNet's word_embedding and GPT-1's tokens_embed are their model's input embedding
    (transformers' get_input_embeddings): role embed, as wte; their position tables pos_embed."""
    import transformers as tf

    clip = tf.CLIPTextModel(tf.CLIPTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                              num_attention_heads=4, vocab_size=64, max_position_embeddings=16))
    gpt1 = tf.OpenAIGPTModel(tf.OpenAIGPTConfig(n_embd=32, n_layer=1, n_head=4, n_positions=16, vocab_size=64))
    xlnet = tf.XLNetModel(tf.XLNetConfig(d_model=32, n_layer=1, n_head=4, d_inner=48, vocab_size=64))
    for model in (clip, gpt1, xlnet):
        roles = _roles(model)
        (vocabulary,) = [n for n, m in model.named_modules() if m is model.get_input_embeddings()]
        assert roles[vocabulary][1] == "embed"
        assert {n for n, (_, r) in roles.items() if r == "embed"} == {vocabulary}
    assert _roles(clip)["embeddings.position_embedding"][1] == "pos_embed"
    assert _roles(gpt1)["positions_embed"][1] == "pos_embed"


def test_a_llamas_only_table_is_its_token_embedding():
    """Negative control: a Llama (rotary positions: no table) has one embed, embed_tokens, no pos_embed; its Linears
    keep their roles."""
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    roles = _roles(tf.LlamaForCausalLM(config))
    assert {n for n, (_, r) in roles.items() if r == "embed"} == {"model.embed_tokens"}
    assert {r for n, (_, r) in roles.items() if n != "model.embed_tokens"} == {"q", "k", "v", "o", "gate", "up",
                                                                                  "down", "head"}


# rev1 F3: tables looked up by position or relative distance that the first rule missed, by model type (transformers'
# base model class of it, built from its default config on the meta device) and module name
MORE_TABLES = {"bark": "semantic.position_embeds_layer",  # learned absolute positions, GPT-2-like
               "clvp": "speech_decoder_model.model.decoder.position_embeds_layer",
               "wavlm": "encoder.layers.0.attention.rel_attn_embed",  # relative position bias table
               "wav2vec2-bert": "encoder.layers.0.self_attn.distance_embedding",  # relative distances
               "speecht5": "encoder.wrapped_encoder.embed_positions.pe_k",  # relative positions
               "phi4_multimodal": "embed_tokens_extend.audio_embed.encoder.relative_attention_bias_layer.bias_values",
               "kosmos-2.5": "vision_model.embeddings.row_embedder",  # patch row and column tables
               "florence2": "model.multi_modal_projector.image_position_embed.column_embeddings"}  # was projector


def _meta_base_model(model_type: str):
    import transformers as tf
    from transformers.models.auto import modeling_auto

    cls = next(m[model_type] for m in (modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                                       modeling_auto.MODEL_MAPPING_NAMES) if model_type in m)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return getattr(tf, cls if isinstance(cls, str) else cls[0])._from_config(tf.AutoConfig.for_model(model_type))


@pytest.mark.parametrize("model_type", sorted(MORE_TABLES))
def test_more_position_and_distance_tables_are_pos_embed(model_type, monkeypatch):
    """Each is an nn.Embedding of its model and role pos_embed; under the rules before rev1's tables (the first
    pos_embed rule) it was other (Florence2's: projector); the model's Linears keep their roles."""
    from spectra.checkpoints.architectures import _POSITION_TABLES

    model = _meta_base_model(model_type)
    config = model.config.to_dict()
    name = MORE_TABLES[model_type]
    assert isinstance(model.get_submodule(name), torch.nn.Embedding)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    now = {n: module_info(n, config).role for n in linears + [name]}
    assert now[name] == "pos_embed"
    first = (r"(wpe|\w*pos(ition)?s?_emb(ed|edding|eddings)?(_table)?|\w*token_type_embeddings(_\d+)?"
             r"|segment_emb(edding)?|embed_positions|relative_attention_bias|rel_embeddings)")
    monkeypatch.setattr(architectures, "_ROLE_REGEXES", tuple(
        (re.compile(rf"(^|\.){first}$") if role == "pos_embed" else regex, role)
        for regex, role in architectures._ROLE_REGEXES))
    assert _POSITION_TABLES != first
    before = {n: module_info(n, config).role for n in linears + [name]}
    assert before[name] == ("projector" if model_type == "florence2" else "other")
    assert {n: r for n, r in now.items() if n != name} == {n: r for n, r in before.items() if n != name}


# What the new rules may change, by the type of the module (or "parameter" for a bare parameter such as
# a ViT's pos_embed): an embedding table, a container of position encodings (sinusoidal or rotary, no weight), a
# table held as a parameter. Never a Linear. From role other (or projector: a projector stack's position table) to
# pos_embed, or, for a vocabulary under another name, from other to embed.
_TABLE_TYPES = re.compile(r"\w*(Embedding|Position|Rotary)\w*|parameter")


@pytest.mark.slow
def test_the_table_rules_change_no_linear_of_any_transformers_class(monkeypatch):
    """Every transformers class built on the meta device (~570): the role of each module and bare parameter under the
    rules and under the rules as they were (:func:`_rules_before`). They differ only at embedding tables
    (nn.Embedding and its subclasses, position encodings, tables held as parameters), from other (or projector) to
    pos_embed, and at vocabularies under other names, other to embed; at GPT-2's, BERT's, BART's, T5's and OPT's
    tables among them, and at rev1's (WavLM's rel_attn_embed, Wav2Vec2-BERT's distance_embedding, Kosmos-2.5's
    row_embedder, Florence2's projector row_embeddings)."""
    import transformers as tf

    kept = _rules_before()
    changed, built = {}, 0
    verbosity = tf.utils.logging.get_verbosity()
    tf.utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for model_type, model in meta_models():
                built += 1
                cfg = model.config.to_dict()
                kinds = {n: type(m).__name__ for n, m in model.named_modules() if n}
                kinds |= {n: "parameter" for n, _ in model.named_parameters() if not n.endswith((".weight", ".bias"))}
                now = {n: module_info(n, cfg).role for n in kinds}
                with monkeypatch.context() as patch:
                    patch.setattr(architectures, "_ROLE_REGEXES", kept)
                    before = {n: module_info(n, cfg).role for n in kinds}
                for n in kinds:
                    if now[n] != before[n]:
                        changed.setdefault(model_type, set()).add((re.sub(r"\.\d+\.", ".N.", n), kinds[n],
                                                                   before[n], now[n]))
    finally:
        tf.utils.logging.set_verbosity(verbosity)
    assert built > 400
    for model_type, changes in changed.items():
        for name, kind, before, now in changes:
            assert _TABLE_TYPES.fullmatch(kind) and "Linear" not in kind, (model_type, name, kind)
            assert (before, now) in (("other", "pos_embed"), ("projector", "pos_embed")) or (
                (before, now) == ("other", "embed") and re.search(r"(token_embedding|word_embedding|tokens_embed)$",
                                                                  name)), (model_type, name, before, now)
    expected = {("gpt2", "transformer.wpe"), ("bert", "embeddings.position_embeddings"),
                ("bert", "embeddings.token_type_embeddings"), ("bart", "decoder.embed_positions"),
                ("t5", "encoder.block.N.layer.N.SelfAttention.relative_attention_bias"),
                ("opt", "decoder.embed_positions"), ("wavlm", "encoder.layers.N.attention.rel_attn_embed"),
                ("wav2vec2-bert", "encoder.layers.N.self_attn.distance_embedding"),
                ("kosmos-2.5", "vision_model.embeddings.row_embedder"),
                ("florence2", "multi_modal_projector.image_position_embed.row_embeddings")}
    for model_type, ending in expected:
        assert any(n == ending or n.endswith("." + ending) for n, _, _, _ in changed[model_type]), (model_type, ending)


def test_analyze_roles_help_lists_every_role():
    """`spectra analyze --roles`'s help names every role a module can have (kv, o_a, o_b and projector were
    missing)."""
    import typing

    from spectra.cli.analysis import analyze

    option = typing.get_type_hints(analyze, include_extras=True)["roles"].__metadata__[0]
    listed = option.help.partition("(")[2].partition(";")[0].split(", ")
    assert listed == list(architectures.ROLES)
