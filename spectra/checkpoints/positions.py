"""How long a sequence a model takes, read from its ``config.json``: the one rule of ``spectra train``'s
``--max-length`` (and verify's, sweep's, calibration's ``max_length``) and ``spectra memory``'s ``--seq-len``.

A table of absolute positions (BERT's and GPT-2's learned ones, Marian's fixed sinusoid) has no row for a longer
sequence: such a length is refused. Rotary positions (Llama, GPT-NeoX), relative ones (DeBERTa-v3, Inkling),
sinusoids computed for any length (M2M100, XGLM) and a model without position encodings (Granite 4.0-H, the
state-space hybrids Jamba, Zamba, Nemotron-H) run past the length the model was configured for: a longer length is
kept, with a note naming the key that decided. Which kind a model has is read from the config's keys over its
family's: the defaults transformers' config class of its ``model_type`` fills in where the config.json is silent (a
Llama config.json of its required keys alone is rotary, a Jamba one has Jamba's mamba_d_state) (:func:`position_limit`).
tests/checkpoints/test_positions_scan.py holds the rule to every model transformers builds.

No torch here, and transformers' config classes only (once per model_type): ``spectra.memory`` imports this module at
its top."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace

from spectra.errors import ConfigError

DEFAULT_MAX_LENGTH = 128  # covers sentence classification; longer costs quadratic attention
# RoBERTa's position ids start after the padding id (create_position_ids_from_input_ids): its table of
# max_position_embeddings rows holds max_position_embeddings − pad_token_id − 1 tokens (514 → 512)
_POSITIONS_AFTER_PADDING = frozenset({"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text",
                                      "ibert", "longformer", "mpnet", "roberta-prelayernorm", "xmod", "luke", "esm"})
# an encoder-decoder's tables of learned positions, one per stack (LED), where there is no max_position_embeddings
_STACK_POSITION_KEYS = ("max_encoder_position_embeddings", "max_decoder_position_embeddings")
# config keys of rotary position encodings (transformers 5 writes rope_parameters, older configs rope_theta)
_ROTARY_KEYS = ("rope_parameters", "rope_theta", "rope_scaling", "rotary_dim", "rotary_pct", "rotary_emb_base",
                "partial_rotary_factor")
# position_embedding_type values that replace the table of learned positions with rotary ones (ESM: "rotary",
# GraniteMoeHybrid: "rope"). BERT's "relative_key"/"relative_key_query" do not: transformers 4 still indexes a table
# of 2·max_position_embeddings − 1 distances, and transformers 5 ignores the key and adds the absolute table.
_ROTARY_TYPES = frozenset({"rotary", "rope"})
# position_embedding_type values of a table of learned absolute positions, and of no position encoding at all
# (Granite 4.0-H: "nope", beside a rope_parameters its attention never reads). Any other value does not decide: the
# rotary keys do, as for a config without the key.
_LEARNED_TYPES = frozenset({"absolute", "relative_key", "relative_key_query"})
_NO_POSITION_TYPES = frozenset({"nope", "none"})
# Families whose model builds its positions from position_embedding_type alone, so that a value neither rotary nor
# learned (null) is no position encoding: ESM adds its table only at "absolute" and rotates only at "rotary";
# GraniteMoeHybrid rotates only at "rope" (transformers' default there is null, beside a rope_parameters it never
# reads). BERT's family is not one: transformers 5 adds its absolute table whatever the key says.
_SWITCHED_BY_TYPE = frozenset({"esm", "granitemoehybrid"})
# Keys of a state-space (Mamba) hybrid: Jamba's, Zamba's and Nemotron-H's attention layers encode no positions (the
# recurrent layers carry the order), unless a rotary key says otherwise (Bamba, Falcon-H1).
_STATE_SPACE_KEYS = ("mamba_d_state", "ssm_state_size")
# Keys of a hidden-state-conditioned relative position bias over rel_extent distances (Inkling), clamped beyond them.
_RELATIVE_BIAS_KEYS = ("rel_extent", "d_rel")
# T5's relative position bias (T5, mT5, LongT5, UMT5, Switch Transformers, Pop2Piano, UDOP, Pix2Struct, MusicGen's
# text encoder): its hub config.json files carry a stray n_positions (t5-small's and flan-t5's 512) that no T5 module
# reads. The key decides only where the family's config class declares no table key (_TABLE_KEYS): MPNet's has
# max_position_embeddings beside it, and MPNet adds a table of learned positions to its relative bias.
_RELATIVE_BUCKETS_KEY = "relative_attention_num_buckets"
_TABLE_KEYS = ("max_position_embeddings", "n_positions", "max_target_positions")
# Families whose sinusoidal positions are computed, not looked up: their position modules grow the sinusoid past
# max_position_embeddings (M2M100SinusoidalPositionalEmbedding and its copies) or compute it for each position
# (Pegasus-X). No config key tells these from Marian's or Pegasus's fixed sinusoidal table of max_position_embeddings
# rows, which fails past it: the family is the only rule. TrOCR says so with a key (use_learned_position_embeddings).
_COMPUTED_SINUSOID_FAMILIES = frozenset({"m2m_100", "nllb-moe", "xglm", "kosmos_2_text_model", "kosmos_2_5_text_model",
                                         "fsmt", "pegasus_x", "seamless_m4t", "seamless_m4t_v2", "speech_to_text",
                                         "musicgen_decoder", "musicgen_melody_decoder"})
# Families whose table of positions is a fixed sinusoid, not trained weights (Marian's and Pegasus's frozen
# embedding, CTRL's pos_encoding buffer, RoFormer's frozen table of rotary angles, TIPSv2's and VideoPrism's text
# buffers): still a table of max_position_embeddings (CTRL: n_positions) rows, refused past it as a learned one is
# (PositionLimit.fixed). No key says so. DistilBERT's sinusoidal_pos_embds and XLM's sinusoidal_embeddings do not
# make one: transformers 5 starts their table at a sinusoid and trains it.
_FIXED_SINUSOID_FAMILIES = frozenset({"marian", "pegasus", "ctrl", "roformer", "tipsv2_text_model",
                                      "videoprism_text_model"})
# What runs past the configured positions, by the kind of positions that are not a learned table; {why} is the key
# that decided (PositionLimit.why).
_RUNS_PAST = {"rotary": "its rotary positions run past them",
              "relative": "it has no table of absolute positions ({why}): its relative positions run past them",
              "sinusoidal": "its sinusoidal positions are computed for any length ({why}): they run past them",
              "none": "it encodes no positions ({why}): nothing in it stops at them"}


@dataclass(frozen=True)
class PositionLimit:
    """The longest sequence a model's positions cover, as its config gives it.

    Attributes
    ----------
    length : int
        Tokens.
    source : str
        Where it comes from, e.g. ``max_position_embeddings = 32``.
    positions : {"learned", "rotary", "relative", "sinusoidal", "none"}
        ``learned``: a table of absolute positions (BERT, GPT-2, RoBERTa, DeBERTa by default,
        Marian's fixed sinusoidal one): a longer sequence has no position to embed, and the model
        fails. Rotary positions (Llama, GPT-NeoX, ESM's ``position_embedding_type = "rotary"``),
        relative ones (a DeBERTa without the absolute table, ``position_biased_input = false``;
        Inkling's relative bias), sinusoidal positions computed for any length (M2M100, XGLM) run
        past the length the model was configured for, and so does a model that encodes no
        positions (``none``: Granite 4.0-H's ``position_embedding_type = "nope"``, the state-space
        hybrids Jamba, Zamba, Nemotron-H, an MLA without a rotary part, ``qk_rope_head_dim = 0``).
    why : str
        The key that decided ``positions``, e.g. ``position_biased_input = false``, ``mamba_d_state = 16,
        jamba's default``; empty where the rotary keys or the fallback to a learned table did.
    fixed : str
        Of a ``learned`` table whose rows are a fixed sinusoid, not trained weights, the family that
        has one: ``model_type = marian`` (Marian, Pegasus, CTRL, RoFormer); empty for a trained table
        and for positions that are no table. The refusal of a longer length says which table it is.
        :attr:`table` is true of both tables, :attr:`learned` of the trained one only.
    """

    length: int
    source: str
    positions: str
    why: str = ""
    fixed: str = ""

    @property
    def table(self) -> bool:
        """Whether a longer sequence has no position to embed: a table of absolute positions, learned or fixed (a
        ``learned`` kind, :attr:`fixed` or not). What a length beyond :attr:`length` is refused by."""
        return self.positions == "learned"

    @property
    def learned(self) -> bool:
        """Whether the positions are a table of trained weights (BERT's, GPT-2's): a :attr:`table` whose rows are no
        fixed sinusoid (Marian's, :attr:`fixed`)."""
        return self.table and not self.fixed


def position_limit(model_config: Mapping) -> PositionLimit | None:
    """The :class:`PositionLimit` of a model's ``config.json`` dict, or None when it declares none.

    Read from ``max_position_embeddings`` (BERT, Llama, …), ``n_positions`` (GPT-2) or
    ``max_target_positions`` (the decoder's table of Whisper, which loads as a causal LM),
    of the config or of its ``text_config`` (a multimodal model's language tower); a
    RoBERTa-family table loses the rows its position ids skip (the padding id and those
    below it). An encoder–decoder whose stacks have tables of their own (LED's
    ``max_encoder_position_embeddings`` and ``max_decoder_position_embeddings``) is limited
    by the shorter: one ``max_length`` cuts its source and its target; so is a composite one (EncoderDecoderModel's
    ``encoder`` and ``decoder`` configs: a table binds before a stack whose positions run past). A model with no such
    key (T5's relative positions, BLOOM's ALiBi) has no limit here; a T5-family config.json's stray ``n_positions``
    (t5-small's 512) is read as ``relative`` positions, which run past it (``relative_attention_num_buckets`` decides
    where the family's config class declares no table key). Whether the length binds
    (:attr:`PositionLimit.positions`, and :attr:`PositionLimit.why`) is read from the keys that replace the learned
    table (``position_embedding_type``, DeBERTa's ``position_biased_input``, ``qk_rope_head_dim = 0``, Zamba2's
    ``use_mem_rope``, TrOCR's ``use_learned_position_embeddings``, a relative bias's ``rel_extent``, the rotary
    keys, a state-space hybrid's ``mamba_d_state``) and a few families' computed sinusoids, over the defaults of its
    family (transformers' config class of its ``model_type``): a Llama config.json of its required keys alone is
    rotary, as its model is.
    """
    for scope in (model_config, model_config.get("text_config") or {}):
        for key in _TABLE_KEYS:
            value = scope.get(key)
            if not _positive_int(value):
                continue
            source = f"{key} = {value}"
            length = value
            if scope.get("model_type") in _POSITIONS_AFTER_PADDING:
                skipped = int(scope.get("pad_token_id") or 0) + 1
                length -= skipped
                source += f", less the {skipped} ids its position ids start after (pad_token_id + 1)"
            return PositionLimit(length, source, *_positions(scope))
        sides = {key: scope[key] for key in _STACK_POSITION_KEYS if _positive_int(scope.get(key))}
        if sides:  # source and target are cut at one length: the shorter table binds
            key = min(sides, key=sides.get)
            source = f"{key} = {sides[key]}" + (", the shorter of the encoder's and the decoder's" if len(sides) > 1
                                                else "")
            return PositionLimit(sides[key], source, *_positions(scope))
    # a composite encoder–decoder (EncoderDecoderModel's BERT2BERT, VisionEncoderDecoderModel's text decoder): a
    # config of each stack; one max_length cuts both, so a table binds before a stack that runs past its positions,
    # and the shorter table first
    stacks = [(name, limit) for name in ("encoder", "decoder") if isinstance(model_config.get(name), Mapping)
              and (limit := position_limit(model_config[name])) is not None]
    if stacks:
        name, limit = min(stacks, key=lambda stack: (not stack[1].table, stack[1].length))
        return replace(limit, source=f"its {name}'s {limit.source}")
    return None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _positions(scope: Mapping) -> tuple[str, str, str]:
    """(kind, why, fixed) of the positions a config dict gives its model: ``learned``, ``rotary``, ``relative``,
    ``sinusoidal`` or ``none``, the key that decided (:attr:`PositionLimit.why`), and of a table whose rows are a
    fixed sinusoid the family that has one (:attr:`PositionLimit.fixed`).

    The keys are read as transformers reads them: its config class of the dict's ``model_type`` fills in the keys
    the dict lacks (a Llama config.json of its required keys alone gets Llama's rope_parameters, a Zamba2 one
    its use_mem_rope = false beside a rope_theta), and the dict's own keys win. Where none decides, a table of
    learned positions: GPT-2's and BERT's families, and a model_type transformers does not know (the refusal errs on
    the side of a crash)."""
    model_type = scope.get("model_type")
    family = _family_defaults(model_type) if isinstance(model_type, str) else None
    config = {**(family or {}), **scope}
    if family is not None and _RELATIVE_BUCKETS_KEY in config and not any(k in family for k in _TABLE_KEYS):
        # a T5: the bias over relative_attention_num_buckets distances, no table (its config class has no table key)
        value = config[_RELATIVE_BUCKETS_KEY]
        own = "" if _RELATIVE_BUCKETS_KEY in scope else f", {model_type}'s default"
        return ("relative", f"a relative position bias, {_RELATIVE_BUCKETS_KEY} = {json.dumps(value)}{own}; "
                             f"{model_type}'s config class declares no table of positions", "")
    kind, why = _keyed_positions(config, scope) or ("learned", "")
    return kind, why, _fixed_sinusoid(config) if kind == "learned" else ""


def _fixed_sinusoid(config: Mapping) -> str:
    """``model_type = marian`` where a family's table of positions is a fixed sinusoid, empty for a table of trained
    weights."""
    model_type = config.get("model_type")
    return f"model_type = {model_type}" if model_type in _FIXED_SINUSOID_FAMILIES else ""


def _keyed_positions(config: Mapping, own: Mapping) -> tuple[str, str] | None:
    """(kind, why) named by the keys of ``config`` (a config dict over its family's defaults), None where none
    decides; ``own`` (the dict as given) tells a key the config.json holds from its family's default."""

    def said(key: str) -> str:  # e.g. "use_mem_rope = false, zamba2's default"
        value = config[key]
        text = f"{key} = {value if isinstance(value, str) else json.dumps(value)}"
        return text if key in own else f"{text}, {config.get('model_type')}'s default"

    model_type = config.get("model_type")
    if config.get("position_biased_input") is False:  # DeBERTa: no absolute table, relative attention only
        return "relative", said("position_biased_input")
    kind = config.get("position_embedding_type")
    # a known value decides: ESM writes rope_theta even when its positions are "absolute", Granite 4.0-H
    # rope_parameters beside "nope"
    if kind in _ROTARY_TYPES:
        return "rotary", said("position_embedding_type")
    if kind in _LEARNED_TYPES:
        return "learned", said("position_embedding_type")
    if kind in _NO_POSITION_TYPES or (model_type in _SWITCHED_BY_TYPE and "position_embedding_type" in config):
        return "none", said("position_embedding_type")
    if config.get("alibi") is True:  # Falcon-RW: ALiBi's distance bias in place of rotary positions
        return "relative", f"ALiBi, {said('alibi')}"
    if config.get("qk_rope_head_dim") == 0:  # MLA (GLM-5-Next): no rotary part in its queries and keys
        return "none", said("qk_rope_head_dim")
    if isinstance(config.get("use_mem_rope"), bool):  # Zamba2: its shared attention rotates only when set
        return ("rotary", said("use_mem_rope")) if config["use_mem_rope"] else ("none", said("use_mem_rope"))
    if isinstance(config.get("use_learned_position_embeddings"), bool):  # TrOCR: a table, or a computed sinusoid
        return ("learned" if config["use_learned_position_embeddings"] else "sinusoidal",
                said("use_learned_position_embeddings"))
    relative = next((k for k in _RELATIVE_BIAS_KEYS if k in config), None)
    if relative is not None:
        return "relative", f"a relative position bias, {said(relative)}"
    if model_type in _COMPUTED_SINUSOID_FAMILIES:
        return "sinusoidal", f"model_type = {model_type}"
    if any(k in config for k in _ROTARY_KEYS):
        return "rotary", ""
    state_space = next((k for k in _STATE_SPACE_KEYS if k in config), None)
    if state_space is not None:
        return "none", f"a state-space hybrid, {said(state_space)}, with no rotary key"
    return None


@functools.cache
def _family_defaults(model_type: str) -> dict | None:
    """The config dict transformers' config class of ``model_type`` holds with no key given (what it fills in where
    a config.json is silent), None where this transformers has no such class."""
    try:
        import transformers  # here, not at the top: only a config naming a model_type needs it (once per type)

        return transformers.AutoConfig.for_model(model_type).to_dict()
    except Exception:  # an unknown model_type, no transformers, a class whose defaults do not validate
        return None


def check_max_length(max_length: int | None, *, option: str) -> None:
    """Refuse a ``max_length`` that is neither None (the default) nor an integer ≥ 2.

    The one check of the option, in ``TrainConfig``, ``VerifyConfig`` and ``CalibrationConfig``.
    Two tokens are the fewest an example can hold: one to read and one to predict
    (:func:`tokenize` drops shorter blocks).

    Parameters
    ----------
    max_length : int or None
    option : str
        How the user set it, for the error: ``max_length (--max-length)``, ``calibration max_length``.

    Raises
    ------
    ConfigError
        A float (``2.5``, or ``64.0`` read from a JSON file), a bool, a string, or an int below 2.
    """
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ConfigError(f"{option} {max_length!r} must be an integer ≥ 2 (tokens per example), or unset for the "
                          f"default ({DEFAULT_MAX_LENGTH}, or the model's position limit when shorter).")


def resolve_max_length(max_length: int | None, model_config: Mapping, *, option: str = "max_length (--max-length)",
                       notes: list[str] | None = None, default: int = DEFAULT_MAX_LENGTH,
                       cut: str = "examples are cut at {length} tokens", rotary: bool = False) -> int:
    """Tokens per example for the model of ``model_config``: what was asked, within what its positions cover.

    The one rule for a sequence length, of ``spectra train``'s ``--max-length`` and ``spectra memory``'s
    ``--seq-len`` (each passes its own ``option``, ``default`` and ``cut``).

    Parameters
    ----------
    max_length : int or None
        The length asked for; None: ``default``, or the model's :func:`position_limit` when
        that is shorter (a default is no request, so it is cut to fit, and ``notes`` says so).
    model_config : mapping
        The model's ``config.json``.
    option : str
        How the user set ``max_length``, for the error and the notes: ``max_length (--max-length)``,
        ``seq_len (--seq-len)``.
    notes : list of str, optional
        Receives a note (starting with ``option``) when the default is cut to the model's limit, or when a length
        beyond the configured positions of a model whose positions run past them (rotary,
        relative, computed sinusoids, none) is kept.
    default : int
        The length when none is asked: :data:`DEFAULT_MAX_LENGTH` (examples to train on);
        ``spectra memory`` estimates a longer context (its ``DEFAULT_SEQ_LEN``).
    cut : str
        How the note of a default cut to the model's limit words the length, ``{length}`` filled in:
        ``examples are cut at {length} tokens``, ``{length} tokens per sequence``.
    rotary : bool
        The caller reads the model as rotary where neither its config.json nor its family's
        defaults say so: ``spectra memory`` reads a config of a model_type transformers does
        not know (or of none) with Llama's keys as Llama-like (``ModelShape.rotary``). A table
        read as learned then does not refuse a longer length.

    Raises
    ------
    ConfigError
        An explicit ``max_length`` beyond a table of positions (BERT's and GPT-2's learned ones,
        Marian's fixed sinusoid), naming the option, the value, the kind of table and the model's limit.
    """
    limit = position_limit(model_config)
    if limit is not None and rotary and limit.table:
        limit = replace(limit, positions="rotary")
    if max_length is None:
        if limit is None or limit.length >= default:
            return default
        if notes is not None:
            notes.append(f"{option}: {cut.format(length=limit.length)}, not the default {default}: the model's "
                         f"positions cover {limit.length} ({limit.source} in its config.json).")
        return limit.length
    if limit is None or max_length <= limit.length:
        return max_length
    runs_past = _RUNS_PAST.get(limit.positions, "").format(why=limit.why)
    if limit.table:
        table = f"fixed sinusoidal positions ({limit.fixed})" if limit.fixed else "learned positions"
        raise ConfigError(f"{option} {max_length} is more than the model can take: its table of {table} "
                          f"covers {limit.length} tokens ({limit.source} in its config.json), and a longer sequence "
                          f"has no position to embed. Pass {option} {limit.length} or less, or leave it out for the "
                          f"default ({default} tokens, or the model's {limit.length} when fewer).")
    if notes is not None:
        notes.append(f"{option} {max_length} is beyond the {limit.length} positions the model is configured for "
                     f"({limit.source} in its config.json); {runs_past}, but it was not "
                     "trained on sequences this long.")
    return max_length
