"""Base × tuned → a stream of exact ΔW records, one module at a time.

Every matrix ΔW comes out oriented like ``torch.nn.Linear.weight``, ``(out, in)``,
upcast to float32 (or float64) *before* subtracting. The pairing handles prefix
differences between model classes, Conv1D transposition, fused projections (split
per projection, GQA-aware, with the fused whole kept), tied embeddings, resized
vocabularies, a classification head of another class count (set aside with a note: re-initialised, it has no ΔW),
3-D MoE expert tensors (each side in its own stored layout: Qwen3-VL-MoE's
hub (E, in, out) against transformers 5's (E, out, in); JetMoE's ``….input_linear.weight`` (E, out, in), one record
per expert, ``….input_linear.3``; GraniteMoE's ``block_sparse_moe.input_linear.weight`` (E, out, in), one record per
expert named as transformers loads it, ``…block_sparse_moe.experts.3.gate_up_proj``; any other 3-D ``.weight`` under
an MoE block is skipped with a note, never flattened), experts stored per expert on one side and fused on the other
(``save_pretrained``'s Mixtral ``block_sparse_moe.experts.3.w1.weight`` against a state dict's
``mlp.experts.gate_up_proj``: each expert read from its place in the fused parameter, as transformers' loading
conversions place it, and named as the base names it), and a PEFT adapter as the tuned side.

Only metadata is read when a :class:`Pairing` is built; tensors are read one pair at
a time while iterating, so peak memory is a few tensors whatever the model's size.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from spectra.checkpoints.adapter import AdapterDelta, plan_adapter
from spectra.checkpoints.architectures import (ROLES, ModuleInfo, Projection, bigcode_projections, conv1d_by_shape,
                                              experts_in_out, fused_projections,
                                              dbrx_experts, is_conv1d, loaded_experts, missing_stacks, module_info, moe_weight,
                                              parallel_experts, parse_stacks,
                                              role_named, stack_selected, vector_info)
from spectra.checkpoints.buffers import Lease
from spectra.checkpoints.names import compile_name_filter, match_names
from spectra.checkpoints.source import (AdapterSource, architecture_difference, architecture_note, open_checkpoint,
                                        recorded_base_note)
from spectra.errors import ConfigError, NonFiniteWeightError, PairingError
from spectra.linalg.sketch import BlockSquaredNorm, squared_norm

_CONV1D_WEIGHTS = (".c_attn.weight", ".c_proj.weight", ".c_fc.weight", ".q_attn.weight")  # GPT-2's Conv1D names
_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}
# a LoRA factor as PEFT saves it (base_model.model.….lora_A.weight, ….lora_embedding_B): only an adapter holds these
# (a checkpoint with LoRA modules of its own, Phi-4-multimodal's, names them without PEFT's prefix)
_PEFT_FACTOR = re.compile(r"^base_model\.model\..*\.lora_(?:embedding_)?[AB](?:\.|$)")
_LORA_FACTOR = re.compile(r"\.lora_(?:embedding_)?[AB](?:\.|$)|\.lora_magnitude_vector")
# the last sentence of a NaN/Inf error: the command line names its own option instead (analyze's --skip-nonfinite), or
# drops the sentence where the command has none (extract, sweep, verify: a broken checkpoint is re-saved, not skipped)
SKIP_NONFINITE_HINT = "Pass on_nonfinite='skip' to analyse the rest."


@dataclass(frozen=True)
class PairingOptions:
    """Which ΔW to produce and how.

    Attributes
    ----------
    roles : tuple of str, optional
        Keep only these roles (see ``architectures.ROLES``); None keeps all.
    stacks : tuple of str, optional
        Keep only these stacks (``architectures.STACK_NAMES``: ``language``, ``vision``, ``encoder`` …), with
        the roles: ``roles=("q", "v"), stacks=("language",)`` is the language model's q and v, not a vision
        tower's. None keeps all. A stack the checkpoints lack is noted (``Pairing.notes``); none of them held is
        refused.
    layers : tuple (first, last), optional
        Keep only layers ``first..last`` inclusive; modules without a layer are dropped.
    include, exclude : str, optional
        Glob on module names (a plain word matches any name containing it) or ``re:REGEX``.
    dtype : {"float32", "float64"}
        Dtype of the subtraction and of ΔW. float32 is exact for bf16/fp16 inputs.
    device : str
        Torch device for ΔW ("cpu", "cuda", "cuda:1").
    split_fused : bool
        Also yield each projection of a fused tensor (``c_attn[q]``…), not only the whole.
    vectors : bool
        Also yield 1-D deltas (norms, biases) and 0-D ones (scalar parameters: CLIP's ``logit_scale``, shape ``()``)
        as ``kind="vector"`` records.
    with_weights : bool
        Attach the upcast base and tuned weights (same orientation) to each record.
    weights_as_stored : bool
        With `with_weights`, attach the weights in their storage dtype instead (oriented
        views of the checkpoint's memory map, no up-cast copy): for consumers that only
        sample, sketch or up-cast them piecewise.
    norms : bool
        Give every whole record ``delta_sq`` and ``base_sq`` (‖ΔW‖_F², ‖W_base‖_F²), taken
        while the pair is read; the chunked subtraction takes them anyway, others pay one
        pass over each tensor (:func:`~spectra.linalg.sketch.squared_norm`).
    load : bool
        Read tensors; False yields metadata only (``delta`` is None), for listings.
    on_nonfinite : {"error", "skip"}
        A NaN/Inf weight raises, or is skipped and listed in ``Pairing.skipped``.
    low_copy_above : int, optional
        Also give each matrix whose short side exceeds this ``DeltaW.delta_low``, ΔW
        rounded to bfloat16 (what the analysis's bf16 sketch multiplies with), written
        chunk by chunk during the subtraction; only on its chunked CPU route into float32,
        None elsewhere.
    """

    roles: tuple[str, ...] | None = None
    stacks: tuple[str, ...] | None = None  # None: every stack (language model, vision tower, encoder, …)
    layers: tuple[int, int] | None = None
    include: str | None = None
    exclude: str | None = None
    dtype: str = "float32"  # exact for bf16/fp16 checkpoints, half the memory of float64
    device: str = "cpu"
    split_fused: bool = True  # per-projection spectra are what LoRA on q/k/v would see
    vectors: bool = True  # norm/bias drift is cheap to report and often telling
    with_weights: bool = False  # analysis needs W_base for noise floors and amplification
    weights_as_stored: bool = False  # bf16 views cost no memory; an fp32 copy of both costs 4 bytes/param
    norms: bool = False  # extract and sweep weigh each update against its weight without keeping the weight
    load: bool = True
    on_nonfinite: str = "error"  # a NaN in a weight is a broken checkpoint, not data
    low_copy_above: int | None = None  # bf16 copy of ΔW for the sketch, made while each chunk is in cache

    def __post_init__(self) -> None:
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
            unknown = sorted(set(self.roles) - set(ROLES))
            if unknown:
                raise ConfigError(f"roles: unknown role(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}.")
        object.__setattr__(self, "stacks", parse_stacks(self.stacks))
        if self.layers is not None:
            first, last = self.layers
            if first < 0 or last < first:
                raise ConfigError(f"layers: ({first}, {last}) is not a range first..last with 0 ≤ first ≤ last.")
        if self.dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(_COMPUTE_DTYPES)}; ΔW is never "
                              "computed in half precision.")
        if self.on_nonfinite not in ("error", "skip"):
            raise ConfigError(f"on_nonfinite: {self.on_nonfinite!r} must be 'error' or 'skip'.")
        check_device(self.device)
        compile_name_filter(self.include, option="include")
        compile_name_filter(self.exclude, option="exclude")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _COMPUTE_DTYPES[self.dtype]

    def low_copy(self, kind: str, shape: tuple[int, ...]) -> bool:
        """Whether an entry of this kind and (oriented) shape gets ``DeltaW.delta_low`` (``low_copy_above``)."""
        return self.low_copy_above is not None and kind == "matrix" and min(shape) > self.low_copy_above


@dataclass
class DeltaW:
    """One weight update ΔW = W_tuned − W_base, oriented ``(out, in)``.

    ``name`` is the checkpoint module name without ``.weight`` for matrices (a split
    projection of a fused tensor gets a suffix: ``transformer.h.0.attn.c_attn[q]``), and
    the full tensor name for vectors (``model.norm.weight``, ``…q_proj.bias``).
    """

    name: str
    role: str
    layer: int | None
    expert: int | None
    kind: str  # "matrix", or "vector": 1-D (a norm, a bias) or 0-D (a scalar parameter)
    shape: tuple[int, ...]  # (out, in) for matrices
    base_dtype: str
    tuned_dtype: str
    delta: torch.Tensor | None
    base_tensor: str  # tensor name in the base checkpoint
    fused_name: str | None = None  # for split projections: the fused module's name
    conv1d: bool = False  # stored (in, out) on disk; PEFT needs fan_in_fan_out=True
    added_rows: int = 0  # resized vocabulary: rows present in tuned only (not in ΔW)
    base: torch.Tensor | None = None  # upcast W_base, same orientation (with_weights)
    tuned: torch.Tensor | None = None  # upcast W_tuned over the shared rows (with_weights)
    delta_sq: float | None = None  # ‖ΔW‖_F² when the subtraction took it on the way (else None)
    base_sq: float | None = None  # ‖W_base‖_F² likewise
    delta_low: torch.Tensor | None = None  # ΔW rounded to bfloat16 (PairingOptions.low_copy_above), same layout
    # a quantised side's storage format (mxfp4, float8_e4m3fn), which the listed dtype (its dequantised values') is
    # not, and the spacing of its grid at each element, shaped as ΔW: its rounding (with_weights only)
    base_format: str | None = None
    tuned_format: str | None = None
    base_spacing: torch.Tensor | None = None
    tuned_spacing: torch.Tensor | None = None
    stack: str | None = None  # "vision", … (architectures.STACKS), None: the language model; layers count within it


@dataclass(frozen=True)
class TunedSlice:
    """Where an entry's tuned (out, in) matrix lies when the tuned checkpoint stores the experts in the other of the
    two layouts transformers loads into one parameter (its weight converters).

    ``expert`` set: rows ``rows`` (all when None) of expert ``expert`` of the fused 3-D ``tensors[0]`` (E, out, in)
    (Mixtral's ``block_sparse_moe.experts.3.w3.weight`` of a base against rows [ffn, 2·ffn) of expert 3 of the
    tuned ``mlp.experts.gate_up_proj``). ``expert`` None: the per-expert 2-D ``tensors`` stacked on their rows in
    this order (a fused base's ``experts.gate_up_proj[3]`` against the tuned ``experts.3.w1.weight`` then
    ``….w3.weight``).
    """

    tensors: tuple[str, ...]
    expert: int | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class PairEntry:
    """One planned tensor pair (metadata only); loading it gives one or more DeltaW."""

    name: str
    info: ModuleInfo
    kind: str
    shape: tuple[int, ...]  # oriented (out, in) for matrices
    base_tensor: str
    tuned_tensor: str | None  # None when the tuned side is an adapter module, or read through tuned_slice
    base_dtype: torch.dtype
    tuned_dtype: torch.dtype
    conv1d: bool = False  # the base stores it (in, out): a Conv1D, gpt-oss's experts, the hub's Qwen3-VL-MoE experts
    added_rows: int = 0
    expert_index: int | None = None  # slice of a 3-D (experts, out, in) tensor
    # rows per expert where the stored tensor is 2-D, experts stacked on its rows (DBRX's ffn.experts.mlp.w1
    # (experts·ffn, d_model)): expert e is rows [e·expert_rows, (e+1)·expert_rows); 0: expert_index indexes dim 0
    expert_rows: int = 0
    # the tuned checkpoint's layout where it is not the base's (``conv1d``): True, it stores the expert (in, out)
    # where the base stores it (out, in); False, the reverse (Qwen3-VL-MoE's hub experts against a fine-tune saved
    # by transformers 5); None, as the base
    tuned_conv1d: bool | None = None
    projections: tuple[Projection, ...] = ()
    adapter: AdapterDelta | None = None
    # the tuned checkpoint stores the experts in the other layout of the two transformers loads into one parameter
    # (per-expert 2-D matrices against the fused (E, ·, ·) one): where this entry's tuned matrix lies there, read in
    # place of ``tuned_tensor``, which is then None (``expert_index`` indexes the base's tensor only)
    tuned_slice: TunedSlice | None = None

    @property
    def tuned_stored_conv1d(self) -> bool:
        """Whether the tuned checkpoint stores this matrix (in, out): ``tuned_conv1d``, else as the base."""
        return self.conv1d if self.tuned_conv1d is None else self.tuned_conv1d


class Pairing:
    """The planned pairs of a base and a tuned checkpoint; iterate to stream ΔW.

    Parameters
    ----------
    base : str, path or CheckpointSource
        The pretrained checkpoint.
    tuned : str, path, CheckpointSource or AdapterSource
        The fine-tuned checkpoint, or a PEFT LoRA/DoRA adapter trained on ``base``.
    options : PairingOptions, optional

    Attributes
    ----------
    notes : list of str
        What the pairing did that a reader should know (tied weights, resized vocabularies, skipped tensors).
    provenance : str or None
        The first note, when ``tuned`` may not be of ``base``: an adapter whose ``adapter_config.json`` records
        another model (:func:`~spectra.checkpoints.source.recorded_base_note`), or two ``config.json`` files that
        name different model types (:func:`~spectra.checkpoints.source.architecture_note`).

    Raises
    ------
    PairingError
        No common tensors (mismatched architectures), a shape mismatch on a shared name
        (other than a resized vocabulary, a classification head of another class count, or 3-D experts stored transposed on one side, which
        transformers loads as the same model), experts stored per expert on one side and fused on
        the other that do not fit the model's parameter, ambiguous names.
    AdapterError
        An adapter whose modules or shapes do not fit the base.
    """

    def __init__(self, base, tuned, options: PairingOptions | None = None):
        self.options = options or PairingOptions()
        self.base = open_checkpoint(base)
        if isinstance(self.base, AdapterSource):
            raise PairingError(f"{self.base.spec} is a PEFT adapter; pass it as the tuned side, with the model "
                               "it was trained on as the base.")
        self.tuned = open_checkpoint(tuned)
        self.config: dict[str, Any] | None = self.base.config or getattr(self.tuned, "config", None)
        self.only_in_base: list[str] = []
        self.only_in_tuned: list[str] = []
        self.notes: list[str] = []
        self.skipped: list[str] = []  # tensors skipped while iterating (non-finite)
        self.skipped_entries: dict[str, str] = {}  # entry name → why it was skipped (for caches to remember)
        self._mixed_layouts: list[tuple[str, tuple[int, ...], str, tuple[int, ...]]] = []  # experts stored unlike
        self._filters = (compile_name_filter(self.options.include, option="include"),
                         compile_name_filter(self.options.exclude, option="exclude"))
        # first, so a command that prints only the first notes shows it: every number depends on it
        self.provenance: str | None = (recorded_base_note(self.tuned, self.base)
                                       if isinstance(self.tuned, AdapterSource)
                                       else architecture_note(self.base, self.tuned))
        if self.provenance:
            self.notes.append(self.provenance)
        if isinstance(self.tuned, AdapterSource):
            entries = self._plan_adapter()
        else:
            entries = self._plan_checkpoint()
        lacking = missing_stacks(self.options.stacks, {e.info.stack for e in entries})
        if lacking:
            self.notes.append(lacking)
        self.entries: list[PairEntry] = [e for e in entries if self._selected(e)]

    # -- planning ---------------------------------------------------------------------

    def _plan_checkpoint(self) -> list[PairEntry]:
        base, tuned = self.base, self.tuned
        match = match_names(base.names(), tuned.names())
        if match.ambiguous:
            examples = "; ".join(f"{k} ↔ {', '.join(v)}" for k, v in list(match.ambiguous.items())[:3])
            raise PairingError(f"ambiguous tensor names between {base.spec} and {tuned.spec}: {examples}. Point "
                               "spectra at checkpoints of the same model class, or narrow with --include.")
        # an adapter's weights file, passed without its adapter_config.json: PEFT's keys, whatever else pairs (a
        # head it saved whole pairs with BASE's: 'lm_head' was analysed alone, the factors listed as only in TUNED);
        # where nothing pairs, a file of nothing but LoRA factors under another prefix (another trainer's) too; a
        # model with LoRA modules of its own beside its weights (Phi-4-multimodal's) is no adapter
        for side, src in (("TUNED", tuned), ("BASE", base)):
            factor = next((n for n in src.names() if _PEFT_FACTOR.search(n)), None)
            if factor is None and not match.pairs and all(_LORA_FACTOR.search(n) for n in src.names()):
                factor = next(iter(src.names()), None)
            if factor is not None:
                raise PairingError(
                    f"{side} {src.spec} holds LoRA factors ({factor}): it is a PEFT adapter's weights file. "
                    "Pass the adapter's folder (with its adapter_config.json) as TUNED, and the model it adapts "
                    "as BASE.")
        if not match.pairs:
            differ = architecture_difference(base, tuned)
            differ = f" ({differ})" if differ else ""
            raise PairingError(
                f"{base.spec} and {tuned.spec} share no tensor names (e.g. {_first(base.names())} vs "
                f"{_first(tuned.names())}): they are not the same architecture{differ}. Check the two paths.")
        self.only_in_base, self.only_in_tuned = match.only_in_base, match.only_in_tuned
        self._linear_layouts: dict[str, bool] = {}  # no model type: GPT-2-named weights' layout, by their shapes
        if not (self.config or {}).get("model_type"):
            shapes = {n.removesuffix(".weight"): tuple(base.info(n).shape) for n in match.pairs
                      if n.endswith(_CONV1D_WEIGHTS)}
            self._linear_layouts, note = conv1d_by_shape(shapes)
            if note:
                self.notes.append(note)
        # (base rows, tuned rows) of each vocabulary matrix resized in TUNED: a vector of those sizes is its bias
        resized = (_vocab_rows(module_info(b.removesuffix(".weight"), self.config).role, base.info(b).shape,
                               tuned.info(t).shape) for b, t in match.pairs.items() if b.endswith(".weight"))
        self._resized_vocab: set[tuple[int, int]] = {rows for rows in resized if rows is not None}
        reset = self._class_heads(match.pairs)  # a head of another class count: no ΔW, set aside before pairing
        entries = []
        for b_name, t_name in match.pairs.items():
            if b_name not in reset:
                entries.extend(self._entries_for(b_name, t_name))
        if self._mixed_layouts:
            b_name, b_shape, t_name, t_shape = self._mixed_layouts[0]
            self.notes.append(
                f"{len(self._mixed_layouts)} expert tensor(s) stored in another layout in the tuned checkpoint than "
                f"in the base (e.g. {b_name} {b_shape} in the base, {t_name} {t_shape} in the tuned one: one stores "
                "each expert (in, out), the other (out, in), as transformers loads both); each expert's ΔW is taken "
                "as the model holds both sides, (out, in)")
        entries.extend(self._mixed_experts())
        entries.extend(self._untied_heads(match))
        entries.extend(self._tied_in_tuned(match))
        return self._dedupe_tied(entries)

    def _class_heads(self, pairs: dict[str, str]) -> set[str]:
        """The base's tensors of a classification head whose class count differs between the checkpoints (a
        classifier of 2 labels fine-tuned into 3: the head re-initialised), moved to "only in" BASE and TUNED
        with a note naming each tensor and both shapes.

        Such a head's rows are new, not updated: it has no ΔW, and an adapter carries it saved whole
        (modules_to_save), as a head new in TUNED. A head is told from a resized vocabulary (extra rows of the
        embedding and its head in TUNED, paired over the shared rows) by its rows: a class head's base rows are
        neither the base config's ``vocab_size`` nor the rows of an embedding table. Where neither is known (no
        config, no embedding), nothing is set aside and the shapes are checked as before. The head's weight
        (role head, 2-D, same columns) and its bias (the same module's, one entry per class) go together; any other
        tensor of another shape is still refused as another model."""
        vocab = {v for c in (self.config or {}, (self.config or {}).get("text_config") or {})
                 if isinstance(c, dict) and isinstance(v := c.get("vocab_size"), int)}
        for b_name in pairs:
            if b_name.endswith(".weight") and module_info(b_name.removesuffix(".weight"), self.config).role == "embed":
                shape = tuple(self.base.info(b_name).shape)
                if len(shape) == 2:
                    vocab.add(shape[0])
        if not vocab:
            return set()
        reset, shown = set(), []
        for b_name, t_name in pairs.items():
            if not b_name.endswith(".weight"):
                continue
            module = b_name.removesuffix(".weight")
            b_shape, t_shape = tuple(self.base.info(b_name).shape), tuple(self.tuned.info(t_name).shape)
            if (module_info(module, self.config).role != "head" or len(b_shape) != 2 or len(t_shape) != 2
                    or b_shape[1] != t_shape[1] or b_shape[0] == t_shape[0] or b_shape[0] in vocab):
                continue
            tensors = [(b_name, t_name, b_shape, t_shape)]
            bias = f"{module}.bias"
            if bias in pairs:
                bb, tb = tuple(self.base.info(bias).shape), tuple(self.tuned.info(pairs[bias]).shape)
                if bb != (b_shape[0],) or tb != (t_shape[0],):  # not this head's per-class bias: refused as before
                    continue
                tensors.append((bias, pairs[bias], bb, tb))
            for b, t, _, _ in tensors:
                reset.add(b)
                self.only_in_base.append(b)
                self.only_in_tuned.append(t)
            shown.append(
                f"{module}: a classification head of {b_shape[0]} classes in BASE and {t_shape[0]} in TUNED ("
                + ", ".join(f"{b} {bs} in BASE, {'' if t == b else t + ' '}{ts} in TUNED" for b, t, bs, ts in tensors)
                + "): re-initialised for the new classes, its rows are new, not updated, so it has no ΔW and is "
                "left out of the analysis; an adapter carries it saved whole "
                f"(modules_to_save={module.rpartition('.')[2]}), loaded onto a model built with num_labels={t_shape[0]}")
        self.notes.extend(shown)
        return reset

    def _mixed_experts(self) -> list[PairEntry]:
        """Experts stored per expert on one side and fused on the other: the two layouts transformers loads into one
        parameter (its weight converters). ``save_pretrained`` writes Mixtral's experts per expert
        (``block_sparse_moe.experts.3.w1.weight``, ``w3``, ``w2``; Qwen3-MoE's ``mlp.experts.3.gate_proj.weight`` …),
        a ``save_file(model.state_dict())`` the loaded model's ``mlp.experts.gate_up_proj`` (E, 2·ffn, hidden) and
        ``down_proj``, and Mixtral's router as ``mlp.gate.weight``. The names differ, so no tensor pairs by name.

        The model class built from the config on the meta device says which tensors of each side load into which
        parameter, and where (:func:`~spectra.checkpoints.placement.parameter_sources`,
        :func:`~spectra.checkpoints.placement.split_sources`, the machinery that places an adapter's per-expert
        updates). Each expert's ΔW is then the per-expert side's matrix against its place in the fused side's
        parameter, and every record is named as the base names it: a per-expert base's ``…experts.3.w1``, a fused
        base's ``…experts.3.gate_up_proj`` (with its ``[gate]`` and ``[up]``), as a run on two checkpoints of the
        base's layout names them. What cannot be placed exactly stays "only in" BASE/TUNED, with a note that says so.
        """
        if not self.only_in_base or not self.only_in_tuned or not any(
                ".experts." in f".{n}." for n in (*self.only_in_base, *self.only_in_tuned)):
            return []
        from spectra.checkpoints.placement import PlacementError, parameter_sources
        from spectra.checkpoints.targets import meta_model

        model = meta_model(self.config)
        if model is None:
            self._unpaired_experts_note("no config.json names a model class this transformers can build, and only "
                                        "the class's loading conversions say where each expert lies")
            return []
        shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
        b_sources = parameter_sources(model, self.only_in_base, shapes)
        t_sources = parameter_sources(model, self.only_in_tuned, shapes)
        entries, paired, reasons, counts = [], set(), [], {"forward": 0, "reverse": 0}
        for parameter in [p for p in shapes if p in b_sources and p in t_sources]:
            b_src, t_src, shape = b_sources[parameter], t_sources[parameter], shapes[parameter]
            plain_b = len(b_src) == 1 and b_src[0].converter is None
            plain_t = len(t_src) == 1 and t_src[0].converter is None
            try:
                if plain_b and plain_t:  # one tensor each side, renamed on loading (Mixtral's router)
                    found = [self._renamed(e) for e in self._entries_for(b_src[0].tensor, t_src[0].tensor)]
                elif plain_t and not plain_b:  # per-expert base, fused fine-tune
                    found = self._per_expert_base(parameter, shape, b_src, t_src[0].tensor)
                    counts["forward"] += 1
                elif plain_b and not plain_t:  # fused base, per-expert fine-tune
                    found = self._fused_base(parameter, shape, b_src[0].tensor, t_src)
                    counts["reverse"] += 1
                else:
                    continue
            except PlacementError as err:
                if err.mismatch:
                    raise PairingError(f"{self.base.spec} and {self.tuned.spec} store the experts in different "
                                       f"layouts that do not load into one model: {err}. The checkpoints are "
                                       "different architectures or sizes.") from None
                reasons.append(str(err))
                continue
            entries.extend(found)
            paired.update(s.tensor for s in b_src)
            paired.update(s.tensor for s in t_src)
        self.only_in_base = [n for n in self.only_in_base if n not in paired]
        self.only_in_tuned = [n for n in self.only_in_tuned if n not in paired]
        if counts["forward"] or counts["reverse"]:
            example = next(e for e in entries if e.tuned_slice is not None and e.info.expert is not None)
            per_expert, fused = (("base", "tuned") if counts["forward"] else ("tuned", "base"))
            self.notes.append(
                f"the experts are stored per expert in the {per_expert} checkpoint and fused in the {fused} one "
                f"({counts['forward'] + counts['reverse']} fused parameter(s), e.g. "
                f"{_stored_name(example.base_tensor, example)} against "
                f"{_tuned_stored_name(example)}), as transformers loads both into one parameter; each expert's ΔW is "
                "taken from its place there and named as the base names it")
        if reasons or any(".experts." in f".{n}." for n in (*self.only_in_base, *self.only_in_tuned)):
            self._unpaired_experts_note(reasons[0] if reasons else None)
        return entries

    def _per_expert_base(self, parameter, shape, b_src, t_name) -> list[PairEntry]:
        """Per-expert base matrices against their places in the tuned checkpoint's fused 3-D `t_name`."""
        from spectra.checkpoints.placement import PlacementError, split_sources

        t = self.tuned.info(t_name)
        if tuple(t.shape) != tuple(shape):
            raise PlacementError(parameter, f"the tuned checkpoint's {t_name} is {tuple(t.shape)}, the parameter "
                                 f"{tuple(shape)} (by the base's config.json)", mismatch=True)
        slices = split_sources(self.base, parameter, shape, b_src, self.config, label="base")
        self._plain_layout(parameter, slices, self.base, self.tuned, t_name)
        out = []
        for s in slices:
            b = self.base.info(s.tensor)
            info = module_info(s.module, self.config)
            out.append(PairEntry(name=s.module, info=info, kind="matrix", shape=tuple(s.shape), base_tensor=s.tensor,
                                 tuned_tensor=None, base_dtype=b.dtype, tuned_dtype=t.dtype,
                                 projections=self._projections(s.module, info, s.shape[0]),
                                 tuned_slice=TunedSlice((t_name,), s.place.expert, s.place.rows)))
        return out

    def _fused_base(self, parameter, shape, b_name, t_src) -> list[PairEntry]:
        """The base's fused 3-D `b_name`, per expert as a fused pair reads it, against the tuned checkpoint's
        per-expert matrices stacked on their rows."""
        from spectra.checkpoints.placement import PlacementError, split_sources

        b = self.base.info(b_name)
        if tuple(b.shape) != tuple(shape):
            raise PlacementError(parameter, f"the base's {b_name} is {tuple(b.shape)}, the parameter {tuple(shape)} "
                                 "(by its config.json)", mismatch=True)
        first = [src.tensor for src in t_src if module_info(src.tensor.removesuffix(".weight")).expert == 0]
        held = [tuple(self.tuned.info(t).shape) for t in first]
        if first and (any(len(h) != 2 or h[1] != shape[2] for h in held) or sum(h[0] for h in held) != shape[1]):
            raise PlacementError(parameter, f"the tuned checkpoint's expert 0 is {', '.join(first)} of shape(s) "
                                 f"{', '.join(map(str, held))}, the base's {b_name} holds ({shape[1]}, {shape[2]}) "
                                 "per expert", mismatch=True)
        slices = split_sources(self.tuned, parameter, shape, t_src, self.config, label="tuned checkpoint")
        self._plain_layout(parameter, slices, self.tuned, self.base, b_name)
        dtypes = {self.tuned.info(s.tensor).dtype for s in slices}
        if len(dtypes) != 1:
            raise PlacementError(parameter, f"its tuned tensors ({slices[0].tensor}, …) mix dtypes "
                                 f"{', '.join(sorted(map(_dtype_name, dtypes)))}")
        (dtype,) = dtypes
        entries = self._entries_for(b_name, b_name, t_info=replace(b, dtype=dtype))
        by_expert: dict[int, list] = {}
        for s in slices:
            by_expert.setdefault(s.place.expert, []).append(s)
        out = []
        for entry in entries:
            if entry.kind != "matrix" or entry.conv1d or entry.tuned_conv1d is not None \
                    or entry.expert_index not in by_expert:
                raise PlacementError(parameter, f"the base's {b_name} is not read per expert (out, in)")
            parts = sorted(by_expert[entry.expert_index], key=lambda s: s.place.rows or (0, 0))
            out.append(replace(entry, tuned_tensor=None, tuned_slice=TunedSlice(tuple(s.tensor for s in parts))))
        return out

    @staticmethod
    def _renamed(entry: PairEntry) -> PairEntry:
        """A pair of one tensor each side under names that differ (Mixtral's router, ``block_sparse_moe.gate`` in
        a per-expert checkpoint, ``mlp.gate`` in a fused one), read through ``tuned_slice``: the entry then names
        only the base's tensor, so what plans by the checkpoint's names plans it as for the base's layout."""
        if entry.kind != "matrix" or entry.conv1d or entry.tuned_conv1d is not None or entry.added_rows:
            return entry
        return replace(entry, tuned_tensor=None, tuned_slice=TunedSlice((entry.tuned_tensor,)))

    @staticmethod
    def _plain_layout(parameter, slices, per_expert_source, fused_source, fused_name) -> None:
        """Refuse slices other than per-expert (out, in) matrices stacked on a fused (E, out, in) parameter's rows,
        or a quantised tensor on either side (its grid is read per stored tensor)."""
        from spectra.checkpoints.placement import PlacementError

        for s in slices:
            if s.conv1d or s.place.stored_transposed or s.stored_expert is not None:
                raise PlacementError(parameter, f"{s.tensor} lies in it other than as an expert's (out, in) rows")
        for source, tensor in ((fused_source, fused_name), *((per_expert_source, s.tensor) for s in slices)):
            if source.storage_format(tensor):
                raise PlacementError(parameter, f"{tensor} is stored quantised ({source.storage_format(tensor)}), "
                                     "whose grid spectra reads per stored tensor only")

    def _unpaired_experts_note(self, why: str | None) -> None:
        """Say loudly, first among the notes after the provenance, that expert tensors stored in another layout on
        each side were left out (what the analysis then covers is not the experts)."""
        def experts(names):
            return [n for n in names if ".experts." in f".{n}."]

        b_experts, t_experts = experts(self.only_in_base), experts(self.only_in_tuned)
        if not b_experts or not t_experts:
            return

        def layout(source, names):
            shapes = [tuple(source.info(n).shape) for n in names]
            fused = sum(len(shape) == 3 for shape in shapes)
            kind = ("stored fused, one (experts, ·, ·) tensor per projection" if fused == len(names) else
                    "stored per expert" if not fused else "stored partly fused, partly per expert")
            return f"{kind} (e.g. {names[0]} {shapes[0]})"

        note = (f"{len(b_experts)} expert tensor(s) only in BASE, {layout(self.base, b_experts)}, and "
                f"{len(t_experts)} only in TUNED, {layout(self.tuned, t_experts)}, were NOT analysed"
                + (f": {why}" if why else "")
                + "; the results cover the other tensors only. Save both checkpoints in one layout (load each with "
                "transformers and save_pretrained) to analyse the experts")
        self.notes.insert(1 if self.provenance else 0, note)

    def _untied_heads(self, match) -> list[PairEntry]:
        """A head the tuned checkpoint stores while the base ties it to its input embedding (stored once):
        its ΔW is taken against that embedding (it was left out as "only in tuned")."""
        if (self.config or {}).get("tie_word_embeddings", True) is False:
            return []
        def role(name: str) -> str:
            return module_info(name.removesuffix(".weight")).role if name.endswith(".weight") else ""

        embeds = [n for n in match.pairs if role(n) == "embed"]
        heads = [n for n in match.only_in_tuned if role(n) == "head"]
        if len(embeds) != 1 or not heads:
            return []
        (embed,) = embeds
        b = self.base.info(embed)
        out = []
        for head in heads:
            t = self.tuned.info(head)
            if t.shape != b.shape or b.dtype not in _FLOAT_DTYPES or t.dtype not in _FLOAT_DTYPES:
                continue
            module = head.removesuffix(".weight")
            info = module_info(module, self.config)
            out.append(PairEntry(name=module, info=info, kind="matrix", shape=tuple(b.shape), base_tensor=embed,
                                 tuned_tensor=head, base_dtype=b.dtype, tuned_dtype=t.dtype))
            self.only_in_tuned = [n for n in self.only_in_tuned if n != head]
            self.notes.append(f"{module}: tied to {embed.removesuffix('.weight')} in the base (stored once), its own "
                              f"tensor in the tuned checkpoint; its ΔW is taken against {embed}")
        return out

    def _tied_in_tuned(self, match) -> list[PairEntry]:
        """The reverse of :meth:`_untied_heads`: a head the base stores as its own tensor while the tuned checkpoint
        ties it to its input embedding (its config.json says ``tie_word_embeddings``, the head stored once, as the
        embedding): the tuned model's head is that embedding, so its ΔW is taken against it (it was left out as
        "only in BASE", with no word of why)."""
        tuned_config = getattr(self.tuned, "config", None) or {}
        if not tuned_config.get("tie_word_embeddings", False):
            return []
        def role(name: str) -> str:
            return module_info(name.removesuffix(".weight")).role if name.endswith(".weight") else ""

        embeds = [t for t in match.pairs.values() if role(t) == "embed"]
        heads = [n for n in match.only_in_base if role(n) == "head"]
        if len(embeds) != 1 or not heads:
            return []
        (embed,) = embeds
        t = self.tuned.info(embed)
        out = []
        for head in heads:
            b = self.base.info(head)
            if t.shape != b.shape or b.dtype not in _FLOAT_DTYPES or t.dtype not in _FLOAT_DTYPES:
                continue
            module = head.removesuffix(".weight")
            out.append(PairEntry(name=module, info=module_info(module, self.config), kind="matrix",
                                 shape=tuple(b.shape), base_tensor=head, tuned_tensor=embed, base_dtype=b.dtype,
                                 tuned_dtype=t.dtype))
            self.only_in_base = [n for n in self.only_in_base if n != head]
            self.notes.append(f"{module}: its own tensor in the base, tied to {embed.removesuffix('.weight')} in the "
                              f"tuned checkpoint (stored once); its ΔW is taken against the tuned {embed}")
        return out

    def _dbrx_entries(self, b_name: str, t_name: str, b_shape, t_shape, experts: int, common: dict) -> list[PairEntry]:
        """DBRX's ``ffn.experts.mlp.w1`` (``v1``, ``w2``), one 2-D parameter (experts·ffn, d_model): one (out, in)
        record per expert, ``ffn.experts.mlp.3.w1`` (gate, up: rows of expert 3 as stored; down: ``w2``'s rows
        transposed, the forward computing ``h @ w2[e]``). Without a config of DBRX's that sizes them, skipped."""
        if b_shape != t_shape:
            raise _shape_error(b_name, b_shape, t_shape, self.base, self.tuned, t_name, experts=True)
        if not experts:
            self.notes.append(f"{b_name}: skipped, DBRX's experts stacked in one {tuple(b_shape)} tensor, but no "
                              "config.json of DBRX's (ffn_config.moe_num_experts, ffn_hidden_size, d_model) sizes "
                              "them, so the experts cannot be told apart; it is not read as rows")
            return []
        head, _, proj = b_name.rpartition(".")  # transformer.blocks.0.ffn.experts.mlp . w1
        rows, down = b_shape[0] // experts, proj == "w2"
        shape = (b_shape[1], rows) if down else (rows, b_shape[1])
        out = []
        for e in range(experts):
            name = f"{head}.{e}.{proj}"
            e_info = module_info(name, self.config)
            out.append(PairEntry(name=name, info=e_info, kind="matrix", shape=shape, expert_index=e,
                                 expert_rows=rows, conv1d=down, **common))
        return out

    def _entries_for(self, b_name: str, t_name: str, t_info=None) -> list[PairEntry]:
        b, t = self.base.info(b_name), (self.tuned.info(t_name) if t_info is None else t_info)
        if b.dtype not in _FLOAT_DTYPES or t.dtype not in _FLOAT_DTYPES:
            self.notes.append(f"{b_name}: skipped, not a floating-point tensor ({b.dtype}, {t.dtype})")
            return []
        module = b_name.removesuffix(".weight")
        info = module_info(module, self.config)
        common = dict(base_tensor=b_name, tuned_tensor=t_name, base_dtype=b.dtype, tuned_dtype=t.dtype)
        if len(b.shape) <= 1:  # a norm, a bias, or a scalar parameter (CLIP's logit_scale: shape ()), kept as stored
            added = 0 if b.shape == t.shape else self._vocab_bias(b_name, t_name, b.shape, t.shape)
            # q_proj.bias belongs to q_proj; CLIP's embeddings.class_embedding to no table (vector_info)
            owner = vector_info(b_name, self.config)
            return [PairEntry(name=b_name, info=owner, kind="vector", shape=b.shape, added_rows=added, **common)]
        dbrx = dbrx_experts(module, tuple(b.shape), self.config)
        if dbrx is not None:
            return self._dbrx_entries(b_name, t_name, b.shape, t.shape, dbrx, common)
        if len(b.shape) in (2, 3) and ".experts." in f".{b_name}." and not b_name.endswith(".weight"):
            # stacked per-expert tensors: (experts, ·, ·) matrices or (experts, ·) biases
            head, _, proj = module.rpartition(".")  # model.layers.0.mlp.experts . gate_up_proj
            in_out = experts_in_out(module, b.shape, self.config)  # x @ W[e]: (in, out)
            tuned_in_out = experts_in_out(module, t.shape, self.config) if len(t.shape) == 3 else in_out
            if _held(b.shape, in_out) != _held(t.shape, tuned_in_out):
                raise _shape_error(b_name, b.shape, t.shape, self.base, self.tuned, t_name,
                                   experts=len(b.shape) == 3 == len(t.shape))
            if in_out != tuned_in_out:  # stored in opposite layouts that load alike (experts_stored_unlike)
                common["tuned_conv1d"] = tuned_in_out
                self._mixed_layouts.append((b_name, tuple(b.shape), t_name, tuple(t.shape)))
            out = []
            for e in range(b.shape[0]):
                name = f"{head}.{e}.{proj}"
                e_info = module_info(name, self.config)
                if len(b.shape) == 2:
                    out.append(PairEntry(name=name, info=e_info, kind="vector", shape=b.shape[1:], expert_index=e,
                                         **common))
                    continue
                shape = (b.shape[2], b.shape[1]) if in_out else tuple(b.shape[1:])
                out.append(PairEntry(name=name, info=e_info, kind="matrix", shape=shape, expert_index=e,
                                     conv1d=in_out, projections=self._projections(name, e_info, shape[0]), **common))
            return out
        if len(b.shape) == 3 and b_name.endswith(".weight") and parallel_experts(module, b.shape, self.config):
            # JetMoE's experts (mlp.input_linear, …): a module's (experts, out, in) weight, expert e F.linear(x, W[e])
            if b.shape != t.shape:
                raise _shape_error(b_name, b.shape, t.shape, self.base, self.tuned, t_name, experts=True)
            out = []
            for e in range(b.shape[0]):
                name = f"{module}.{e}"  # model.layers.0.mlp.input_linear.3: expert 3's (out, in) matrix
                e_info = module_info(name, self.config)
                shape = tuple(b.shape[1:])
                out.append(PairEntry(name=name, info=e_info, kind="matrix", shape=shape, expert_index=e,
                                     projections=self._projections(name, e_info, shape[0]), **common))
            return out
        loaded = loaded_experts(module, b.shape, self.config) if b_name.endswith(".weight") else None
        if loaded is not None:
            # GraniteMoE's block_sparse_moe.input_linear.weight (experts, 2·intermediate, hidden), …: one (out, in)
            # record per expert, named as transformers 5 loads it (…block_sparse_moe.experts.3.gate_up_proj)
            if b.shape != t.shape:
                raise _shape_error(b_name, b.shape, t.shape, self.base, self.tuned, t_name, experts=True)
            head, _, proj = loaded.rpartition(".")
            out = []
            for e in range(b.shape[0]):
                name = f"{head}.{e}.{proj}"
                e_info = module_info(name, self.config)
                shape = tuple(b.shape[1:])
                out.append(PairEntry(name=name, info=e_info, kind="matrix", shape=shape, expert_index=e,
                                     projections=self._projections(name, e_info, shape[0]), **common))
            return out
        if b_name.endswith(".weight") and moe_weight(module, b.shape):
            self.notes.append(f"{b_name}: skipped, a 3-D weight {tuple(b.shape)} under a mixture-of-experts block "
                              "that spectra does not read per expert (its layout is unknown to it); it is not read "
                              "as one flattened matrix")
            return []
        if (len(b.shape) > 2 or b.shape[0] == 1) and not b_name.endswith(".weight"):
            # a parameter or a buffer (a checkpoint does not say which) of its own, no layer's weight: a ViT's
            # position table (1, N, d) is an N × d table, its class token or SigLIP's attention-pool probe (1, 1, d)
            # a vector, as is BART's final_logits_bias (1, vocab); one of more dimensions is skipped. A layer's
            # (1, N) weight (nn.Linear(N, 1), a one-output head) is a matrix a LoRA adapts: it ends with .weight
            held = _without_leading_ones(b.shape)
            if len(held) > 2:
                self.notes.append(f"{b_name}: skipped, a {len(b.shape)}-D tensor that is no layer's weight (not "
                                  "*.weight: no LoRA module adapts it)")
                return []
            added = 0 if b.shape == t.shape else self._vocab_bias(b_name, t_name, b.shape, t.shape)
            return [PairEntry(name=module, info=info, kind="matrix" if len(held) == 2 else "vector", shape=held,
                              added_rows=added, **common)]
        if len(b.shape) > 2:
            shape = (b.shape[0], _prod(b.shape[1:]))  # conv kernels: (out, in·k…), as LoRA for Conv sees them
        else:
            conv1d = self._linear_layouts.get(module)
            conv1d = is_conv1d(module, self.config) if conv1d is None else conv1d
            shape = (b.shape[1], b.shape[0]) if conv1d else tuple(b.shape)
            common["conv1d"] = conv1d
        added = 0
        if b.shape != t.shape:
            if _vocab_rows(info.role, b.shape, t.shape) is None:
                raise _shape_error(b_name, b.shape, t.shape, self.base, self.tuned, t_name)
            added = t.shape[0] - b.shape[0]
            self.notes.append(f"{module}: vocabulary resized, {added} rows added in tuned (ΔW over the "
                              f"{b.shape[0]} shared rows)")
        projections = self._projections(module, info, shape[0])
        if len(shape) == 2 and module in self._linear_layouts and not common["conv1d"]:  # no config: GPT-BigCode's
            projections = self._projections(module, info, shape[0], in_features=shape[1], linear=True)
        return [PairEntry(name=module, info=info, kind="matrix", shape=tuple(shape), added_rows=added,
                          projections=projections, **common)]

    def _vocab_bias(self, b_name: str, t_name: str, b_shape, t_shape) -> int:
        """Entries added in TUNED to a vocabulary's bias (BERT's ``cls.predictions.bias``, a biased lm_head's, BART's
        ``final_logits_bias`` (1, vocab)), resized as its embedding or head was: paired over the shared entries, with
        a note. Any other vector whose shape differs is refused as another model."""
        b_held, t_held = _without_leading_ones(b_shape), _without_leading_ones(t_shape)
        if (len(b_shape) != len(t_shape) or len(b_held) != 1 or len(t_held) != 1
                or (b_held[0], t_held[0]) not in self._resized_vocab):
            raise _shape_error(b_name, b_shape, t_shape, self.base, self.tuned, t_name)
        added = t_held[0] - b_held[0]
        self.notes.append(f"{b_name}: vocabulary resized, {added} entries added in tuned (ΔW over the {b_held[0]} "
                          "shared entries)")
        return added

    def _projections(self, name: str, info: ModuleInfo, out_features: int, *, in_features: int | None = None,
                     linear: bool = False) -> tuple[Projection, ...]:
        """The projections of a fused tensor; `linear`: a GPT-2-named one read as nn.Linear without a config
        (:func:`~spectra.checkpoints.architectures.conv1d_by_shape`), a GPT-BigCode's, sized by its shape."""
        if not self.options.split_fused:
            return ()
        if linear:
            return tuple(bigcode_projections(name, out_features, in_features, self.config))
        return tuple(fused_projections(name, info.role, out_features, self.config))

    def _dedupe_tied(self, entries: list[PairEntry]) -> list[PairEntry]:
        """Drop the head when it is the tied embedding on both sides (same data)."""
        heads = [e for e in entries if e.info.role == "head" and e.kind == "matrix"]
        embeds = [e for e in entries if e.info.role == "embed" and e.kind == "matrix"]
        if not self.options.load:
            tied = bool((self.config or {}).get("tie_word_embeddings"))
            drop = {h.name for h in heads for e in embeds if tied and h.shape == e.shape}
        else:
            drop = {h.name for h in heads for e in embeds if h.shape == e.shape and self._same_data(h, e)}
        for name in drop:
            self.notes.append(f"{name}: tied to the input embedding, reported once under the embedding")
        return [e for e in entries if e.name not in drop]

    def _same_data(self, a: PairEntry, b: PairEntry) -> bool:
        return (torch.equal(self.base.read(a.base_tensor), self.base.read(b.base_tensor))
                and torch.equal(self.tuned.read(a.tuned_tensor), self.tuned.read(b.tuned_tensor)))

    def _plan_adapter(self) -> list[PairEntry]:
        planned, notes = plan_adapter(self.tuned, self.base, self.config)
        self.notes.extend(notes)
        entries = []
        for p in planned:
            info = module_info(p.module, self.config)
            b = self.base.info(p.base_tensor)
            conv1d = p.conv1d
            entries.append(PairEntry(
                name=p.module, info=info, kind="matrix", shape=p.shape, base_tensor=p.base_tensor,
                tuned_tensor=None, base_dtype=b.dtype, tuned_dtype=p.dtype, conv1d=conv1d, expert_index=p.base_expert,
                projections=self._projections(p.module, info, p.shape[0]), adapter=p))
        return entries

    # -- selection --------------------------------------------------------------------

    def _name_selected(self, name: str, info: ModuleInfo) -> bool:
        opts = self.options
        include, exclude = self._filters
        if opts.roles is not None and not role_named(info.role, opts.roles):  # --roles q takes BART's encoder_attn q
            return False
        if not stack_selected(info.stack, opts.stacks):
            return False
        if opts.layers is not None and (info.layer is None or not opts.layers[0] <= info.layer <= opts.layers[1]):
            return False
        if include is not None and not include(name):
            return False
        return exclude is None or not exclude(name)

    def _parts(self, entry: PairEntry) -> list[tuple[str, ModuleInfo, Projection | None]]:
        """The records an entry yields, after selection: the whole, then each projection."""
        parts = []
        if entry.kind == "vector" and not self.options.vectors:
            return parts
        if self._name_selected(entry.name, entry.info):
            parts.append((entry.name, entry.info, None))
        for proj in entry.projections:
            name = f"{entry.name}[{proj.role}]"
            info = replace(entry.info, role=proj.role)
            if self._name_selected(name, info):
                parts.append((name, info, proj))
        return parts

    def _selected(self, entry: PairEntry) -> bool:
        return bool(self._parts(entry))

    # -- loading ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[DeltaW]:
        for entry in self.entries:
            yield from self.load(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def load(self, entry: PairEntry, *, lease: Lease | None = None) -> list[DeltaW]:
        """Read one entry's tensors and return its ΔW records (whole first, then projections).

        With a `lease` (:class:`~spectra.checkpoints.buffers.Lease`), a chunked ΔW and its
        bf16 copy are written into its buffers instead of fresh memory: the records are then
        only valid until the lease is closed.
        """
        parts = self._parts(entry)
        if not self.options.load:
            return [self._record(entry, name, info, proj, None, None, None) for name, info, proj in parts]
        dtype = self.options.torch_dtype
        # A plain pair subtracted chunk by chunk is checked for NaN/Inf by the norms that
        # pass takes anyway (one read of each weight instead of two); any other by a scan first.
        by_norms = self._checked_by_norms(entry)
        weights = self._read_pair(entry, check=not by_norms)
        if weights is None:
            return []
        base, tuned, update = weights
        if entry.added_rows and tuned is not None:
            tuned = tuned[: base.shape[0]]
        if update is not None:  # a LoRA's s·B A itself, without the rounding of W_base + s·B A in it
            delta, delta_low, delta_sq, base_sq = update, None, None, None
        else:
            out = low = None
            if _chunked(tuned, base) or (tuned.dim() == 2 and _chunked(tuned.T, base.T)):
                n = base.numel()
                if lease is not None:
                    out = lease.take(n, dtype)
                if self.options.low_copy(entry.kind, base.shape):
                    low = torch.empty(n, dtype=torch.bfloat16) if lease is None else lease.take(n, torch.bfloat16)
            # the chunked subtraction takes the norms in passing where the finite check or the caller wants them
            delta, delta_low, delta_sq, base_sq = _difference(tuned, base, dtype, norms=by_norms or self.options.norms,
                                                              out=out, low=low)
        if by_norms and not (_finite_number(delta_sq) and _finite_number(base_sq)):
            if not (self._finite(base, _stored_name(entry.base_tensor, entry), self.base.spec, entry.name)
                    and self._finite(tuned, _tuned_stored_name(entry), self.tuned.spec, entry.name)):
                return []
            if delta_sq is not None:  # both weights finite, yet a norm is not
                message = f"ΔW of {entry.name} overflows float32 (|tuned − base| beyond 3.4e38)"
                if self.options.on_nonfinite == "skip":
                    self._skip(entry.name, message)
                    return []
                raise NonFiniteWeightError(f"{message}: the checkpoint is broken. {SKIP_NONFINITE_HINT}")
        if self.options.norms and (delta_sq is None or base_sq is None):
            delta_sq, base_sq = squared_norm(delta), squared_norm(base)
        if not self.options.with_weights:
            base = tuned = None
        elif not self.options.weights_as_stored:
            base, tuned = base.to(dtype), tuned.to(dtype)
        records = [self._record(entry, name, info, proj, delta, base, tuned) for name, info, proj in parts]
        for record in records:
            if record.fused_name is None:  # the whole tensor; a split projection holds some rows only
                record.delta_sq, record.base_sq, record.delta_low = delta_sq, base_sq, delta_low
        return records

    def _checked_by_norms(self, entry: PairEntry) -> bool:
        """Whether this pair's subtraction is chunked into float32, so its norms can stand in for the NaN/Inf scan
        (two stored half-precision weights of a plain module, or one expert's slice of a stored 3-D tensor, on the
        CPU). An expert's slice is read alone (``read_expert``; DBRX's rows: ``read_rows``) and is contiguous like a
        module's weight, so the norms cover exactly its data; where it is too small to be chunked they are None and
        it is scanned after all.
        """
        half = (torch.float16, torch.bfloat16)
        return (self.options.torch_dtype == torch.float32 and self.options.device.startswith("cpu")
                and entry.base_dtype in half and entry.tuned_dtype in half
                and entry.adapter is None and not entry.added_rows)

    def _read_pair(self, entry: PairEntry, *, check: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(W_base, W_tuned, a LoRA's update s·B A or None) oriented (out, in) on the device, as stored (an adapter's
        merge: up-cast; its update read once, W_tuned its sum with W_base as PEFT's merge forms it).

        With ``check=False`` the caller checks them for NaN/Inf itself."""
        opts = self.options
        raw_base = _read_stored(self.base, entry.base_tensor, entry)
        if check and not self._finite(raw_base, _stored_name(entry.base_tensor, entry), self.base.spec, entry.name):
            return None
        if entry.adapter is not None:
            base = _orient(raw_base, entry).to(device=opts.device, dtype=opts.torch_dtype)
            if not entry.adapter.low_rank:
                tuned = entry.adapter.merged(base, self.tuned.weights, opts.torch_dtype)
                if not self._finite(tuned, entry.name + " (adapter merged)", self.tuned.spec, entry.name):
                    return None
                return base, tuned, None
            # a LoRA: its update checked (the base is, above), and summed with the base only for a caller that keeps
            # the weights (as PEFT's merge forms it)
            update = entry.adapter.update(self.tuned.weights, base.device, opts.torch_dtype)
            if not self._finite(update, entry.name + " (adapter update)", self.tuned.spec, entry.name):
                return None
            return base, (update + base if opts.with_weights else None), update
        raw_tuned = (_read_stored(self.tuned, entry.tuned_tensor, entry) if entry.tuned_slice is None
                     else _read_slice(self.tuned, entry.tuned_slice))
        if check and not self._finite(raw_tuned, _tuned_stored_name(entry), self.tuned.spec, entry.name):
            return None
        base, tuned = _orient(raw_base, entry), _orient(raw_tuned, entry, tuned=True)
        if entry.tuned_conv1d is not None:  # stored the other way round: copied into the base's layout (one expert),
            tuned = tuned.T.contiguous().T if entry.conv1d else tuned.contiguous()  # so the pair is subtracted chunked
        return base.to(device=opts.device), tuned.to(device=opts.device), None

    def _skip(self, entry_name: str, message: str) -> None:
        self.skipped.append(message)
        self.skipped_entries[entry_name] = message

    def _finite(self, tensor: torch.Tensor, name: str, spec: str, entry_name: str) -> bool:
        if tensor.numel() == 0 or not tensor.is_floating_point():
            return True
        # min and max propagate NaN and are ±Inf when any element is: one reduction pass,
        # ~20× cheaper than materialising isfinite's boolean tensor; counted only on failure.
        lo, hi = torch.aminmax(tensor)
        if bool(torch.isfinite(lo)) and bool(torch.isfinite(hi)):
            return True
        bad = int((~torch.isfinite(tensor)).sum())
        message = f"tensor {name} in {spec} holds {bad} NaN/Inf value(s)"
        if self.options.on_nonfinite == "skip":
            self._skip(entry_name, message)
            return False
        raise NonFiniteWeightError(f"{message}. The checkpoint is broken (diverged training or a bad save): "
                                   f"re-save it. {SKIP_NONFINITE_HINT}")

    def _record(self, entry, name, info, proj, delta, base, tuned) -> DeltaW:
        shape = entry.shape
        if proj is not None:
            rows = proj.rows if isinstance(proj.rows, slice) else list(proj.rows)
            if delta is not None:
                delta = delta[rows].contiguous()
                base = base[rows].contiguous() if base is not None else None
                tuned = tuned[rows].contiguous() if tuned is not None else None
            n = len(range(*proj.rows.indices(shape[0]))) if isinstance(proj.rows, slice) else len(proj.rows)
            shape = (n, *shape[1:])
        sides = ((self.base, entry.base_tensor, False), (self.tuned, entry.tuned_tensor, True))
        formats = [None if tensor is None else source.storage_format(tensor) for source, tensor, _ in sides]
        # The spacing only where the noise floor uses it. A quantised side rounds on its grid; the base's grid
        # counts only where the fine-tune is quantised too (both rounded from finer weights, as two FP8 releases
        # are): a fine-tune stored finer (bf16) started from the dequantised base, which its dtype holds exactly,
        # so the base's grid put no noise in ΔW.
        grids = [None if fmt is None or formats[1] is None or base is None or entry.kind != "matrix"
                 or entry.added_rows else _spacing(source, tensor, entry, proj, tuned=is_tuned)
                 for fmt, (source, tensor, is_tuned) in zip(formats, sides)]
        return DeltaW(
            name=name, role=info.role, layer=info.layer, expert=info.expert, stack=info.stack, kind=entry.kind,
            shape=tuple(shape),
            base_dtype=_dtype_name(entry.base_dtype), tuned_dtype=_dtype_name(entry.tuned_dtype), delta=delta,
            base_tensor=entry.base_tensor, fused_name=entry.name if proj is not None else None,
            conv1d=entry.conv1d, added_rows=entry.added_rows, base=base, tuned=tuned,
            base_format=formats[0], tuned_format=formats[1], base_spacing=grids[0], tuned_spacing=grids[1])


def check_device(device: str) -> None:
    """Refuse a device spectra cannot run on: it takes cpu, cuda or an existing cuda:N."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device: {device!r} is not cpu, cuda or cuda:N (spectra's SVDs and measures need "
                          "float64, which MPS and other backends lack).")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} was asked for but torch sees no CUDA device here; use --device cpu.")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise ConfigError(f"device: {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA "
                          "device(s), cuda:0 onwards.")


def iter_deltas(base, tuned, options: PairingOptions | None = None, **option_overrides) -> Iterator[DeltaW]:
    """Stream every ΔW of a checkpoint pair, one module at a time.

    Parameters
    ----------
    base, tuned : str or path
        Checkpoints (directory, file, index JSON or hub id); ``tuned`` may be a PEFT adapter.
    options : PairingOptions, optional
    **option_overrides
        Fields of :class:`PairingOptions`, e.g. ``roles=("q", "v")``, ``dtype="float64"``.

    Yields
    ------
    DeltaW
        ``delta`` has shape ``(out, in)`` for matrices.

    Examples
    --------
    >>> for d in iter_deltas("base/", "tuned/", roles=("q",)):  # doctest: +SKIP
    ...     print(d.name, d.shape, float(d.delta.norm()))
    """
    options = replace(options or PairingOptions(), **option_overrides)
    yield from Pairing(base, tuned, options)


_CHUNK = 1 << 17  # elements up-cast at a time: 512 KB of float32, in L2 (on the TinyLlama pair 0.93× the time of 2¹⁶; 2¹⁸ no faster)


def exact_difference(tuned: torch.Tensor, base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tuned − base`` in `dtype`, both up-cast before subtracting (never in half precision).

    The result is bit-identical to ``tuned.to(dtype) - base.to(dtype)``, except for a float64
    weight, which is subtracted in float64 and the difference rounded. On the CPU, half-
    precision inputs are up-cast in L2-sized chunks into one reused buffer, so neither
    weight is ever held in `dtype` whole: 3× faster than the two full up-casts on a
    1B-parameter pair (the page faults of two fresh float32 tensors per module dominate
    those). A transposed view (Conv1D) is subtracted in its stored layout.

    Parameters
    ----------
    tuned, base : torch.Tensor, same shape and device
    dtype : torch.dtype
        float32 or float64.

    Returns
    -------
    torch.Tensor, same shape (and layout) as `base`, dtype `dtype`
    """
    return difference_and_norms(tuned, base, dtype, norms=False)[0]


def difference_and_norms(tuned: torch.Tensor, base: torch.Tensor, dtype: torch.dtype, *,
                         norms: bool = True) -> tuple[torch.Tensor, float | None, float | None]:
    """:func:`exact_difference`, and ‖ΔW‖_F² and ‖W_base‖_F² from the same pass where it is chunked.

    The chunked CPU route into float32 takes both squared norms of every chunk while it
    is in cache (:class:`~spectra.linalg.sketch.BlockSquaredNorm`: the blocks and sums of
    :func:`~spectra.linalg.sketch.squared_norm`), instead of reading ΔW and W_base again.
    A NaN or Inf in either weight makes one of them non-finite (so does a ΔW entry that
    overflows float32 itself, |tuned − base| beyond 3.4e38: :class:`Pairing` refuses such
    a pair); blocks too large or too small for float32 squares are summed in float64.
    Other routes give None.

    Returns
    -------
    (ΔW, ‖ΔW‖_F² or None, ‖W_base‖_F² or None)
    """
    delta, _, delta_sq, base_sq = _difference(tuned, base, dtype, norms=norms)
    return delta, delta_sq, base_sq


def _difference(tuned, base, dtype, *, norms=True, out=None, low=None):
    """(ΔW, bf16(ΔW) or None, ‖ΔW‖_F², ‖W_base‖_F²) of :func:`difference_and_norms`.

    On the chunked route ΔW is written into `out` and, when given, its bf16 rounding into
    `low` (flat buffers of at least base.numel() elements, e.g. from a
    :class:`~spectra.checkpoints.buffers.Lease`), each chunk while it is in cache; on the
    other routes both are ignored and no bf16 copy is made.
    """
    if tuned.dtype == dtype and base.dtype == dtype:
        return tuned - base, None, None, None
    if torch.float64 in (tuned.dtype, base.dtype) and dtype != torch.float64:
        # A float64 checkpoint: subtract in float64, then round the difference. Rounding each side to
        # float32 first puts ~6e-8·|W| of full-rank noise into ΔW, far above float64's storage floor
        # (a rank-2 update of 1e-7 came out full rank "above the noise floor").
        return (tuned.to(torch.float64) - base.to(torch.float64)).to(dtype), None, None, None
    if tuned.dim() == 2 and not base.is_contiguous() and base.T.is_contiguous() and tuned.T.is_contiguous():
        delta, delta_low, delta_sq, base_sq = _difference(tuned.T, base.T, dtype, norms=norms, out=out, low=low)
        return delta.T, (None if delta_low is None else delta_low.T), delta_sq, base_sq
    if not _chunked(tuned, base):
        return tuned.to(dtype) - base.to(dtype), None, None, None
    norms = norms and dtype == torch.float32
    n = base.numel()
    out = torch.empty(base.shape, dtype=dtype) if out is None else out[:n].view(base.shape)
    delta_low = None if low is None else low[:n].view(base.shape)
    flat_out, flat_tuned, flat_base = out.view(-1), tuned.reshape(-1), base.reshape(-1)
    flat_low = None if low is None else delta_low.view(-1)
    buffer = torch.empty(_CHUNK, dtype=dtype)
    delta_acc, base_acc = (BlockSquaredNorm(n), BlockSquaredNorm(n)) if norms else (None, None)
    for i in range(0, n, _CHUNK):
        chunk, up = flat_out[i:i + _CHUNK], buffer[: min(_CHUNK, n - i)]
        chunk.copy_(flat_tuned[i:i + _CHUNK])
        up.copy_(flat_base[i:i + _CHUNK])
        chunk.sub_(up)
        if flat_low is not None:
            flat_low[i:i + _CHUNK].copy_(chunk)
        if norms:
            base_acc.add(up)
            delta_acc.add(chunk)
    return out, delta_low, (delta_acc.total() if norms else None), (base_acc.total() if norms else None)


def _chunked(tuned: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether :func:`difference_and_norms` up-casts this pair chunk by chunk (contiguous, CPU, > 1 chunk)."""
    return base.device.type == "cpu" and base.is_contiguous() and tuned.is_contiguous() and base.numel() > _CHUNK


def _finite_number(x: float | None) -> bool:
    return x is not None and math.isfinite(x)


def _read_stored(source, name: str, entry: PairEntry) -> torch.Tensor:
    """The entry's stored tensor: one expert's slice of a stored (E, ·, ·) tensor, or its rows of experts stacked on
    a 2-D tensor's rows, read alone, not the whole.

    A stacked expert tensor is E entries. Read whole for each, its data was read, scanned for NaN/Inf
    and handed out E times per parameter: 128× on gpt-oss-120b's (128, 2880, 5760) weights, 16× on
    each of DBRX's (16·10752, 6144) w1, v1, w2 in all 40 layers."""
    if entry.expert_rows:
        return source.read_rows(name, *_expert_rows(entry))
    return source.read(name) if entry.expert_index is None else source.read_expert(name, entry.expert_index)


def _read_slice(source, where: TunedSlice) -> torch.Tensor:
    """The matrix a :class:`TunedSlice` names, (out, in), contiguous: rows of one expert of a fused 3-D tensor, or
    per-expert 2-D tensors stacked on their rows."""
    if where.expert is None:
        parts = [source.read(t) for t in where.tensors]
        return parts[0].contiguous() if len(parts) == 1 else torch.cat(parts, dim=0)
    matrix = source.read_expert(where.tensors[0], where.expert)
    if where.rows is not None:
        matrix = matrix[where.rows[0]:where.rows[1]]
    return matrix.contiguous()


def _tuned_stored_name(entry: PairEntry) -> str:
    """The stored tensor(s) an entry's tuned side reads, for messages."""
    where = entry.tuned_slice
    if where is None:
        return _stored_name(entry.tuned_tensor, entry)
    if where.expert is None:
        return " + ".join(where.tensors)
    rows = "" if where.rows is None else f", rows {where.rows[0]}:{where.rows[1]}"
    return f"{where.tensors[0]}[{where.expert}{rows}]"


def _expert_rows(entry: PairEntry) -> tuple[int, int]:
    """(start, stop): the rows of a 2-D tensor that hold an entry's expert (DBRX's experts stacked on the rows)."""
    start = entry.expert_index * entry.expert_rows
    return start, start + entry.expert_rows


def _spacing(source, tensor: str, entry: PairEntry, proj, *, tuned: bool = False) -> torch.Tensor:
    """A quantised tensor's grid spacing at each element of a record (its rows of the oriented matrix)."""
    if entry.expert_rows:
        spacing = source.quantized_spacing(tensor, rows=_expert_rows(entry))
    else:
        spacing = source.quantized_spacing(tensor, entry.expert_index)
    if spacing is None:
        return spacing
    spacing = _orient(spacing, entry, tuned=tuned)
    if proj is not None:
        spacing = spacing[proj.rows if isinstance(proj.rows, slice) else list(proj.rows)]
    return spacing


def _stored_name(name: str, entry: PairEntry) -> str:
    """The stored tensor an entry reads, for messages: ``…experts.gate_up_proj[3]`` for an expert's slice."""
    if entry.expert_rows:
        start, stop = _expert_rows(entry)
        return f"{name}[{start}:{stop}] (expert {entry.expert_index}'s rows)"
    return name if entry.expert_index is None else f"{name}[{entry.expert_index}]"


def _orient(tensor: torch.Tensor, entry: PairEntry, *, tuned: bool = False) -> torch.Tensor:
    """Stored tensor (an expert's slice for an expert entry) → ``(out, in)`` matrix (or the vector as is).

    ``tuned``: the tuned checkpoint's tensor, stored as ``entry.tuned_stored_conv1d`` says."""
    if entry.kind == "vector":  # a class token (1, 1, d) -> (d,); a resized vocabulary's tuned bias keeps every entry
        return tensor.reshape((entry.shape[0] + entry.added_rows,) if tuned and entry.added_rows else entry.shape)
    if tensor.dim() > 2:
        tensor = tensor.reshape(entry.shape)  # a conv kernel (out, in, k…) -> (out, in·k…); a (1, N, d) table -> (N, d)
    return tensor.T if (entry.tuned_stored_conv1d if tuned else entry.conv1d) else tensor  # Conv1D stores (in, out)


def experts_stored_unlike(module: str, b_shape: tuple[int, ...], t_shape: tuple[int, ...], config) -> bool:
    """Whether the base and the fine-tune store the 3-D experts `module` in opposite layouts that transformers loads
    into the same parameter (Qwen3-VL-MoE: the hub's (E, in, out) against transformers 5's (E, out, in))."""
    if len(b_shape) != 3 or len(t_shape) != 3:
        return False
    b_in_out, t_in_out = experts_in_out(module, b_shape, config), experts_in_out(module, t_shape, config)
    return b_in_out != t_in_out and _held(b_shape, b_in_out) == _held(t_shape, t_in_out)


def _held(shape: tuple[int, ...], in_out: bool) -> tuple[int, ...]:
    """A stored expert tensor's shape as the model holds it: (E, out, in) matrices (from (E, in, out) where
    `in_out`), (E, d) biases as stored."""
    return (shape[0], shape[2], shape[1]) if in_out and len(shape) == 3 else tuple(shape)


def _vocab_rows(role: str, b_shape, t_shape) -> tuple[int, int] | None:
    """(base rows, tuned rows) of a vocabulary's matrix (role embed or head) resized in TUNED: rows added
    (``resize_token_embeddings``), the columns alike; None for any other pair of shapes."""
    resized = len(b_shape) == 2 and tuple(b_shape[1:]) == tuple(t_shape[1:]) and t_shape[0] > b_shape[0]
    return (b_shape[0], t_shape[0]) if resized and role in ("embed", "head") else None


def _shape_error(name, b_shape, t_shape, base, tuned, t_name=None, *, experts=False) -> PairingError:
    tuned_name = "" if t_name in (None, name) else f"{t_name} "
    layouts = (" (read as the model holds each expert, (out, in), whichever way round each checkpoint stores it)"
               if experts else "")
    return PairingError(f"tensor {name} has shape {tuple(b_shape)} in {base.spec} but {tuned_name}"
                        f"{tuple(t_shape)} in {tuned.spec}{layouts}: the checkpoints are different architectures or "
                        "sizes. Only a resized vocabulary (extra embedding/head rows in tuned, extra entries of its "
                        "bias) is paired across shapes, and a classification head of another class count (its weight "
                        "and bias) is left out with a note.")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _without_leading_ones(shape) -> tuple[int, ...]:
    """`shape` less its leading singleton dimensions: (1, 17, 64) -> (17, 64), (1, 1, 64) -> (64,)."""
    shape = tuple(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape = shape[1:]
    return shape


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _first(names: list[str]) -> str:
    return names[0] if names else "(none)"


def describe(pairing: Pairing) -> dict[str, Any]:
    """Counts and notes of a pairing, for reports."""
    return {
        "entries": len(pairing.entries),
        "only_in_base": list(pairing.only_in_base),
        "only_in_tuned": list(pairing.only_in_tuned),
        "notes": list(pairing.notes),
        "provenance": pairing.provenance,  # also notes[0]: TUNED may not be of BASE (see Pairing.provenance)
        "skipped": list(pairing.skipped),
        "config_model_type": (pairing.config or {}).get("model_type"),
    }
