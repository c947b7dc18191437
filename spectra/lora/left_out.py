"""What TUNED changed that an adapter does not carry, and the notes that say so.

The adapter carries the LoRAs of the extracted matrices and the modules saved whole; at rank full it is lossless for
those alone. Anything else TUNED changed is left out: a matrix outside the roles, stacks or plan (an embedding, a
head, a router), a vector no LoRA holds (a norm, a bias, a scalar parameter such as CLIP's ``logit_scale``), a
tensor only in TUNED. :func:`_not_carried` finds them, comparing each other pair as stored where it can
(:func:`_same_values`; a tensor that is only the base rounded to TUNED's lower-precision storage is no change:
:func:`_rounded_to`) and testing a ΔW for a non-zero where it cannot (:func:`_entry_changed`);
:func:`_not_carried_notes` names them and the option that would carry each. ``ExtractResult.left_out``,
``left_out_vectors``, ``only_in_tuned``, ``storage_rounded`` and ``complete`` come from here.
"""

from __future__ import annotations

import math
import re

import torch

from spectra.checkpoints.adapter import unpaired_tensors
from spectra.checkpoints.architectures import ROLES, role_selected, stack_name, stack_selected
from spectra.checkpoints.names import is_bare_parameter, natural_key
from spectra.checkpoints.pairing import Pairing
from spectra.checkpoints.source import AdapterSource
from spectra.lora.saved_modules import _holding_modules


def _not_carried(pairing: Pairing, selected: list, save_names: list[str], *, cast: tuple[str, ...] = ()):
    """What TUNED changed that the adapter does not carry: (matrices, vectors), each a list of (name, entry) in
    natural order, and the tensors only in TUNED.

    The adapter carries the LoRAs of the `selected` matrices and the tensors saved whole (`save_names`, TUNED's
    names); at rank full it is lossless for those alone. Any other paired tensor that differs between the sides is
    left out: a matrix outside the roles, stacks or plan (an embedding, a head, a router), or a vector (a norm, a
    bias, a scalar parameter: CLIP's logit_scale), which no LoRA holds. A matrix of a resized vocabulary is left to
    :func:`~spectra.lora.extract._resized_vocabulary`'s note; its bias (BERT's ``cls.predictions.bias``) is a vector,
    changed where its shared entries are.

    An adapter TUNED also saves tensors whole that pair with no ΔW (:func:`~spectra.checkpoints.adapter.
    unpaired_tensors`): a trained bias (``bias="lora_only"``/``"all"``) that differs from the base's is a changed
    vector, and a module saved whole that the base lacks (a new classifier) is only in TUNED.

    A tensor TUNED stores in a lower precision than the base (a bf16 fine-tune of an fp32 base) whose values are
    exactly the base's rounded to that precision is a storage cast, not a change: it is left out of these lists and
    counted in the third item's place, ``rounded`` (names), for a note of its own. ``cast``: the entries
    :func:`storage_casts` already found so (targets left out for it), counted without reading them again.

    Cost: each other pair is read once as stored and compared element by element (:func:`_same_values`, one pass
    over memory-mapped data and no ΔW), a 3-D expert tensor whole; one stored in a lower precision in TUNED that
    differs is compared once more, with the base rounded to it; an entry that is only part of a stored tensor
    (some of its experts selected), stored in another layout on each side, or a module of an adapter TUNED, is
    loaded as a ΔW and tested for a non-zero; an adapter's trained biases are read once each.
    """
    carried = {e.name for e in selected}
    saved = set(save_names)
    rounded = []
    by_pair = _by_stored_pair(pairing)
    matrices, vectors = [], []
    for (base_tensor, tuned_tensor), group in by_pair.items():
        asked = [e for e in group if e.name not in carried and e.tuned_tensor not in saved
                 and not (e.added_rows and e.kind == "matrix")]  # a resized vocabulary's bias is a vector as any
        if not asked:
            continue
        if len(group) == 1 and group[0].name in cast:
            rounded.append(tuned_tensor)
            continue
        if len(asked) == len(group) and _stored_alike(pairing, base_tensor, tuned_tensor, group):
            base_value, tuned_value = pairing.base.read(base_tensor), pairing.tuned.read(tuned_tensor)
            if _same_values(base_value, tuned_value):
                continue
            if _rounded_to(base_value, tuned_value):
                rounded.append(tuned_tensor)
                continue
            # one stored tensor: the module's name, or the stored name of a 3-D tensor of experts
            changed = [(asked[0].name if len(group) == 1 else base_tensor.removesuffix(".weight"), asked[0])]
        else:
            changed = [(e.name, e) for e in asked if _entry_changed(pairing, e)]
        for name, e in changed:
            (matrices if e.kind == "matrix" else vectors).append((name, e))
    only_in_tuned = [n for n in pairing.only_in_tuned if n not in saved]
    if isinstance(pairing.tuned, AdapterSource):  # its biases and new modules saved whole
        for t in unpaired_tensors(pairing.tuned, pairing.base, pairing.config):
            if t.base_tensor is None:
                only_in_tuned.append(t.name)
            elif not _same_values(pairing.base.read(t.base_tensor), pairing.tuned.weights.read(t.key)):
                vectors.append((t.base_tensor, None))
    return (sorted(matrices, key=lambda x: natural_key(x[0])), sorted(vectors, key=lambda x: natural_key(x[0])),
            sorted(only_in_tuned, key=natural_key), sorted(rounded, key=natural_key))


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two stored tensors hold equal values (NaN never equals), compared in blocks of ≤ 1M elements where
    their dtypes differ (a bf16 base, an fp32 fine-tune that kept its values), so no up-cast copy is made whole."""
    if a.shape != b.shape:
        return False
    if a.dtype == b.dtype:
        return torch.equal(a, b)
    dtype = torch.promote_types(a.dtype, b.dtype)
    a, b = a.reshape(-1), b.reshape(-1)
    step = 1 << 20
    return all(torch.equal(a[i:i + step].to(dtype), b[i:i + step].to(dtype)) for i in range(0, a.numel(), step))


def _rounded_to(base: torch.Tensor, tuned: torch.Tensor) -> bool:
    """Whether `tuned`, stored in a lower precision than `base`, holds exactly `base` rounded to its dtype (a storage
    cast: an fp32 base saved as bf16), compared in blocks of ≤ 1M elements."""
    if (base.shape != tuned.shape or base.dtype == tuned.dtype or not tuned.is_floating_point()
            or torch.promote_types(base.dtype, tuned.dtype) != base.dtype):
        return False
    a, b = base.reshape(-1), tuned.reshape(-1)
    step = 1 << 20
    return all(torch.equal(a[i:i + step].to(tuned.dtype), b[i:i + step]) for i in range(0, a.numel(), step))


def _by_stored_pair(pairing: Pairing) -> dict[tuple, list]:
    """(base tensor, tuned tensor) → its entries (one, or the experts of a 3-D tensor)."""
    by_pair: dict[tuple, list] = {}
    for e in pairing.entries:
        by_pair.setdefault((e.base_tensor, e.tuned_tensor), []).append(e)
    return by_pair


def _stored_alike(pairing: Pairing, base_tensor: str, tuned_tensor: str | None, group: list) -> bool:
    """Whether a stored pair can be compared as stored: TUNED holds the tensor, in BASE's layout and shape."""
    return (tuned_tensor is not None and all(e.tuned_conv1d is None for e in group)
            and pairing.base.info(base_tensor).shape == pairing.tuned.info(tuned_tensor).shape)


def storage_casts(pairing: Pairing, entries: list) -> tuple[list[str], list[str]]:
    """The names of `entries` whose stored TUNED tensor is exactly BASE's rounded to TUNED's lower precision (an fp32
    base saved as a bf16 fine-tune that left the module alone): ΔW is rounding there, not fine-tuning; and of those
    read on the way that hold BASE's very values (ΔW = 0). Read only where the two sides' dtypes say it may be so; one
    stored tensor per entry, in one layout on both sides (as :func:`_not_carried` compares them); never for an
    adapter TUNED."""
    if isinstance(pairing.tuned, AdapterSource):
        return [], []
    by_pair = _by_stored_pair(pairing)
    cast, same = [], []
    for e in entries:
        group = by_pair[(e.base_tensor, e.tuned_tensor)]
        if len(group) != 1 or not _stored_alike(pairing, e.base_tensor, e.tuned_tensor, group):
            continue
        b, t = pairing.base.info(e.base_tensor).dtype, pairing.tuned.info(e.tuned_tensor).dtype
        if b == t or torch.promote_types(b, t) != b:  # TUNED not stored in a lower precision: no cast
            continue
        base, tuned = pairing.base.read(e.base_tensor), pairing.tuned.read(e.tuned_tensor)
        if _same_values(base, tuned):  # ΔW = 0: left out as unchanged
            same.append(e.name)
        elif _rounded_to(base, tuned):
            cast.append(e.name)
    return cast, same


def _entry_changed(pairing: Pairing, entry) -> bool:
    """Whether one entry's ΔW is non-zero (a NaN/Inf in it counts as a change: extract does not read it)."""
    from spectra.errors import NonFiniteWeightError

    try:
        records = pairing.load(entry)
    except NonFiniteWeightError:
        return True
    return not records or any(r.delta is None or bool(r.delta.any()) for r in records)


def _bare_parameter(entry) -> bool:
    """Whether a matrix entry is a parameter of its own, no layer's weight: a ViT's position table
    (``embeddings.position_embeddings``, stored (1, N, d)); not a Linear's or a convolution's ``….weight``, not one
    expert's slice of a stored 3-D tensor, not an adapter's module."""
    return (entry.kind == "matrix" and entry.adapter is None
            and is_bare_parameter(entry.base_tensor, expert=entry.expert_index))


def _bare_advice(bare: list[str], pairing: Pairing, merged: str) -> str:
    """What carries the changed parameters `bare` (:func:`_bare_parameter`), which no LoRA adapts: saving their
    module whole where it holds them alone, else copying them from TUNED (a module holding other modules, the
    model itself: modules_to_save would save all of it, or cannot save it)."""
    holders = _holding_modules(pairing.base.names())
    copied = [n for n in bare if "." not in n or n.rpartition(".")[0] in holders]
    saved = [n for n in bare if n not in copied]
    owners = list(dict.fromkeys(n.rpartition(".")[0] for n in copied if "." in n))
    words = []
    if saved:
        words.append(f"{', '.join(saved)} {'is a parameter' if len(saved) == 1 else 'are parameters'}, no layer's "
                     "weight, which no LoRA adapts: save "
                     f"{'its module' if len(saved) == 1 else 'their modules'} whole (modules_to_save="
                     f"{','.join(dict.fromkeys(n.rpartition('.')[0].rpartition('.')[2] for n in saved))}){merged}.")
    if copied:
        where = (f"of {'a module' if len(owners) == 1 else 'modules'} holding other modules ({', '.join(owners)}, "
                 "which modules_to_save would save whole)" if owners else "of the model itself")
        words.append(f"{', '.join(copied)} {'is a parameter' if len(copied) == 1 else 'are parameters'} {where}, no "
                     "layer's weight, which no LoRA adapts: copy "
                     f"{'it' if len(copied) == 1 else 'them'} from TUNED onto the loaded model.")
    return " ".join(words)


def _params_under(pairing: Pairing, modules) -> int:
    """The parameters the base holds under `modules` (what saving them whole puts in the adapter)."""
    modules = tuple(m + "." for m in modules)
    return sum(math.prod(pairing.base.info(t).shape) for t in pairing.base.names() if t.startswith(modules)) \
        if modules else 0


def _save_entries(free: list[str], pairing: Pairing) -> tuple[list[str], list[str]]:
    """(the ``modules_to_save`` entries that save the modules `free` whole, the modules they save).

    An entry matches a module by its name or its end at a dot (:func:`~spectra.lora.saved_modules._modules_to_save`),
    so a last name (``q_proj``) saves every module of that name: it is advised where those are all in `free`, and
    the full names otherwise (``model.layers.0.self_attn.q_proj``), which save those modules alone and leave the
    other layers' modules to their LoRA."""
    modules = _holding_modules(pairing.base.names()) | {n.rpartition(".")[0] for n in pairing.base.names()}
    entries, saved = [], []
    for leaf in dict.fromkeys(m.rpartition(".")[2] for m in free):
        named = sorted((m for m in modules if m.rpartition(".")[2] == leaf), key=natural_key)
        mine = [m for m in free if m.rpartition(".")[2] == leaf]
        if set(named) <= set(mine):
            entries.append(leaf)
            saved += named
        else:
            entries += mine
            saved += mine
    return entries, saved


def _not_carried_notes(pairing: Pairing, matrices: list, vectors: list, only_in_tuned: list[str], selected: list, *,
                       unchanged: frozenset[str] = frozenset(), roles, stacks, planned: bool,
                       full: bool, rank: int | None = None, plan=None) -> list[str]:
    """The notes naming what :func:`_not_carried` found (counted, the first few named) and what would carry it.

    ``unchanged``: the names of the `selected` entries extract left out of the adapter as unchanged (ΔW = 0). The
    adapted modules are the others: a changed bias of an unchanged module is advised saved whole (modules_to_save),
    not called a bias of an adapted module. A module to save is advised by its last name (``q_proj``) where every
    module of that name is one to save, else by its full name (``model.layers.0.self_attn.q_proj``): a last name
    saves every layer's module whole, whose LoRA the adapter would then lose (extract refuses a module adapted and
    saved whole; an unchanged one inside a saved module is left out, as it holds no LoRA). The advice says what
    saving costs: the parameters of the modules it saves whole, their weights included.

    The changed matrices outside the roles, stacks or plan are advised the exact option that adapts them, and its
    cost: with a uniform ``rank`` (or ``full``), the roles (``roles=…``, the ones asked and theirs) and the LoRA
    parameters on them at that rank (r·(d_in + d_out) each, r at most min(d_in, d_out); a 3-D tensor of experts
    left out whole counts every expert), beside the adapter's own; with a ``plan``
    (:class:`~spectra.ranks.plan.RankPlan`), the ``spectra recommend --roles …`` that plans them (the plan's roles
    and theirs), the share of the whole update's ‖ΔW‖_F² they hold and the parameters at the ranks the plan's energy
    target gives them (its ``left_out``), beside the plan's; and the modules that save them whole, with what that
    costs.
    """
    def named(items: list[str]) -> str:
        return ", ".join(items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")

    # extract saves modules whole from a checkpoint TUNED only (:func:`~spectra.lora.saved_modules._modules_to_save`)
    merged = (" from TUNED merged into a checkpoint (PeftModel.from_pretrained(…).merge_and_unload()"
              ".save_pretrained(DIR); extract saves modules whole from a checkpoint only)"
              if isinstance(pairing.tuned, AdapterSource) else "")

    notes = []
    lead = "rank full is not lossless here: " if full else ""
    if matrices:
        outside = "plan" if planned else "roles (" + ", ".join(roles) + ")" + (" and stacks" if stacks else "")
        # a matrix that is a parameter of its own, no layer's weight (a ViT's position table (1, N, d), measured as
        # N × d): no LoRA module adapts it, so no role, stack or plan carries it (below)
        bare = [n for n, e in matrices if _bare_parameter(e)]
        layers = [(n, e) for n, e in matrices if n not in bare]
        plain = [n for n, e in layers if e.info.expert is None]  # a module PEFT can save whole (no expert tensor)
        asked = _plan_roles(plan) if planned else tuple(roles)  # a plan's own roles, where the plan is given
        new_roles = [r for r in ROLES if r not in asked and any(e.info.role == r for _, e in layers)]
        new_stacks = sorted({stack_name(e.info.stack) for _, e in layers
                             if stacks is not None and role_selected(e.info.role, roles, e.name)
                             and not stack_selected(e.info.stack, stacks)})
        if not layers:
            fix = []
        elif planned and plan is None:  # the plan is not known here: its roles neither
            fix = [f"plan them (spectra recommend --roles …,{','.join(new_roles)})"]
        elif planned:
            fix = [_plan_fix(plan, asked, new_roles, layers, pairing)]
        else:
            fix = ([f"add their roles (roles={','.join([*roles, *new_roles])})"] if new_roles else []) + (
                [f"their stacks (stacks={','.join([*stacks, *new_stacks])})"] if new_stacks else [])
            if fix and (full or rank is not None):  # inside the last option's parentheses
                fix[-1] = (fix[-1].removesuffix(")") + "; "
                           + _lora_cost(layers, selected, unchanged, pairing, None if full else rank) + ")")
        if plain:
            entries, saved_whole = _save_entries(plain, pairing)
            # experts' slices of a fused tensor have no module to save: where some are among them, the option
            # carries the others only, and says so (it had read as carrying all: 2 routers of 14 matrices)
            which = "them" if len(plain) == len(layers) else f"the {len(plain)} of them held in modules"
            rest = len(layers) - len(plain)
            fix.append(f"save {which} whole (modules_to_save={','.join(entries)}; {len(saved_whole)} module(s), "
                       f"{_params_under(pairing, saved_whole):,} parameters with their weights){merged}"
                       + ("" if not rest else
                          f", the other {rest} being experts' slices of a fused tensor, which no module saves: "
                          "only their roles carry them"))
        notes.append(f"{lead}the adapter leaves out {len(matrices)} changed matri{'x' if len(matrices) == 1 else 'ces'}"
                     f" outside the {outside}: "
                     + named([f"{n} ({e.info.role})" for n, e in matrices])
                     + "; their fine-tuning is not in it."
                     + (" To carry them, " + " or ".join(fix) if fix else "")
                     + (" " + _bare_advice(bare, pairing, merged) if bare else ""))
        lead = ""
    if vectors:
        adapted = {e.name for e in selected if e.name not in unchanged}
        # a parameter of the model itself (CLIP's logit_scale), of no submodule: PEFT saves submodules only
        own = [n for n, _ in vectors if "." not in n]
        # a parameter of a module that holds others (OWL-ViT's owlvit.logit_scale, of the whole OwlViTModel; an
        # attention's own vector beside its projections): saving that module whole would save them all
        holders = _holding_modules(pairing.base.names())
        held = [n for n, _ in vectors if n not in own and n.rpartition(".")[0] in holders]
        # a bias of a module the adapter adapts: PEFT adapts a module or saves it whole, not both
        owned = [n for n, _ in vectors if n not in own and n not in held and (n.rpartition(".")[0] in adapted
                 or any(a.startswith(n.rpartition(".")[0] + ".") for a in adapted))]
        free = list(dict.fromkeys(n.rpartition(".")[0] for n, _ in vectors
                                  if n not in owned and n not in own and n not in held))
        owners = list(dict.fromkeys(n.rpartition(".")[0] for n in held))
        held_params = _params_under(pairing, owners)
        entries, saved_whole = _save_entries(free, pairing)
        carried = sum(1 for n, _ in vectors if n.rpartition(".")[0] in free)
        fix = ([f"To carry them, save their modules whole (modules_to_save={','.join(entries)}){merged}: "
                f"{len(saved_whole)} module(s), {_params_under(pairing, saved_whole):,} parameters with their "
                f"weights, to carry {carried} changed vector(s)"] if free else []) + (
            [f"{len(owned)} {'is a bias' if len(owned) == 1 else 'are biases'} of adapted modules, which no LoRA "
             "carries"] if owned else []) + (
            [f"{named(own)} {'is a parameter' if len(own) == 1 else 'are parameters'} of the model itself, of no "
             "module, which no PEFT adapter carries (modules_to_save saves modules): copy "
             f"{'it' if len(own) == 1 else 'them'} from TUNED onto the loaded model"] if own else []) + (
            [f"{named(held)} {'is a parameter' if len(held) == 1 else 'are parameters'} of "
             f"{'a module' if len(owners) == 1 else 'modules'} holding other modules ({named(owners)}: "
             f"{held_params:,} parameters, which modules_to_save would save whole): copy "
             f"{'it' if len(held) == 1 else 'them'} from TUNED onto the loaded model"] if held else [])
        scalars = ", scalars" if any(e is not None and not e.shape for _, e in vectors) else ""
        notes.append(f"{lead}the adapter leaves out {len(vectors)} changed vector(s) (norms, biases{scalars}: a LoRA "
                     f"holds matrices only): {named([n for n, _ in vectors])}. " + "; ".join(fix))
        lead = ""
    if only_in_tuned:
        modules = list(dict.fromkeys(n.rpartition(".")[0] for n in only_in_tuned))
        # a layer or expert BASE lacks (TUNED has 3 layers to its 2): BASE's model, which the adapter loads onto,
        # has no place for it, so modules_to_save cannot carry it (the advice was refused when followed)
        def indexless(module: str) -> str:  # model.layers.2.mlp -> model.layers.#.mlp
            return re.sub(r"\.\d+(?=\.|$)", ".#", module)

        base_modules = _holding_modules(pairing.base.names()) | {n.rpartition(".")[0] for n in pairing.base.names()}
        shapes = {indexless(m) for m in base_modules}
        # a module BASE has, with a tensor it lacks (a bias of TUNED's attention_bias=True): BASE's config builds the
        # module without it, so saving the module whole cannot carry it either
        extra = [n for n in only_in_tuned if n.rpartition(".")[0] in base_modules]
        beyond = [m for m in modules if m not in base_modules and indexless(m) != m and indexless(m) in shapes]
        carried = [m for m in modules if m not in beyond and m not in base_modules]
        entries, _ = _save_entries(carried, pairing)
        notes.append(f"{lead}{len(only_in_tuned)} tensor(s) only in TUNED (no base tensor to take a ΔW against) are "
                     f"not in the adapter: {named(only_in_tuned)}."
                     + (f" To carry them, save their modules whole (modules_to_save={','.join(entries)}){merged}."
                        if carried else "")
                     + ((" They are" if len(extra) == len(only_in_tuned) else f" {len(extra)} ({named(extra)}) are")
                        + " tensors of modules BASE has, built there without them: TUNED's config differs from "
                        "BASE's (a bias added, as attention_bias does?), and no adapter loaded onto BASE's model can "
                        "carry them." if extra else "")
                     + (f" {len(beyond)} module(s) are of layers or experts BASE does not have ({named(beyond)}): "
                        "no adapter loaded onto BASE's model can carry them; is TUNED a fine-tune of BASE, or "
                        "another model (`spectra pairs BASE TUNED` lists both)?" if beyond else ""))
    return notes


def _plan_roles(plan) -> tuple[str, ...]:
    """The roles a plan was made for (its policy's, else those of the modules it plans), in :data:`ROLES` order;
    empty where the plan is not known."""
    if plan is None:
        return ()
    if plan.policy.roles is not None:
        return tuple(plan.policy.roles)
    planned = {m.role for m in plan.modules}
    return tuple(r for r in ROLES if r in planned)


def _lora_params(entry, name: str, rank: int | None, pairing: Pairing) -> int:
    """The LoRA parameters PEFT trains on one matrix entry at ``rank`` (None: full, min(d_in, d_out)): r·(d_in +
    d_out), for every expert of a 3-D tensor left out whole (``name`` its stored name, not the entry's)."""
    shape = entry.shape[-2:]
    r = min(shape) if rank is None else min(rank, min(shape))
    experts = (pairing.base.info(entry.base_tensor).shape[0]
               if name != entry.name and entry.expert_index is not None else 1)
    return r * sum(shape) * experts


def _lora_cost(layers: list, selected: list, unchanged: frozenset[str], pairing: Pairing, rank: int | None) -> str:
    """``"LoRAs on these 2 matrices at rank 8 add 12,288 parameters to the adapter's 98,304"``."""
    added = sum(_lora_params(e, n, rank, pairing) for n, e in layers)
    held = sum(_lora_params(e, e.name, rank, pairing) for e in selected if e.name not in unchanged)
    at = "full rank (min(d_in, d_out) each)" if rank is None else f"rank {rank}"
    return (f"LoRAs on these {len(layers)} matri{'x' if len(layers) == 1 else 'ces'} at {at} add {added:,} "
            f"parameters to the adapter's {held:,}")


def _plan_fix(plan, asked: tuple[str, ...], new_roles: list[str], layers: list, pairing: Pairing) -> str:
    """How to plan the changed matrices `layers` a plan leaves out: the recommend options that plan those of roles
    the plan was not made for (the plan's roles and theirs, its stacks), and why it left out the others (noise, a
    pattern: its ``left_out`` reason); with the share of the whole update's ‖ΔW‖_F² they hold and the parameters at
    the ranks the plan's energy target gives them (its ``left_out``), beside the plan's own."""
    recorded = {m.name: m for m in plan.left_out}
    known = [(n, e, recorded[n]) for n, e in layers if n in recorded]
    whole = plan.whole_fro2
    cost = ""
    if known and whole > 0:
        share = sum(m.fro_norm ** 2 for _, _, m in known) / whole
        params = sum(_lora_params(e, n, m.rank, pairing) for n, e, m in known if m.rank)
        cost = (f"; {'they hold' if len(known) == len(layers) else f'{len(known)} of them hold'} {share:.1%} of the "
                f"whole update's ‖ΔW‖_F², and at the ranks the plan's energy target gives them "
                f"{params:,} parameters, beside the plan's {plan.total_params:,}")
    by_role = [n for n, e in layers if e.info.role in new_roles]
    others = [n for n, e in layers if e.info.role not in new_roles]
    parts = []
    if by_role:
        roles = [r for r in ROLES if r in asked or r in new_roles]
        stacks = f" --stacks {','.join(plan.policy.stacks)}" if plan.policy.stacks else ""
        parts.append(f"spectra recommend --roles {','.join(roles)}{stacks}, the plan's other options as they were"
                     + (f", for the {len(by_role)} of roles it was not made for" if others else ""))
    if others:  # their roles are the plan's: it left them out for its own reasons (noise, a pattern)
        reason = next((f"{n}: {recorded[n].reason}" for n in others if n in recorded), None)
        parts.append(f"the plan left {'the other' if by_role else 'all'} {len(others)} out for its own reasons"
                     + (f", e.g. {reason}" if reason else ""))
    return f"plan them ({'; '.join(parts)}{cost})"
