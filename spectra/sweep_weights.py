"""Setting a loaded model's weights to W_base + ΔW_r per module, for truncation sweeps.

The model is loaded once (from the fine-tune) and its tensors are overwritten in place,
read from the memory-mapped checkpoints on demand: a targeted weight at rank 0 is the
base's tensor, at full rank the fine-tune's, in between ``W_base + U_r diag(S_r) Vw_r``;
every other tensor comes from the fine-tune or from the base. Only what changed since the
last configuration is rewritten.

A module's weight is the model's parameter of its checkpoint name (as transformers renames
it on loading), or a slice of one: an expert of a 3-D tensor the model holds as stored
(gpt-oss's (E, in, out) experts) or with each expert transposed on loading (Qwen3-VL-MoE's hub
checkpoints store (E, in, out) for the model's (E, out, in): its place is a transposed view),
or a per-expert matrix transformers fuses on loading
(Mixtral's ``experts.3.w1``/``w3``: rows [0, ffn) and [ffn, 2·ffn) of
``mlp.experts.gate_up_proj[3]``), located through transformers' conversion table as an
adapter on fused experts is (:mod:`spectra.checkpoints.placement`).
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from dataclasses import dataclass

import torch

from spectra.checkpoints.names import match_names
from spectra.checkpoints.relatedness import relative_size
from spectra.checkpoints.placement import (PlacementError, TensorSlice, parameter_sources, split_sources,
                                           weight_places)
from spectra.errors import ConfigError


@dataclass
class Target:
    """One truncated module: names on both sides, its role and stack, the model's key, and its SVD factors."""

    name: str
    role: str
    stack: str | None  # None: the language model; else a vision tower, an encoder, … (ModuleInfo.stack)
    shape: tuple[int, int]  # (out, in)
    base_tensor: str
    tuned_tensor: str | None  # None: read through entry.tuned_slice (experts per expert on one side, fused on other)
    key: str  # the model's state_dict key: the parameter it is, or lies in
    conv1d: bool  # the fine-tune stores it (in, out): a Conv1D, gpt-oss's experts, Qwen3-VL-MoE's hub experts
    entry: object
    place: torch.Tensor  # state[key] or its slice (expert, rows), in the fine-tune's stored layout; written in place
    plan_rank: int | None = None
    factors: tuple | None = None  # U (out, k), S (k,), Vw (k, in), float64

    @property
    def full_rank(self) -> int:
        return min(self.shape)


@dataclass(frozen=True)
class _Slot:
    """An untargeted checkpoint tensor's slice of a fused parameter, set by name from either checkpoint."""

    place: torch.Tensor  # the slice of the model's parameter, in the checkpoint's layout
    tuned_tensor: str
    base_tensor: str | None  # None: absent from the base (or resized), the fine-tune's in every configuration


class ModelWeights:
    """The targeted and non-targeted tensors of a model loaded from the fine-tune.

    Parameters
    ----------
    model : torch.nn.Module
        Loaded from ``tuned``; its tensors are overwritten in place.
    base, tuned : str or path
    plan : RankPlan or path, optional
        Its modules are the targets (each with its planned rank).
    roles : tuple of str, optional
        Roles targeted without a plan (default: every block linear).
    stacks : tuple of str, optional
        Stacks whose modules of ``roles`` are targeted without a plan (default: every stack).
    """

    def __init__(self, model, base, tuned, *, plan=None, roles=None, stacks=None):
        from spectra.checkpoints.targets import loading_rename, names_by_key

        self.state = model.state_dict()  # key -> tensor sharing the parameter's storage
        if plan is not None and not hasattr(plan, "modules"):
            from spectra.ranks import load_plan

            plan = load_plan(plan)
        self.pairing = _sweep_pairing(base, tuned, plan=plan, roles=roles, stacks=stacks)
        self.notes: list[str] = list(self.pairing.notes)
        self.relative_sizes: dict[str, float] = {}  # target -> ‖ΔW‖_F/‖W_base‖_F, as `delta` reads it
        entries, planned = _target_entries(self.pairing, plan, roles, base, tuned)
        rename = loading_rename(model)
        self._tuned_names = names_by_key(self.pairing.tuned.names(), list(self.state), rename)
        self._base_names = names_by_key(self.pairing.base.names(), list(self.state), rename)
        # parameters no one checkpoint tensor loads into: transformers fused several into each (Mixtral's experts)
        unmatched = [k for k, _ in model.named_parameters() if k not in self._tuned_names]
        fused, refused = _fused_slices(model, self.pairing.tuned, unmatched, self.pairing.config)
        stacked = _stored_experts(model, self.pairing.tuned, [k for k in self._tuned_names if self.state[k].dim() == 3],
                                  self.pairing.config)
        # key -> the view of the parameter that holds its checkpoint tensor as stored (Qwen3-VL-MoE's hub experts,
        # (E, in, out), transposed on loading into the model's (E, out, in)), where that is not the parameter itself
        self._as_stored = {key: self.state[key].transpose(1, 2) for key, slices in stacked.items()
                           if slices[0].place.stored_transposed}
        self.targets = self._placed_targets(model, entries, planned, fused, refused, stacked)
        if not self.targets:
            raise ConfigError(_nothing_to_truncate(entries, plan, roles, base, tuned,
                                                   type(model).__name__))
        targeted = self._filled_keys()  # keys the targets fill whole
        fused_keys = {key for key, _ in fused.values()}
        # and the non-target keys whose base tensor is stored transposed from the fine-tune's
        self.non_target, self._base_t = self._non_targets(targeted)
        self.slots = self._untargeted_slots(fused, targeted)
        self.fused = self._unlocated_keys(targeted, fused_keys)
        self._fused_values: dict[str, dict[str, torch.Tensor]] = {
            "tuned": {k: self.state[k].detach().to("cpu", copy=True) for k in self.fused}}
        self._base_spec, self._model_class = base, type(model)
        # the plan's modules_to_save (a classifier's head, which PEFT trains in full): `spectra extract --plan`
        # saves the fine-tune's whole, so the plan point ("plan" non-targets) takes them from the fine-tune
        self.saved_keys = _saved_keys(self.non_target, plan, model)
        self._mode = "tuned"  # the model as loaded
        self._ranks: list[int | None] = [t.full_rank for t in self.targets]
        # targets in a key the non-targets rewrite whole (some experts of a stored 3-D tensor): rewritten after it
        self._overwritten = [i for i, t in enumerate(self.targets) if t.key not in targeted and t.key not in fused_keys]

    def _placed_targets(self, model, entries, planned, fused, refused, stacked) -> list[Target]:
        """The entries that have a place in the model (a parameter, an expert of one, a fused slice); notes the rest.

        ``stacked``: model key -> the per-expert slices of the stored 3-D tensor that loads into it
        (:func:`_stored_experts`); an expert's place is its slice's, as stored (a transposed view
        where loading transposes it).
        """
        key_of = {name: key for key, name in self._tuned_names.items()}  # tuned checkpoint name -> model key
        expert_slices = {(s.tensor, s.stored_expert): s.place for slices in stacked.values() for s in slices}
        experts = {e.name: (torch.empty(e.shape, device="meta"), e.tuned_stored_conv1d,  # one expert of a 3-D tensor
                            expert_slices[e.tuned_tensor, e.expert_index])
                   for e in entries if (e.tuned_tensor, e.expert_index) in expert_slices}
        stacked_places, _ = weight_places(experts, dict(model.named_parameters()))
        targets, unplaced = [], []
        for e in entries:
            if e.expert_index is None and e.tuned_tensor in key_of:
                key = key_of[e.tuned_tensor]
                place = self.state[key]
            elif e.name in stacked_places:
                key, place = key_of[e.tuned_tensor], stacked_places[e.name]
            elif e.expert_index is None and e.tuned_tensor in fused:
                key, place = fused[e.tuned_tensor]
            elif e.tuned_slice is not None and (found := self._sliced_place(e, key_of, fused)) is not None:
                key, place = found
            else:
                unplaced.append(e.name)
                continue
            targets.append(Target(e.name, e.info.role, e.info.stack, tuple(e.shape), e.base_tensor, e.tuned_tensor,
                                  key, e.tuned_stored_conv1d, e, place,
                                  plan_rank=None if planned is None else planned[e.name]))
        if unplaced:  # no parameter of its name, and no slice of one that spectra can locate
            self.notes.append(_unplaced_note(unplaced, refused, type(model).__name__, planned=planned is not None))
        return targets

    def _sliced_place(self, entry, key_of: dict[str, str], fused: dict) -> tuple[str, torch.Tensor] | None:
        """(key, place) of an entry the pairing reads through ``tuned_slice``: the experts stored per expert on one
        side and fused on the other (:meth:`~spectra.checkpoints.pairing.Pairing._mixed_experts`), None without one.

        A fused fine-tune loads as stored: the entry's rows of expert e of its parameter (a per-expert base's
        ``experts.3.w3`` is rows [ffn, 2·ffn) of ``gate_up_proj[3]``), or a renamed tensor's whole parameter. A
        per-expert fine-tune is fused on loading: a fused base's expert e is ``parameter[e]``, which its per-expert
        tensors fill in the order the pairing stacks them (the converter's)."""
        where, first = entry.tuned_slice, entry.tuned_slice.tensors[0]
        if first in key_of and where.expert is not None:
            key = key_of[first]
            place = self.state[key][where.expert]  # (E, out, in) -> (out, in)
            return key, place if where.rows is None else place[where.rows[0]:where.rows[1]]
        if first in key_of and len(where.tensors) == 1:  # a tensor renamed on loading (Mixtral's router)
            return key_of[first], self.state[key_of[first]]
        if first in fused and where.expert is None and entry.expert_index is not None:
            key = fused[first][0]
            if all(fused.get(t, (None,))[0] == key for t in where.tensors) and self.state[key].dim() == 3:
                return key, self.state[key][entry.expert_index]
        return None

    def _filled_keys(self) -> set[str]:
        """The keys the targets fill whole: their places' sizes add up to the parameter's."""
        covered = Counter()
        for t in self.targets:
            covered[t.key] += t.place.numel()
        return {k for k, n in covered.items() if n == self.state[k].numel()}

    def _non_targets(self, targeted: set[str]) -> tuple[list[str], set[str]]:
        """Keys one tensor loads and no target fills, and those of them whose base tensor is stored transposed from
        the fine-tune's (3-D experts); one the base lacks or resized is noted, its base name dropped."""
        non_target = [k for k in self.state if k not in targeted and k in self._tuned_names]
        base_t = set()
        for key in non_target:
            name = self._base_names.get(key)
            if name is not None and self._base_transposed(key, name):
                base_t.add(key)
            elif name is None or tuple(self.pairing.base.info(name).shape) != tuple(self._stored_view(key).shape):
                self._base_names.pop(key, None)
                self.notes.append(f"{key}: absent from the base (or resized); taken from the fine-tune in every "
                                  "configuration.")
        return non_target, base_t

    def _base_transposed(self, key: str, name: str) -> bool:
        """Whether the base stores 3-D experts `name` each transposed from the fine-tune's, as pairing reads them."""
        from spectra.checkpoints.pairing import experts_stored_unlike

        b, t = self.pairing.base.info(name).shape, self.pairing.tuned.info(self._tuned_names[key]).shape
        return ".experts." in f".{name}." and experts_stored_unlike(name.removesuffix(".weight"), tuple(b), tuple(t),
                                                                     self.pairing.config)

    def _stored_view(self, key: str) -> torch.Tensor:
        """The model's tensor of `key` in its checkpoint tensor's stored layout: itself, or a transposed view."""
        return self._as_stored.get(key, self.state[key])

    def _untargeted_slots(self, fused: dict[str, tuple[str, torch.Tensor]], targeted: set[str]) -> list[_Slot]:
        """The fused slices no target covers, each from the base's or the fine-tune's tensor of the same name."""
        base_of = {t: b for b, t in match_names(self.pairing.base.names(), self.pairing.tuned.names()).pairs.items()}
        target_tensors = {t.tuned_tensor for t in self.targets}  # and those read through a pairing's tuned_slice
        target_tensors |= {n for t in self.targets if t.entry.tuned_slice is not None
                           for n in t.entry.tuned_slice.tensors}
        slots = []
        for tensor, (key, place) in fused.items():
            if tensor in target_tensors or key in targeted:
                continue
            name = base_of.get(tensor)
            if name is None or self.pairing.base.info(name).shape != self.pairing.tuned.info(tensor).shape:
                name = None
                self.notes.append(f"{tensor}: absent from the base (or resized); its slice of {key} is taken from "
                                  "the fine-tune in every configuration.")
            slots.append(_Slot(place, tensor, name))
        return slots

    def _unlocated_keys(self, targeted: set[str], fused_keys: set[str]) -> list[str]:
        """Keys no checkpoint tensor feeds that spectra can locate: set whole as transformers loads the base model."""
        # a key sharing storage with a matched one is left out: tied weights follow that key
        known = {self.state[k].data_ptr() for k in (*targeted, *self._tuned_names, *fused_keys)}
        return [k for k in self.state if k not in targeted and k not in self._tuned_names
                and k not in fused_keys and self.state[k].data_ptr() not in known]

    def delta(self, target: Target) -> torch.Tensor:
        """ΔW of one target, (out, in) float32 (its size against W_base kept in :attr:`relative_sizes`)."""
        (d,) = self.pairing.load(target.entry)
        self.relative_sizes[target.name] = relative_size(math.sqrt(d.delta_sq), math.sqrt(d.base_sq))
        return d.delta

    def plan_ranks(self) -> tuple[int, ...] | None:
        if any(t.plan_rank is None for t in self.targets):
            return None
        return tuple(min(t.plan_rank, t.full_rank) for t in self.targets)

    @property
    def plan_source(self) -> str:
        """The non-target source of the plan point: ``"plan"`` where the plan saves modules whole, else ``"base"``."""
        return "plan" if self.saved_keys else "base"

    @torch.no_grad()
    def apply(self, ranks: tuple[int, ...], *, non_target: str) -> None:
        """Set every target to its rank (0: base, full: tuned) and the non-targets from ``non_target``: ``"base"``,
        ``"tuned"``, or ``"plan"`` (the base's but for :attr:`saved_keys`, the fine-tune's: the adapter of the plan)."""
        if non_target != self._mode:
            on_base = non_target in ("base", "plan")
            # between "base" and "plan" only the saved modules differ: the rest is the base's either way
            only_saved = {non_target, self._mode} == {"base", "plan"}
            rewritten = self.saved_keys if only_saved else set(self.non_target)
            for key in self.non_target:
                if key not in rewritten:
                    continue
                from_base = on_base and key in self._base_names and not (non_target == "plan" and key in self.saved_keys)
                source, name = ((self.pairing.base, self._base_names[key]) if from_base
                                else (self.pairing.tuned, self._tuned_names[key]))
                value = source.read(name)
                self._stored_view(key).copy_(value.transpose(1, 2) if key in self._base_t and source is
                                             self.pairing.base else value)
            if not only_saved:
                for key, value in self._fused_for("base" if on_base else "tuned").items():
                    self.state[key].copy_(value)
                for slot in self.slots:
                    base_side = on_base and slot.base_tensor is not None
                    slot.place.copy_(self.pairing.base.read(slot.base_tensor) if base_side
                                     else self.pairing.tuned.read(slot.tuned_tensor))
            for i in self._overwritten:
                if self.targets[i].key in rewritten:
                    self._ranks[i] = None
            self._mode = non_target
        changed: dict[tuple[str, str], list[int]] = {}  # (base tensor, tuned tensor) -> the targets to rewrite
        for i, (target, rank) in enumerate(zip(self.targets, ranks)):
            if self._ranks[i] != rank:
                changed.setdefault((target.base_tensor, target.tuned_tensor), []).append(i)
        for members in changed.values():
            # one stored tensor may hold several targets (gpt-oss's (E, in, out) experts, one target each): each side
            # of it is read once for all of them, and let go before the next tensor's
            read = functools.cache(lambda side, name: getattr(self.pairing, side).read(name))
            for i in members:
                self.targets[i].place.copy_(self._weight(self.targets[i], ranks[i], read))
                self._ranks[i] = ranks[i]

    def _fused_for(self, mode: str) -> dict[str, torch.Tensor]:
        """Values of the fused keys on the ``mode`` side; the base's as transformers loads the base model.

        The base model is loaded whole, on the CPU: its values are copied into the model's tensors
        on whatever device they live, and a second copy of the model there would double its memory.
        """
        if mode not in self._fused_values:
            base_values = {}
            if self.fused:
                from spectra.lora.train import model_dir, quiet_loading

                with quiet_loading():
                    loaded, info = self._model_class.from_pretrained(
                        str(model_dir(self._base_spec)), dtype=torch.float32, output_loading_info=True,
                        ignore_mismatched_sizes=True)
                absent = set(info["missing_keys"]) | {k for k, *_ in info["mismatched_keys"]}
                state = loaded.state_dict()
                for key in self.fused:
                    if key in absent or key not in state or state[key].shape != self.state[key].shape:
                        self.notes.append(f"{key}: absent from the base (or resized); taken from the fine-tune in "
                                          "every configuration.")
                        base_values[key] = self._fused_values["tuned"][key]
                    else:
                        base_values[key] = state[key].detach().clone()
                        self.notes.append(f"{key}: fused from several checkpoint tensors; its base value is the "
                                          "one transformers loads into the base model.")
                del loaded, state
            self._fused_values[mode] = base_values
        return self._fused_values[mode]

    def _weight(self, target: Target, rank: int, read) -> torch.Tensor:
        """The target's tensor at ``rank``, in the fine-tune's stored layout (its place's; the base's expert turned
        to it where the base stores it the other way round).

        ``read(side, name)`` reads a tensor from the ``"base"`` or ``"tuned"`` checkpoint.
        """
        expert = target.entry.expert_index  # one expert of a stored (E, ·, ·) tensor
        where = target.entry.tuned_slice  # the experts stored per expert on one side, fused on the other
        if rank >= target.full_rank and where is not None:
            if where.expert is None:  # per-expert (out, in) matrices stacked on their rows: [gate; up]
                return torch.cat([read("tuned", t) for t in where.tensors])
            tuned = read("tuned", where.tensors[0])[where.expert]  # rows of expert e of a fused (E, out, in)
            return tuned if where.rows is None else tuned[where.rows[0]:where.rows[1]]
        if rank >= target.full_rank:
            tuned = read("tuned", target.tuned_tensor)
            return tuned if expert is None else tuned[expert]
        base = read("base", target.base_tensor)
        base = base if expert is None else base[expert]
        if target.entry.tuned_conv1d is not None:  # the base stores the expert the other way round: as the fine-tune
            base = base.T
        if rank == 0:
            return base
        U, S, Vw = target.factors
        if rank > S.shape[0]:
            raise ValueError(f"{target.name}: rank {rank} asked of factors computed to rank {S.shape[0]}")
        delta = (U[:, :rank] * S[:rank]) @ Vw[:rank]  # (out, r) @ (r, in) -> (out, in)
        return base.double() + (delta.T if target.conv1d else delta)  # Conv1D stores (in, out)


def _saved_keys(non_target: list[str], plan, model) -> set[str]:
    """The non-target keys inside the modules PEFT saves whole for the plan's ``modules_to_save``
    (:class:`~spectra.ranks.plan.SavedModule`), found by PEFT's own rule (:func:`~spectra.lora.saved_modules.peft_wrapped`:
    a module whose name ends with an entry, or with its task's heads): ``classifier`` holds ``classifier.weight``,
    RoBERTa's ``classifier.dense.bias`` and DistilBERT's ``pre_classifier.weight``, as ``spectra extract`` saves them."""
    saved = tuple(getattr(plan, "modules_to_save", ()))
    if not saved:
        return set()
    from spectra.lora.saved_modules import peft_wrapped

    wrapped = peft_wrapped([m.name for m in saved], [name for name, _ in model.named_modules()],
                           task=saved[0].task_type)
    return {key for key in non_target if any(key.startswith(f"{module}.") for module in wrapped)}


def _sweep_pairing(base, tuned, *, plan, roles, stacks=None):
    """The pairing of the checkpoints (of ``stacks`` without a plan); refuses an adapter, another base's plan, an
    unknown role. Every role is paired: :func:`_target_entries` selects by role as train and extract do."""
    from spectra.checkpoints.architectures import ROLES
    from spectra.checkpoints.pairing import Pairing, PairingOptions
    from spectra.checkpoints.source import AdapterSource

    unknown = sorted(set(roles or ()) - set(ROLES))
    if plan is None and unknown:
        raise ConfigError(f"roles: unknown role(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}.")
    options = PairingOptions(stacks=None if plan is not None else stacks, split_fused=False, vectors=False, norms=True)
    pairing = Pairing(base, tuned, options)
    if isinstance(pairing.tuned, AdapterSource):
        raise ConfigError(f"{tuned} is a PEFT adapter; a truncation sweep needs the full fine-tune's checkpoint.")
    if plan is not None:
        plan.check_base(pairing.base)  # as extract and train do: a plan of another base is refused
    return pairing


def _target_entries(pairing, plan, roles, base, tuned) -> tuple[list, dict[str, int] | None]:
    """The matrix entries to truncate (the plan's modules, in its order; else those of `roles`, default every block
    linear) and their planned ranks (None: no plan).

    Roles select as a LoRA adapts (:func:`~spectra.checkpoints.architectures.role_selected`, as train and extract
    do): ``k`` or ``v`` takes DeepSeek's ``kv_a`` and ``kv_b`` and GPT-2's ``c_attn``, whose truncation changes the
    keys and the values; pairing's own selection (an analysis's) would take neither."""
    from spectra.checkpoints.architectures import role_selected
    from spectra.checkpoints.roles import default_roles

    entries = [e for e in pairing.entries if e.kind == "matrix"]
    if plan is None:
        wanted = roles or default_roles(pairing.options.stacks)  # --stacks projector: role projector
        return [e for e in entries if role_selected(e.info.role, wanted, e.name)], None
    by_name = {e.name: e for e in entries}
    missing = [m.name for m in plan.modules if m.name not in by_name]
    if missing:
        raise ConfigError(f"the plan names module(s) absent from {base} × {tuned}: {', '.join(missing[:5])}. "
                          "Was it made from an analysis of this pair?")
    planned = {m.name: m.rank for m in plan.modules}
    return [by_name[n] for n in planned], planned


def _stored_experts(model, tuned, keys: list[str], config) -> dict[str, list[TensorSlice]]:
    """Model key (of `keys`) -> its experts' slices, where one stored 3-D checkpoint tensor loads into it.

    As placement reads them (:func:`~spectra.checkpoints.placement.split_sources`): expert e of a
    tensor stored as the model holds it (gpt-oss's (E, in, out)) is ``parameter[e]``; of one whose
    every expert transformers transposes on loading (Qwen3-VL-MoE's hub experts, (E, in, out) for
    the model's (E, out, in)) it is ``parameter[e]``'s transpose (``stored_transposed``). A key
    placement does not split per expert (a 3-D conv kernel) is left out.
    """
    params = dict(model.named_parameters())
    keys = [k for k in keys if k in params]  # not a buffer
    if not keys:
        return {}
    out = {}
    for parameter, sources in parameter_sources(model, tuned.names(), keys).items():
        try:
            out[parameter] = split_sources(tuned, parameter, tuple(params[parameter].shape), sources, config,
                                           label="fine-tune")
        except PlacementError:
            continue
    return out


def _fused_slices(model, tuned, keys: list[str], config) -> tuple[dict[str, tuple[str, torch.Tensor]], list[str]]:
    """Checkpoint tensor → (the parameter of `keys` transformers fuses it into on loading, its slice there), and the
    parameters of `keys` that several tensors load into but whose slices spectra cannot locate.

    Read from transformers' conversion table as a LoRA on fused experts is
    (:func:`~spectra.checkpoints.placement.split_sources`): per-expert (out, in) matrices stacked
    by expert and concatenated by rows in the order of the converter's source patterns
    (Mixtral's w1, w3 → gate_up_proj[e]). A parameter is located whole or not at all: every
    tensor loading into it has a slice of its own shape.
    """
    out, refused = {}, []
    if not keys:  # every parameter is one checkpoint tensor: no conversion table to read
        return out, refused
    params = dict(model.named_parameters())
    for parameter, sources in parameter_sources(model, tuned.names(), keys).items():
        shape = tuple(params[parameter].shape)
        try:
            split = split_sources(tuned, parameter, shape, sources, config, label="fine-tune")
        except PlacementError:  # a conversion spectra does not invert (or a 2-D parameter several tensors form)
            refused.append(parameter)
            continue
        weights = {s.tensor: (torch.empty(s.shape, device="meta"), s.conv1d, s.place) for s in split}
        places, unplaced = weight_places(weights, {parameter: params[parameter]})
        if unplaced or len(weights) != len(split):  # one tensor per slice, each of its own shape
            refused.append(parameter)
        else:
            out.update({tensor: (parameter, place) for tensor, place in places.items()})
    return out, refused


def _nothing_to_truncate(entries, plan, roles, base, tuned, model_class: str) -> str:
    """Why no target was found: nothing paired (of these roles; a plan names modules, not roles), or no module that
    paired has a place in the loaded model."""
    if not entries:
        of = ("in the plan" if plan is not None else f"of roles {', '.join(roles)}" if roles
              else "of a block linear's role")
        return f"nothing to truncate: no weight matrix {of} pairs between {base} and {tuned}."
    names = ", ".join(e.name for e in entries[:5]) + (", …" if len(entries) > 5 else "")
    which = ("the weight matrix that pairs" if len(entries) == 1
             else f"none of the {len(entries)} weight matrices that pair")
    return (f"nothing to truncate: {which} between {base} and {tuned} has "
            + ("no place" if len(entries) == 1 else "a place") + f" in the loaded {model_class} (no parameter of "
            f"its name, nor a slice of one spectra locates): {names}. Is the model loaded from {tuned}?")


def _unplaced_note(unplaced: list[str], refused: list[str], model_class: str, *, planned: bool) -> str:
    """The note naming the modules with no place in the loaded model: not truncated, they follow the non-targets."""
    return (f"{len(unplaced)} module(s) have no place in the loaded {model_class}: no parameter of their name, nor "
            "a slice of one that transformers' conversion table locates (a fusion on loading spectra does not invert"
            + (f", as for {', '.join(refused[:3])}" if refused else "")
            + ", or a slice of another shape); they are not truncated but follow the non-targets"
            + (" (the plan point: the base's, not their planned ranks)" if planned else "")
            + f": {', '.join(unplaced[:5])}" + (", …" if len(unplaced) > 5 else "") + ".")
