"""Where each checkpoint tensor lies in the parameters of the model that loads it.

transformers (≥ 5) renames checkpoint tensors on loading and fuses some into one parameter
(its weight converters): Mixtral's per-expert ``block_sparse_moe.experts.3.w1.weight`` and
``…w3.weight`` (ffn, hidden) become rows [0, ffn) and [ffn, 2·ffn) of expert 3 of
``mlp.experts.gate_up_proj`` (experts, 2·ffn, hidden). gpt-oss stores its experts as the model
holds them, one (experts, in, out) tensor per projection. Three readers need those places, and
read them here: a PEFT adapter on ``target_parameters`` (its per-expert updates, named as the
base checkpoint's tensors: :mod:`spectra.checkpoints.adapter`), verify's truncated-SVD model and
the truncation sweep (checkpoint-named weights written into a loaded model:
:func:`weight_places`).

:func:`parameter_sources` says which checkpoint tensors load into a parameter, and through
which converter; :func:`split_sources` reads that conversion back into one
:class:`TensorSlice` per checkpoint matrix, or raises :class:`PlacementError` for a conversion
spectra does not invert.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from spectra.checkpoints.architectures import (IN_OUT_EXPERT_MODEL_TYPES, conv1d_by_shape, is_conv1d, loaded_experts,
                                              module_info, parallel_experts)
from spectra.checkpoints.targets import conversions, resolve_name
from spectra.errors import SpectraError


class PlacementError(SpectraError):
    """The checkpoint tensors that load into a parameter cannot be located in it exactly.

    ``reason`` completes a sentence about ``parameter``; ``mismatch`` is True where a tensor
    stored as the model holds it has another shape (the checkpoint is of another model), False
    where transformers' conversion is one spectra does not invert.
    """

    def __init__(self, parameter: str, reason: str, *, mismatch: bool = False):
        super().__init__(f"{parameter}: {reason}")
        self.parameter, self.reason, self.mismatch = parameter, reason, mismatch


@dataclass(frozen=True)
class ParameterSlice:
    """Where one checkpoint tensor lies in a parameter transformers fuses several into on loading.

    Expert ``expert`` of a 3-D parameter (E, d₁, d₂) and of it ``rows`` (all when None); a
    2-D parameter whole. ``stored_transposed``: the place holds the stored matrix's transpose. See
    :func:`weight_places`.
    """

    parameter: str  # the model's parameter name (model.layers.0.mlp.experts.gate_up_proj)
    expert: int = 0
    rows: tuple[int, int] | None = None  # Mixtral's w3: (ffn, 2·ffn) of gate_up_proj[e]
    # the checkpoint stores the matrix as the transpose of its place, which transformers transposes on loading
    # (Qwen3-VL-MoE's hub experts, (E, in, out), for the model's (E, out, in))
    stored_transposed: bool = False


@dataclass(frozen=True)
class TensorSlice:
    """One checkpoint matrix, named and oriented as the checkpoint pairing names it, and its place in a parameter."""

    tensor: str  # the checkpoint tensor (…experts.3.w1.weight, or a stored 3-D …experts.gate_up_proj)
    module: str  # the pairing's name: the tensor's, or an expert's of a stored 3-D one (…experts.3.gate_up_proj)
    shape: tuple[int, int]  # (out, in)
    conv1d: bool  # stored (in, out): a Conv1D, gpt-oss's experts, Qwen3-VL-MoE's hub experts (place.stored_transposed)
    place: ParameterSlice
    stored_expert: int | None = None  # the expert of the stored 3-D `tensor` this matrix is; None: the tensor whole

    @property
    def held_in_out(self) -> bool:
        """Whether the parameter holds this matrix (in, out): see :func:`held_in_out`."""
        return held_in_out(self.conv1d, self.place.stored_transposed)


def held_in_out(conv1d: bool, stored_transposed: bool) -> bool:
    """Whether a parameter holds a checkpoint matrix (in, out) (``x @ W[e]``): the checkpoint stores it so (`conv1d`:
    gpt-oss's experts, a Conv1D's weight) and loading keeps that layout, that is, does not transpose it
    (`stored_transposed`: Qwen3-VL-MoE's hub experts, stored (in, out), are the model's (out, in))."""
    return conv1d and not stored_transposed


class Source(NamedTuple):
    """A checkpoint tensor that loads into a parameter, and how."""

    tensor: str
    converter: Any = None  # the transformers WeightConverter that fuses it, None when it loads as stored
    pattern: int | None = None  # the index of its source pattern in the converter (the order Concatenate keeps)


def parameter_sources(model, names: Iterable[str], parameters: Iterable[str]) -> dict[str, list[Source]]:
    """Parameter of `model` (of `parameters`) → the checkpoint tensors of `names` that load into it.

    Renamed and converted as transformers' conversion table for the model's class says, as on
    loading; a parameter no tensor loads into is left out. The checkpoint's names may differ from
    the model's by a leading prefix.
    """
    table = conversions(model)
    renamings, converters = table if table is not None else ([], [])
    loaded: dict[str, list[Source]] = {}
    for tensor in names:
        key, found = tensor, Source(tensor)
        if table is not None:
            from transformers.core_model_loading import rename_source_key

            key = rename_source_key(tensor, renamings, [])[0]
            for converter in converters:  # at most one converts a tensor, as on loading
                renamed, pattern = rename_source_key(key, [], [converter])
                if pattern is not None:
                    key, found = renamed, Source(tensor, converter, converter.source_patterns.index(pattern))
                    break
        loaded.setdefault(key, []).append(found)
    out = {}
    for parameter in parameters:
        key = parameter if parameter in loaded else resolve_name(parameter, loaded)
        if key is not None:
            out[parameter] = loaded[key]
    return out


def _stored_conv1d(checkpoint, module: str, config) -> bool:
    """Whether the checkpoint stores the 2-D weight of `module` (in, out): by the config's model type
    (:func:`~spectra.checkpoints.architectures.is_conv1d`), and without one, for GPT-2's module names, by the
    shapes of the checkpoint's tensors so named, as the pairing reads them (GPT-BigCode's nn.Linear beside GPT-2's
    Conv1D: :func:`~spectra.checkpoints.architectures.conv1d_by_shape`)."""
    if (config or {}).get("model_type") or not module.endswith(_CONV1D_MODULES):
        return is_conv1d(module, config)
    shapes = {n.removesuffix(".weight"): tuple(checkpoint.info(n).shape) for n in checkpoint.names()
              if n.endswith(tuple(f"{m}.weight" for m in _CONV1D_MODULES))}
    return conv1d_by_shape(shapes)[0].get(module, is_conv1d(module, config))


_CONV1D_MODULES = (".c_attn", ".c_proj", ".c_fc", ".q_attn")


def split_sources(checkpoint, parameter: str, shape: tuple[int, ...], sources: list[Source], config, *,
                  label: str = "checkpoint") -> list[TensorSlice]:
    """Each checkpoint matrix that lies in `parameter` (of `shape`), and its place there.

    Three layouts are read exactly: the parameter stored as the model holds it (a 2-D weight, or
    3-D experts split per expert as ``{…experts}.{e}.{name}``); 3-D experts stored with each
    expert transposed, which transformers transposes on loading (``Transpose(1, 2)``, with
    ``check_dims`` only where the stored shape is not the parameter's: Qwen3-VL-MoE's hub
    checkpoints store (E, in, out), transformers 5 saves (E, out, in)); and per-expert 2-D
    (out, in) matrices that transformers stacks by expert (``MergeModulelist(dim=0)``), then
    concatenates along the rows in its source patterns' order (``Concatenate(dim=1)``:
    Mixtral's w1, w3 → gate_up_proj).

    Parameters
    ----------
    checkpoint : CheckpointSource
        Where `sources` are stored (their shapes are read from it).
    parameter, shape
        The model's parameter and its shape.
    sources : list of Source
        From :func:`parameter_sources`.
    config : dict or None
        The checkpoint's ``config.json`` (expert layout, Conv1D detection).
    label : str
        What the checkpoint is called in messages (``"base"``: "the base's …").

    Raises
    ------
    PlacementError
        Any other conversion, or a tensor stored as the model holds it in another shape.
    """
    if len(sources) == 1 and sources[0].converter is not None and _transposes_experts(sources[0].converter):
        stored = tuple(checkpoint.info(sources[0].tensor).shape)
        if stored == shape and sources[0].converter.operations[0].check_dims:  # transformers loads it as stored
            return split_sources(checkpoint, parameter, shape, [Source(sources[0].tensor)], config, label=label)
        return _transposed_experts(parameter, shape, sources[0].tensor, stored, config, label)
    if len(sources) == 1 and sources[0].converter is None:  # stored as the model holds it
        tensor = sources[0].tensor
        module = tensor.removesuffix(".weight")
        stored = tuple(checkpoint.info(tensor).shape)
        if stored != shape:
            raise PlacementError(parameter, f"the {label}'s {tensor} is {stored}", mismatch=True)
        if len(shape) == 2:
            conv1d = _stored_conv1d(checkpoint, module, config)
            return [TensorSlice(tensor, module, (shape[1], shape[0]) if conv1d else shape, conv1d,
                                ParameterSlice(parameter))]
        loaded = loaded_experts(module, shape, config)  # GraniteMoE's block_sparse_moe.input_linear.weight …
        if loaded is not None:  # (E, out, in), named per expert as paired: …block_sparse_moe.experts.3.gate_up_proj
            head, _, proj = loaded.rpartition(".")
            return [TensorSlice(tensor, f"{head}.{e}.{proj}", shape[1:], False, ParameterSlice(parameter, e),
                                stored_expert=e) for e in range(shape[0])]
        if parallel_experts(module, shape, config):  # JetMoE's mlp.input_linear.weight …: (E, out, in), as paired
            return [TensorSlice(tensor, f"{module}.{e}", shape[1:], False, ParameterSlice(parameter, e),
                                stored_expert=e) for e in range(shape[0])]
        if ".experts." not in f".{tensor}." or tensor.endswith(".weight"):
            raise PlacementError(parameter, f"the {label} stores it as {tensor}, a 3-D tensor spectra's pairing does "
                                 "not split per expert")
        head, _, proj = module.rpartition(".")  # model.layers.0.mlp.experts . gate_up_proj
        in_out = (config or {}).get("model_type") in IN_OUT_EXPERT_MODEL_TYPES  # x @ W[e]: W[e] is (in, out)
        return [TensorSlice(tensor, f"{head}.{e}.{proj}", (shape[2], shape[1]) if in_out else shape[1:], in_out,
                            ParameterSlice(parameter, e), stored_expert=e) for e in range(shape[0])]
    converter = sources[0].converter
    if converter is None or any(s.converter is not converter for s in sources) or len(shape) != 3:
        raise PlacementError(parameter, f"{len(sources)} {label} tensors ({sources[0].tensor}, …) load into it other "
                             "than by one stacking of per-expert matrices")
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if ops not in ([("MergeModulelist", 0)], [("MergeModulelist", 0), ("Concatenate", 1)]):
        raise PlacementError(parameter, f"transformers converts the {label}'s {sources[0].tensor} into it by "
                             f"{', '.join(f'{n}(dim={d})' for n, d in ops)}, a conversion spectra does not invert")
    by_pattern: dict[int, list[tuple[int | None, str]]] = {}
    for source in sources:
        by_pattern.setdefault(source.pattern, []).append(
            (module_info(source.tensor.removesuffix(".weight")).expert, source.tensor))
    out, offset = [], 0
    for index in sorted(by_pattern):  # Concatenate keeps the order of the source patterns
        tensors = by_pattern[index]  # MergeModulelist stacks them by expert number
        shapes = {tuple(checkpoint.info(t).shape) for _, t in tensors}
        if sorted(e for e, _ in tensors if e is not None) != list(range(shape[0])) or len(tensors) != shape[0] \
                or len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise PlacementError(parameter, f"its {label} tensors {tensors[0][1]}, … are not one 2-D (out, in) "
                                 f"matrix of one shape for each of experts 0…{shape[0] - 1}")
        ((rows, columns),) = shapes
        if columns != shape[2]:
            raise PlacementError(parameter, f"its {label} tensor {tensors[0][1]} has {columns} columns, the "
                                 f"parameter {shape[2]}")
        out += [TensorSlice(t, t.removesuffix(".weight"), (rows, columns), False,
                            ParameterSlice(parameter, e, (offset, offset + rows))) for e, t in sorted(tensors)]
        offset += rows
    if offset != shape[1]:
        raise PlacementError(parameter, f"its {label} tensors hold {offset} of its {shape[1]} rows")
    return out


def _transposes_experts(converter) -> bool:
    """Whether a converter only transposes each expert of one 3-D tensor, keeping its name: ``Transpose(1, 2)``."""
    ops = converter.operations
    return len(ops) == 1 and type(ops[0]).__name__ == "Transpose" and {ops[0].dim0, ops[0].dim1} == {1, 2} \
        and list(converter.source_patterns) == list(converter.target_patterns)


def _transposed_experts(parameter: str, shape: tuple[int, ...], tensor: str, stored: tuple[int, ...], config,
                        label: str) -> list[TensorSlice]:
    """One slice per expert of a 3-D `tensor` stored (E, d₂, d₁) for the parameter's (E, d₁, d₂): expert e's stored
    matrix is the transpose of the parameter's [e], which the model holds (out, in) (or, for a model type of
    :data:`IN_OUT_EXPERT_MODEL_TYPES`, (in, out)), so it is stored the other way round."""
    if len(shape) != 3 or ".experts." not in f".{tensor}." or stored != (shape[0], shape[2], shape[1]):
        raise PlacementError(parameter, f"the {label}'s {tensor} is {stored}, neither the parameter's {shape} nor its "
                             "experts transposed", mismatch=True)
    head, _, proj = tensor.rpartition(".")
    model_in_out = (config or {}).get("model_type") in IN_OUT_EXPERT_MODEL_TYPES  # the model's [e] is (in, out)
    return [TensorSlice(tensor, f"{head}.{e}.{proj}", (shape[2], shape[1]) if model_in_out else shape[1:],
                        not model_in_out, ParameterSlice(parameter, e, stored_transposed=True), stored_expert=e)
            for e in range(shape[0])]


def weight_places(weights: Mapping, params: Mapping[str, torch.Tensor], *,
                  rename=None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Where each checkpoint-named weight of `weights` lies in a model: {name: the parameter or its slice}, and the
    names with no such place.

    `weights` maps a checkpoint module name to ``(W, conv1d, update)``: W (or anything with
    its ``shape``) oriented (out, in), and ``update`` None or what names its slice of a
    parameter (``parameter``, ``expert``, ``rows``, ``stored_transposed``: a :class:`ParameterSlice`, or an adapter's
    :class:`~spectra.checkpoints.adapter.ExpertUpdate`). A module's weight is the parameter of
    its name up to a prefix (``match_names``), its name first renamed by ``rename`` (checkpoint
    tensor name → the model's, :func:`~spectra.checkpoints.targets.loading_rename`: Qwen2-VL's
    hub ``model.layers.N…`` loads as ``model.language_model.layers.N…``), but for names that
    ``rename`` sends to one parameter together (tensors transformers fuses on loading), which
    keep their own. A slice lies in the parameter transformers fuses
    the checkpoint tensor into on loading, as its conversion table says: expert e of a 3-D
    parameter (E, d₁, d₂), and of it the rows the tensor fills (Mixtral's w1 and w3: rows
    [0, ffn) and [ffn, 2·ffn) of gate_up_proj[e]); a 2-D parameter (a router's weight) whole.
    A place holds the weight as the checkpoint stores it, (out, in) or a Conv1D's (in, out)
    (gpt-oss's (E, in, out) experts), or it counts as none; where the checkpoint stores the
    parameter's matrix transposed (``stored_transposed``: Qwen3-VL-MoE's hub experts, (in, out)
    for the model's (out, in)) the place is its transposed view, so that it too holds the weight
    as stored. `params`' tensors are sliced by view: writing into a place writes into the model.
    """
    from spectra.checkpoints.names import match_names

    whole = [n for n, (_, _, update) in weights.items() if update is None]
    loaded = {n: n + ".weight" if rename is None else rename(n + ".weight") for n in whole}
    fused = {key for key, count in Counter(loaded.values()).items() if count > 1}  # several into one parameter
    loaded = {n: n + ".weight" if key in fused else key for n, key in loaded.items()}
    match = match_names(list(loaded.values()), list(params))
    places, unplaced = {}, []
    for name, (W, conv1d, update) in weights.items():
        if update is None:
            key = match.pairs.get(loaded[name])
            place = None if key is None else params[key]
        else:
            key = resolve_name(update.parameter, params)
            place = None if key is None else params[key]
            if place is not None and place.dim() == 3:
                place = place[update.expert]  # (E, d₁, d₂) -> (d₁, d₂)
            if place is not None and update.rows is not None:
                place = place[update.rows[0]:update.rows[1]]  # this tensor's rows of the fused W[e]
            if place is not None and update.stored_transposed:
                place = place.T  # (d₁, d₂) -> (d₂, d₁), as stored
        if place is None or tuple(place.shape) != (tuple(W.shape)[::-1] if conv1d else tuple(W.shape)):
            unplaced.append(name)
        else:
            places[name] = place
    return places, unplaced
