"""ΔW → a ready PEFT LoRA adapter by truncated SVD (Eckart–Young).

For each targeted module, ΔW ≈ U_r Σ_r V_rᵀ (the best rank-r approximation in
Frobenius norm, Eckart & Young 1936) is written as PEFT's ``s·B@A`` with the √σ
split: ``B = U_r Σ_r^{1/2} / √s`` (out, r) and ``A = Σ_r^{1/2} V_rᵀ / √s`` (r, in), where
``s = α/r`` (LoRA, arXiv:2106.09685) or ``α/√r`` (rsLoRA, arXiv:2312.03732). Both
factors then have the same scale, which is what training from this initialisation
wants. The Frobenius error of each extracted update is measured and must equal the
Eckart–Young tail √(Σ_{i>r} σᵢ²).

The adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<module>.lora_A.weight`` …) is written to a temporary sibling and
renamed when complete.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import warnings
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.checkpoints.adapter import PEFT_PREFIX
from spectra.checkpoints.architectures import (missing_stacks, module_info, parse_stacks, role_selected,
                                                stack_selected)
from spectra.checkpoints.names import bare_parameters_why, is_bare_parameter, natural_key
from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.checkpoints.relatedness import relative_size, unrelated_note
from spectra.checkpoints.source import AdapterSource, CheckpointSource
from spectra.checkpoints.targets import architecture, meta_model, model_targets, owning_modules, resolve_name
from spectra.errors import ConfigError, PeftConfigWarning
from spectra.files import refuse_replacing_others, staged_directory
from spectra.linalg.svd import CONVERGED_TOL, full_svd, randomized_svd
from spectra.lora.left_out import _entry_changed, _not_carried, _not_carried_notes, storage_casts
from spectra.lora.parameter_targets import (_LEAVE_OUT, _parameter_factors, _parameter_keys, _peft_shape,
                                            _peft_transposes, _unconverted_parameters)
from spectra.lora.saved_modules import (_also_wrapped, _modules_to_save, _saved_names, _saved_tensors, _task_type,
                                        saved_num_labels, saved_whole_notes, with_planned)
from spectra.scaling import rank_scale
from spectra.workers import split_workers, thread_pool


@dataclass(frozen=True)
class ModuleExtraction:
    """What was written for one module, with its error against ΔW."""

    name: str
    rank: int
    alpha: float
    # with calibration data X (in, N), each norm is taken of M·X / √N (analyze's rms_output_change): see `calibration`
    fro_norm: float  # ‖ΔW‖_F
    error: float  # ‖ΔW − s·B@A‖_F, measured
    tail: float  # Eckart–Young tail √(Σ_{i>r} σᵢ²); equals `error` up to round-off (with calibration: up to O(ε))
    method: str
    relative_size: float | None = None  # ‖ΔW‖_F / ‖W_base‖_F, in Frobenius norm with calibration too

    @property
    def captured_energy(self) -> float:
        return 1.0 - (self.error / self.fro_norm) ** 2 if self.fro_norm else 1.0


@dataclass
class ExtractResult:
    path: Path
    modules: list[ModuleExtraction]
    modules_to_save: list[str]
    config: dict[str, Any] = field(default_factory=dict)
    model_class: str | None = None  # the class whose module names the keys use (None: the checkpoint's names)
    # what the adapter holds only in part (also PeftConfigWarnings), then what collecting the calibration decided
    # (its Calibration.notes: texts cut to the model's positions)
    notes: list[str] = field(default_factory=list)
    # TUNED's vocabulary, where the adapter saves an embedding or head of a resized vocabulary whole: the model is
    # resized to it (resize_token_embeddings) before the adapter loads. None: it loads onto the base as it is
    vocab_size: int | None = None
    # targeted modules left out of the adapter because their ΔW is 0 (as the model class names them)
    unchanged: list[str] = field(default_factory=list)
    # what TUNED changed that the adapter does not carry (checkpoint names, natural order; each also said in `notes`):
    # matrices outside the roles, stacks or plan; vectors (norms, biases, scalar parameters such as CLIP's
    # logit_scale), which no LoRA holds; tensors only in TUNED
    left_out: list[str] = field(default_factory=list)
    left_out_vectors: list[str] = field(default_factory=list)
    only_in_tuned: list[str] = field(default_factory=list)
    # whether every change of TUNED is in the adapter (nothing above, no resized vocabulary's rows outside it): at
    # rank "full", PEFT's merge is then TUNED, a lossless conversion. A tensor TUNED holds as the base's values
    # rounded to its lower-precision storage (fp32 base, bf16 fine-tune) is no change: a note counts those, which
    # the merge gives back to within that rounding
    complete: bool = True
    # those tensors (outside the adapter, equal to the base's values rounded to TUNED's storage dtype)
    storage_rounded: list[str] = field(default_factory=list)
    # the LoRA modules PEFT creates loading the adapter (the modules it wraps and the parameters it adapts), which
    # `modules` outnumbers where experts are held in fused parameters: each expert's matrix is a row of `modules`,
    # and all experts of a parameter (Qwen2-MoE's mlp.experts.gate_up_proj) are one PEFT module
    peft_modules: int | None = None
    # TUNED's number of classes, where a head saved whole has TUNED's shape and the model built from the base's
    # config another (3 labels against 2): the model is built with num_labels= it (from_pretrained(BASE,
    # num_labels=…)) before the adapter loads. None: BASE's config as it is
    num_labels: int | None = None


def extract_adapter(base, tuned, plan_or_rank, out_dir: str | os.PathLike, *, roles: tuple[str, ...] | None = None,
                    stacks: tuple[str, ...] | None = None, alpha: float | None = None, rslora: bool = False,
                    modules_to_save: tuple[str, ...] = (),
                    full_below: int = 1024, seed: int = 0, overwrite: bool = False,
                    progress: bool = True, calibration=None, device: str = "cpu",
                    model_class: str | None = None, workers: int | None = None) -> ExtractResult:
    """Write a PEFT adapter whose merge approximates TUNED − BASE at the planned ranks.

    Parameters
    ----------
    base, tuned : str or path
        Pretrained and fine-tuned checkpoints (any form ``open_checkpoint`` accepts).
    plan_or_rank : RankPlan, path to a plan JSON, int, or "full"
        Per-module ranks and alphas from ``spectra recommend``, one rank for every
        targeted module, or ``"full"``: each module at rank min(d_in, d_out), lossless for
        what the adapter holds: the whole fine-tune when it holds every changed tensor
        (``ExtractResult.complete``); else the notes name what it leaves out. A plan's
        ``modules_to_save`` (a classifier's head, which PEFT trains in full for its task type)
        are saved whole, as ``modules_to_save`` saves them.
    out_dir : path
        Adapter directory to create (refused if it exists, unless ``overwrite``; even then a
        folder holding a file that ``extract`` does not write is refused and left intact).
    roles : tuple of str, optional
        With a uniform rank: roles to target (default q, k, v, o, gate, up, down). A fused
        module (GPT-2 ``c_attn``) is targeted when any of its projections' roles is. An MoE's
        router (role ``other``: PhiMoE's, Mixtral's, DeepSeek-V3's), which no LoRA module can run, is
        adapted through its weight (``target_parameters``).
    stacks : tuple of str, optional
        With a uniform rank: stacks to target with the roles (``language``, ``vision``, ``encoder`` …:
        ``architectures.STACK_NAMES``; default every stack). ``roles=("q", "v"), stacks=("language",)`` adapts
        the language model's q and v and no vision tower's; the adapter's ``target_modules`` are full module
        names, so PEFT wraps those alone. A plan names its modules: plan stacks with ``spectra recommend``.
    alpha : float, optional
        With a uniform rank: ``lora_alpha`` (default 2·rank, or 2·√rank… i.e. s = 2).
    rslora : bool
        With a uniform rank: use rsLoRA scaling α/√r.
    modules_to_save : tuple of str
        Modules copied whole from TUNED (e.g. a classification head or resized
        embeddings), matched as name suffixes (``classifier`` matches ``classifier``), and
        saved as the module the model loads them into, whatever its type (an MoE's router
        ``block_sparse_moe.gate``: PhiMoE's ``mlp.router``, Mixtral's ``mlp.gate``). The adapter names each by its
        full name; PEFT reads an entry as the end of any module's name, not at a dot, so a module it would wrap
        too (OWL-ViT's ``owlvit.text_model.final_layer_norm`` for ``layer_norm``, DistilBERT's ``pre_classifier``
        for the ``classifier`` PEFT's ``SEQ_CLS`` adds) is saved whole as well, from TUNED, with a note
        (:func:`_also_wrapped`); else PEFT refused to load the adapter. A module is saved with every tensor
        under it, its children's too (RoBERTa's ``classifier``: ``dense`` and ``out_proj``), as PEFT loads it;
        a LoRA target inside a saved module is refused (:func:`_saved_tensors`), unless its ΔW is 0: it is then
        left out as unchanged (``model.layers.0.self_attn.q_proj`` saves that module alone, for its changed bias,
        and q's LoRA stays on the other layers).
    full_below : int
        Exact SVD when min(out, in) ≤ this, else the randomized block Krylov top-r,
        run until its values converge to 1e-4.
    calibration : Calibration, str or path, optional
        Calibration data (a file is run through the base first; see
        :func:`spectra.calibration.collect_calibration`): each module then gets the
        data-optimal rank-r update, best in ‖(ΔW − ΔW_r)X‖_F on those inputs rather than in
        ‖ΔW − ΔW_r‖_F (SVD-LLM, arXiv:2403.07378), and its ``fro_norm``/``error``/``tail`` are
        measured in that norm per token, ‖·X‖_F/√N = ‖·C^{1/2}‖_F, as ``spectra analyze`` measures
        ``rms_output_change``: ``fro_norm`` is that, ``tail`` the tail of analyze's activation
        spectrum beyond r. The calibration's ridge ε regularises the truncation only (the SVD of
        ΔW·C_ε^{1/2}), so ``error`` ≥ ``tail``, equal up to O(ε).
    device : str, default "cpu"
        Where ΔW and its decomposition live (``cuda``, ``cuda:1``); the adapter is written
        from the CPU.
    model_class : str, optional
        The transformers class the adapter will be loaded onto (``LlamaForCausalLM``): its
        module names are the adapter's keys. Default: the base's class (an adapter is applied
        to the base), unless it lacks a module the adapter needs and the tuned checkpoint's
        class has them all (a classification head saved whole from a fine-tune of a bare
        base); see :func:`_adapter_model`.
    workers : int, optional
        Modules decomposed at once, each on its own thread with (torch threads ÷ workers)
        threads; default one per torch thread up to 4 on the CPU, 1 on a GPU (as
        ``spectra analyze``). The adapter does not depend on it beyond floating-point
        rounding (GEMMs split differently over threads; ~4e-6 relative in B·A on a
        TinyLlama-shaped pair, inside the randomized path's tolerance).

    Returns
    -------
    ExtractResult
        Per-module rank, α, ‖ΔW‖_F, measured error and Eckart–Young tail; ``notes``: what the
        adapter holds only in part (each also a :class:`~spectra.errors.PeftConfigWarning`),
        what TUNED changed that it does not hold (``left_out``, ``left_out_vectors``,
        ``only_in_tuned``: a changed embedding or head outside the roles, norms and biases),
        then the calibration's own (``Calibration.notes``, e.g. its texts cut to the model's
        positions).

    Raises
    ------
    ConfigError
        A plan naming modules absent from the base, a rank above min(d_in, d_out), an
        output directory that exists, nothing to extract, a ``model_class`` that cannot be
        built from the checkpoint's config, a module to save that the model does not hold as
        stored (an expert's ``w1``, fused into ``gate_up_proj`` on loading).
    """
    import tqdm

    out_dir = Path(out_dir)
    refuse_replacing_others(out_dir, command="extract", overwrite=overwrite, option="out_dir")  # before the work
    targets, use_rslora, plan = _targets(plan_or_rank, alpha, rslora)
    stacks = parse_stacks(stacks)
    if targets is not None and stacks is not None:
        raise ConfigError("stacks go with a uniform rank; a plan names its modules, so they would be ignored. Plan "
                          "the stacks with `spectra recommend --stacks`, or extract with a rank.")
    n_workers, threads = split_workers(workers, device)  # checked before any work starts
    # vectors too, to name the changed ones the adapter leaves out (:func:`_not_carried`); it selects matrices only
    # with the norm of each W_base that its update is measured against (norms)
    pairing = Pairing(base, tuned, PairingOptions(split_fused=False, vectors=True, device=device, norms=True))
    lacking = missing_stacks(stacks, {e.info.stack for e in pairing.entries if e.kind == "matrix"})
    selected = _select(pairing, targets, roles if targets is None else None, stacks)
    if not selected and targets is None:
        _refuse_bare_parameters(pairing, roles, stacks)
    if not selected:
        raise ConfigError("nothing to extract: no module of the pair matches the plan or roles "
                          f"({', '.join(_roles_used(roles, stacks))})"
                          + (f" of the stacks {', '.join(stacks)}" if stacks is not None else "")
                          + "; widen --roles or --stacks (`spectra pairs BASE TUNED` lists each module's role and "
                          "stack).")
    if plan is not None:
        plan.check_base(pairing.base)
    modules_to_save = with_planned(modules_to_save, plan, pairing)  # a classifier's head, which PEFT saves whole
    # TUNED holding BASE's values rounded to its storage dtype (an fp32 BASE, a bf16 fine-tune that left the module
    # alone): ΔW is rounding, whose LoRA would be noise; left out, and named with the other such tensors below.
    # Refused where every target is that or BASE's very values (nothing would be left but zeros)
    cast, same = storage_casts(pairing, selected)
    if cast and len(cast) + len(same) == len(selected) and not modules_to_save:
        held = ("exactly BASE's values rounded to TUNED's storage dtype" if not same else
                f"exactly BASE's values ({len(same)}) or them rounded to TUNED's storage dtype ({len(cast)})")
        raise ConfigError(f"every targeted module ({len(selected)}) holds in TUNED {held}: the fine-tune changed "
                          "none of them, and the adapter would hold rounding only. Check that TUNED is the fine-tune "
                          "(an fp32 BASE saved in bf16 looks like this), or widen --roles.")
    cast = cast if len(cast) < len(selected) else []  # all, with modules saved whole: kept (PEFT needs a target)
    selected = [e for e in selected if e.name not in cast]
    saved_modules, save_names = _modules_to_save(pairing, modules_to_save)  # save_names: until the model is known
    vocabulary_notes, vocab_size = _resized_vocabulary(pairing, selected, saved_modules)  # may refuse: before work
    model_class, model = _adapter_model(pairing, model_class, selected, saved_modules)  # None: no config.json
    model_names = _model_names(selected, model, model_class)  # checkpoint module name -> the model's
    refused = _peft_refused(selected, model, pairing)  # entry name -> why PEFT puts no LoRA there
    if refused:
        selected = _without_refused(selected, refused, pairing, roles, stacks, planned=plan is not None)
    ranks_of = {}  # every module's (rank, alpha, scaling s), checked before any work starts
    for entry in selected:
        rank, module_alpha = targets[entry.name] if targets is not None else (plan_or_rank, None)
        if rank == "full":
            rank = min(entry.shape)
        if module_alpha is None:
            module_alpha = alpha if alpha is not None else 2.0 * rank_scale(rank, use_rslora)  # s = 2
        if rank > min(entry.shape):
            raise ConfigError(f"rank {rank} for {entry.name} exceeds min(d_in, d_out) = {min(entry.shape)} of its "
                              f"{entry.shape[0]}×{entry.shape[1]} weight; lower it.")
        ranks_of[entry.name] = (rank, module_alpha, module_alpha / rank_scale(rank, use_rslora))
    on_parameters = _unconverted_parameters(selected, model_names, pairing, model,  # entry name -> its slice
                                           use_rslora=use_rslora,
                                           settings={n: (r, a) for n, (r, a, _) in ranks_of.items()},
                                           planned=plan is not None)
    saved_names = _saved_names(saved_modules, model, model_class)
    # a target in a module saved whole whose ΔW is 0 holds no LoRA (left out as unchanged, as after the
    # decomposition), so it clashes with nothing: saving layer 0's unchanged q_proj by its full name keeps q's LoRA
    # on the other layers
    unchanged_saved = _unchanged_in_saved(selected, model_names, on_parameters, saved_names, pairing)
    if unchanged_saved and len(unchanged_saved) < len(selected):  # else kept: PEFT needs a target
        selected = [e for e in selected if e.name not in unchanged_saved]
    else:
        unchanged_saved = []
    lora_targets = {*(model_names[e.name] for e in selected),
                    *(place.parameter for place, _ in on_parameters.values())}
    saved_keys = _saved_tensors(saved_names, pairing, model, model_class, lora_targets,  # adapter key -> TUNED's
                                modules_to_save)
    save_names = list(saved_keys.values())
    # the modules PEFT wraps beside them (their names end with a saved one's): saved too, or PEFT fails to load
    also_saved, also_keys = _also_wrapped(saved_names, pairing, model, model_class, lora_targets, modules_to_save)
    save_names = save_names + list(also_keys.values())
    # a head saved from a fine-tune of another class count loads onto a model built with TUNED's num_labels
    num_labels, head_notes = saved_num_labels(saved_keys | also_keys, pairing, model_class,
                                              frozenset(e.tuned_tensor for e in pairing.entries if e.added_rows))
    saved_list = sorted({*saved_modules, *(stored for stored, _, _ in also_saved)})  # TUNED's names
    embeddings = _embedding_entries(selected, model_names, model)
    kernels = _conv_kernels(selected, model_names, pairing, model)
    if isinstance(calibration, (str, os.PathLike)):
        from spectra.calibration import CalibrationConfig, collect_calibration

        calibration = collect_calibration(base, calibration, config=CalibrationConfig(device=device),
                                          progress=progress)

    def factorize(entry):
        rank, _, scaling = ranks_of[entry.name]
        (d,) = pairing.load(entry)
        size = relative_size(math.sqrt(d.delta_sq), math.sqrt(d.base_sq))  # is TUNED a fine-tune of BASE?
        C = None if calibration is None else calibration.covariance(entry.base_tensor)
        if C is not None:
            A, B, extraction = _factorize_on_data(d.delta, rank, scaling, C, epsilon=calibration.config.epsilon,
                                                  full_below=full_below, seed=seed)
        else:
            A, B, extraction = _factorize(d.delta, rank, scaling, full_below=full_below, seed=seed)
        return A, B, (*extraction, size)

    tensors: dict[str, torch.Tensor] = {}
    results = []
    ranks = {}
    parameter_factors: dict[str, list] = {}  # parameter -> [(its slice, A, B, scaling)] of the matrices it holds
    bar = tqdm.tqdm(total=len(selected), desc="extract", unit="module", disable=not progress)
    for entry, (A, B, extraction) in _in_parallel(factorize, selected, n_workers, threads, bar):
        rank, module_alpha, scaling = ranks_of[entry.name]
        module = model_names[entry.name]  # as the adapter's model class names it
        if entry.name in on_parameters and entry.expert_index is not None:  # expert e of a stored 3-D tensor
            head, _, leaf = module.rpartition(".")  # …experts.gate_up_proj -> …experts.{e}.gate_up_proj
            module = f"{head}.{entry.expert_index}.{leaf}"
        if entry.name in on_parameters:  # written below, with the other experts of its parameter (a router: alone)
            place, held_in_out = on_parameters[entry.name]
            if _peft_transposes(model, place.parameter) != held_in_out:  # PEFT's B·A is the expert's ΔWᵀ
                if place.rows is not None:  # no known model fuses row blocks of experts it holds (in, out)
                    raise ConfigError(f"{entry.name}: rows {place.rows} of {place.parameter}, held (in, out): "
                                      f"extract cannot write that LoRA. {_LEAVE_OUT[plan is not None]}")
                A, B = B.T, A.T  # (r, out), (in, r)
            parameter_factors.setdefault(place.parameter, []).append((place, A, B, scaling))
        elif entry.name in embeddings:  # PEFT's Embedding LoRA: ΔW (vocab, dim) = s·(B_e A_e)ᵀ, so A_e = Bᵀ, B_e = Aᵀ
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_A"] = B.T.cpu().contiguous()  # (r, vocab)
            tensors[f"{PEFT_PREFIX}{module}.lora_embedding_B"] = A.T.cpu().contiguous()  # (dim, r)
        else:
            kernel = kernels.get(entry.name, ())  # a Conv's (k…): A a conv of that kernel, B a 1×…×1 one
            tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.cpu().reshape(
                A.shape[0], -1, *kernel).contiguous()  # (r, in) or (r, in, k…)
            tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.cpu().reshape(
                *B.shape, *(1,) * len(kernel)).contiguous()  # (out, r) or (out, r, 1…)
        results.append(ModuleExtraction(module, rank, module_alpha, *extraction))
        if entry.name not in on_parameters:
            ranks[module] = (rank, module_alpha, entry.conv1d)
    bar.close()
    unchanged = sorted([*_leave_out_unchanged(results, tensors, ranks, save_names),
                        *(model_names[n] for n in unchanged_saved)], key=natural_key)
    for parameter, key in _parameter_keys(model, parameter_factors).items():
        A, B, rank, parameter_alpha = _parameter_factors(parameter_factors[parameter],
                                                         _peft_shape(model, parameter), use_rslora)
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
        ranks[parameter] = (rank, parameter_alpha, False)
    for key, tensor_name in (saved_keys | also_keys).items():
        tensors[key] = pairing.tuned.read(tensor_name).contiguous()
    tied = _tied_head(save_names, pairing, model)
    if tied is not None:  # the tied head follows the saved embedding only if the adapter holds it too
        embed = saved_names[tied[1].rpartition(".")[0]]
        tensors[f"{PEFT_PREFIX}{tied[0]}.weight"] = tensors[f"{PEFT_PREFIX}{embed}.weight"].clone()

    config = _peft_config(ranks, use_rslora, [*saved_names.values(), *(m for _, m, _ in also_saved)], pairing, model,
                          model_class,
                          parameters=set(parameter_factors)) | (
        {"ensure_weight_tying": True} if tied else {})
    _write_atomically(out_dir, tensors, config, overwrite=overwrite)
    notes = _tied_lora_notes(ranks, pairing, model) + [
        f"modules_to_save: PEFT also wraps {module} on loading (its name ends with {entry!r}: PEFT matches "
        "modules_to_save as the end of a name, not at a dot), so the adapter saves it whole too, from TUNED"
        for _, module, entry in also_saved]
    if plan is not None and plan.policy.use_dora:
        notes.append("the plan is for DoRA; the adapter is plain LoRA (use_dora false). Its merge, W_base + the "
                     "best rank-r ΔW, is what a DoRA adapter of the same factors would merge to (its magnitudes "
                     "would be that weight's row norms)")
    for note in notes:
        warnings.warn(note, PeftConfigWarning, stacklevel=2)
    if pairing.provenance:  # TUNED may not be of BASE (an adapter recording another base, another model type)
        notes.insert(0, pairing.provenance)
    if lacking:  # a stack asked for that the pair lacks: said, not warned as the adapter's
        notes.append(lacking)
    notes += saved_whole_notes(modules_to_save, saved_modules, pairing)  # a last name's cost: every layer's module
    if unchanged:
        notes.append(f"{len(unchanged)} targeted module(s) unchanged (ΔW = 0) left out of the adapter, e.g. "
                     f"{unchanged[0]}")
    elif save_names and all(m.fro_norm == 0.0 for m in results):
        notes.append("every targeted module is unchanged (ΔW = 0): their LoRA factors are zeros; the adapter carries "
                     f"the saved modules ({', '.join(saved_list)})")
    left_out, left_out_vectors, only_in_tuned, rounded = _not_carried(pairing, selected, save_names,
                                                                      cast=tuple(cast))
    dropped = set(unchanged)  # the model's names of the modules left out as unchanged (ΔW = 0): not adapted
    # changed matrices PEFT puts no LoRA on, selected or not: no roles or plan would carry them, so said apart
    refused |= _peft_refused([e for _, e in left_out if e.kind == "matrix" and e.name not in refused], model, pairing)
    not_adapted = [(n, e) for n, e in left_out if e.name in refused]
    if not_adapted:
        notes.append(_refused_note(not_adapted, refused, full=plan_or_rank == "full"))
    notes += _not_carried_notes(pairing, [(n, e) for n, e in left_out if e.name not in refused], left_out_vectors,
                                only_in_tuned, selected,
                                unchanged=frozenset(e.name for e in selected if model_names[e.name] in dropped),
                                roles=_roles_used(roles, stacks), stacks=stacks, planned=plan is not None,
                                full=plan_or_rank == "full" and not not_adapted, plan=plan,
                                rank=plan_or_rank if isinstance(plan_or_rank, int) else None)
    only = _targeted_only_in_base(pairing, roles, stacks) if plan is None else []  # a plan's are refused
    if only:  # as analyze says it: a targeted module TUNED lacks was left out without a word
        notes.append(f"{len(only)} tensor(s) only in BASE (TUNED lacks them: no ΔW to take), not in the "
                     f"adapter: {', '.join(only[:3])}{' …' if len(only) > 3 else ''}")
    if rounded:
        stored = str(pairing.tuned.info(rounded[0]).dtype).removeprefix("torch.")
        notes.append(f"{len(rounded)} tensor(s) outside the adapter differ from the base only by TUNED's lower-"
                     f"precision storage (the base's values rounded to {stored}), "
                     f"not by fine-tuning: {', '.join(rounded[:3])}{' …' if len(rounded) > 3 else ''}"
                     + (f" ({len(cast)} of them targeted, left out: their LoRA would be of rounding noise)"
                        if cast else "")
                     + ". PEFT's merge gives them back to within that rounding")
    notes += vocabulary_notes + head_notes
    if calibration is not None:
        notes += calibration.notes
    # the changed modules' sizes, as analyze warns; an adapter's update is its own whatever BASE is (its recorded
    # base is checked instead: pairing.provenance)
    unrelated = (None if isinstance(pairing.tuned, AdapterSource)
                 else unrelated_note(m.relative_size for m in results if m.relative_size))
    if unrelated:
        notes.append(unrelated)
    complete = not (left_out or left_out_vectors or only_in_tuned) and all(
        e.name in saved_modules for e in pairing.entries if e.kind == "matrix" and e.added_rows)
    return ExtractResult(out_dir, results, saved_list, config, model_class,
                         notes, vocab_size, unchanged, [n for n, _ in left_out], [n for n, _ in left_out_vectors],
                         only_in_tuned, complete, rounded, _peft_module_count(config, model), num_labels)


def _unchanged_in_saved(selected: list, model_names: dict, on_parameters: dict, saved_names: dict,
                        pairing: Pairing) -> list[str]:
    """The `selected` entries whose module lies in a module saved whole (`saved_names`' values, the model's names),
    or in one PEFT wraps beside it (a name ending with a saved one's, as a string: :func:`_also_wrapped`), and whose
    ΔW is 0: left out of the adapter as unchanged before any decomposition, so that they clash with no saved module.
    Each is read once (:func:`~spectra.lora.left_out._entry_changed`). Parameter targets (experts, routers) and
    rows of a resized vocabulary stay, as :func:`_leave_out_unchanged` keeps them."""
    saved = list(saved_names.values())
    if not saved:
        return []
    out = []
    for entry in selected:
        if entry.name in on_parameters or entry.added_rows:
            continue
        parts = model_names[entry.name].split(".")
        around = (".".join(parts[:i]) for i in range(1, len(parts) + 1))  # the module and those holding it
        if any(m.endswith(s) for m in around for s in saved) and not _entry_changed(pairing, entry):
            out.append(entry.name)
    return out


def _peft_refused(entries: list, model, pairing: Pairing) -> dict[str, str]:
    """Entry name → why PEFT puts no LoRA on its module (:func:`~spectra.checkpoints.targets.peft_refusal`: a Mamba
    mixer's ``out_proj`` and ``conv1d``, a grouped convolution), asked of the adapter's model (its model type and
    the module the entry resolves to; without one, of the base's config.json: PEFT's Mamba rule alone)."""
    from spectra.checkpoints.targets import peft_refusal

    stored = _stored_names(entries)
    if model is not None:
        model_type, modules = getattr(model.config, "model_type", None), dict(model.named_modules())
        found = model_targets(list(stored.values()), model)
    else:
        model_type, modules, found = (pairing.base.config or {}).get("model_type"), {}, {}
    refused = {}
    for e in entries:
        target = found.get(stored[e.name])
        name = target.name if target is not None and not target.parameter else stored[e.name]
        why = peft_refusal(name, model_type, modules.get(name))
        if why is not None:
            refused[e.name] = why
    return refused


def _without_refused(selected: list, refused: dict[str, str], pairing: Pairing, roles, stacks, *,
                     planned: bool) -> list:
    """`selected` without the entries PEFT puts no LoRA on (`refused`: name → why), which roles select and
    :func:`_refused_note` names among what the adapter leaves out. Refused where a plan names one (it was made
    without that rule: ``spectra recommend`` leaves them out) or where nothing else is left."""
    first = next(iter(refused))
    names = ", ".join(list(refused)[:5]) + (" …" if len(refused) > 5 else "")
    if planned:
        raise ConfigError(f"the plan names {names}: {refused[first]}. Drop {'it' if len(refused) == 1 else 'them'} "
                          "from the plan (`spectra recommend` leaves such modules out).")
    kept = [e for e in selected if e.name not in refused]
    if not kept:
        # the roles of the pair's other layers (an embedding or head only where named: extract's default)
        others = sorted({e.info.role for e in pairing.entries if e.kind == "matrix" and e.name not in refused
                         and e.info.role and not _bare_parameter(e)}
                        - set(_roles_used(roles, stacks)) - {"embed", "pos_embed", "head"})
        raise ConfigError(f"nothing to extract: the roles ({', '.join(_roles_used(roles, stacks))}) select only "
                          f"{names}; {refused[first]}. "
                          + (f"Name other roles (roles={','.join(others)}), or save "
                             if others else "Save ")
                          + f"{'it' if len(refused) == 1 else 'them'} whole (modules_to_save="
                          f"{','.join(dict.fromkeys(n.rpartition('.')[2] for n in refused))}).")
    return kept


def _refused_note(matrices: list, refused: dict[str, str], *, full: bool) -> str:
    """The note naming the changed `matrices` ((name, entry) pairs) PEFT puts no LoRA on, whether the roles selected
    them or not: no roles or plan would carry them, saving them whole does."""
    names = [n for n, _ in matrices]
    # the module holding each (DBRX's stacked experts ffn.experts.mlp.w1 are a parameter of ffn.experts.mlp)
    owners = [e.base_tensor.removesuffix(".weight") if e.base_tensor.endswith(".weight")
              else e.base_tensor.rpartition(".")[0] for _, e in matrices]
    leaves = ",".join(dict.fromkeys(n.rpartition(".")[2] for n in owners))
    return (("rank full is not lossless here: " if full else "")
            + f"the adapter leaves out {len(names)} changed matri{'x' if len(names) == 1 else 'ces'} PEFT puts no LoRA "
            f"on ({', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}): "
            f"{refused[matrices[0][1].name]}; their fine-tuning is not in it. To carry them, save them whole "
            f"(modules_to_save={leaves})")


def _leave_out_unchanged(results: list, tensors: dict, ranks: dict, save_names: list) -> list[str]:
    """Drop the modules whose ΔW is 0 (LoRA factors of zeros, which PEFT would load and run for nothing) from the
    adapter (`results`, `tensors` and `ranks`) and return their names; refuse where every targeted module is
    unchanged and nothing else would be saved (an adapter of zeros: the same checkpoint twice?); with saved modules
    there, the zero factors stay (PEFT needs a target). Experts stay: a slice of a stored 3-D expert tensor, whose
    parameter's factors are assembled from every expert, and experts PEFT converts to its fused parameters as a set
    (a subset it would rewrite onto other modules), but count in the refusal: experts of zeros are zeros too."""
    if results and all(m.fro_norm == 0.0 for m in results):
        if not save_names:
            raise ConfigError(f"every ΔW is 0: all {len(results)} targeted modules are unchanged in TUNED, so the "
                              "adapter would hold zeros only. Check that TUNED is the fine-tune (the same checkpoint "
                              "twice?).")
        return []
    zero = [m for m in results if m.fro_norm == 0.0 and m.name in ranks and not _EXPERT_INDEX.search(m.name)]
    if not zero:
        return []
    for m in zero:
        del ranks[m.name]
        for key in [k for k in tensors if k.startswith(f"{PEFT_PREFIX}{m.name}.lora_")]:
            del tensors[key]
        results.remove(m)
    return sorted((m.name for m in zero), key=natural_key)


def _resized_vocabulary(pairing: Pairing, selected: list, saved_modules: list[str]) -> tuple[list[str], int | None]:
    """What a vocabulary resized in TUNED (rows added to its embedding and head) means for the adapter: a note per
    resized matrix, and the vocabulary the model must be resized to before loading (None: the base's, as it is).

    A LoRA of a resized matrix covers the rows both sides hold (ΔW is defined there only), so it is for the base's
    vocabulary; one saved whole (modules_to_save) holds TUNED's rows, so the model is resized first. An adapter
    needing both loads onto no model: refused.
    """
    resized = [e for e in pairing.entries if e.kind == "matrix" and e.added_rows]
    lora = {e.name for e in selected}
    saved = [e for e in resized if e.name in saved_modules]
    covered = [e for e in resized if e.name in lora]
    if saved and covered:
        raise ConfigError(f"the vocabulary is resized in TUNED ({covered[0].added_rows} rows added): a LoRA of "
                          f"{covered[0].name} covers the base's {covered[0].shape[0]} rows, while {saved[0].name}, "
                          f"saved whole, holds TUNED's {saved[0].shape[0] + saved[0].added_rows}; no model loads "
                          "both. Save both whole (modules_to_save) or leave the embedding out of the LoRA roles.")
    notes = []
    for e in resized:
        rows, total = e.shape[0], e.shape[0] + e.added_rows
        if e in saved:
            notes.append(f"{e.name}: saved whole from TUNED, {total} rows (the base's vocabulary has {rows}): resize "
                         f"the model first, model.resize_token_embeddings({total}), then load the adapter")
        else:
            notes.append(f"{e.name}: vocabulary resized, {e.added_rows} rows added in TUNED; "
                         + (f"the LoRA covers the {rows} shared rows" if e in covered else "not in the adapter")
                         + f", so the adapter is for the base's {rows}-token vocabulary and the added rows' "
                         "fine-tuned values are not in it (modules_to_save holds the whole tuned matrix)")
    return notes, (saved[0].shape[0] + saved[0].added_rows if saved else None)


def _in_parallel(fn, entries: list, n: int, threads: int, bar):
    """Yield (entry, fn(entry)) in the order of `entries`, computed by `n` worker threads.

    As in :func:`spectra.analysis.analyze`: each worker runs torch with `threads` threads
    of its own, so the serial work around one module's GEMMs overlaps another module's; at
    most `n` modules are held at once. `bar` advances as modules finish; an error (or
    Ctrl-C) cancels what has not started.
    """
    if n == 1:
        for entry in entries:
            yield entry, fn(entry)
            bar.update()
        return
    with thread_pool(n, threads, "spectra-extract") as pool:
        pending: deque = deque()
        queue = iter(entries)
        for entry in itertools.islice(queue, n):
            pending.append((entry, pool.submit(fn, entry)))
        while pending:
            entry, future = pending.popleft()
            result = future.result()
            nxt = next(queue, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(fn, nxt)))
            bar.update()
            yield entry, result


_DEFAULT_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _roles_used(roles, stacks) -> tuple[str, ...]:
    """The roles a uniform-rank extract selects: `roles` as named, else the default ones plus those of the stacks
    named (``--stacks projector``: a projector's Linears, :func:`~spectra.checkpoints.roles.stack_roles`). Named
    roles get no stack roles, so advice that names roles names these."""
    from spectra.checkpoints.roles import stack_roles

    return tuple(roles) if roles else _DEFAULT_ROLES + stack_roles(stacks)


def _targeted_only_in_base(pairing: Pairing, roles, stacks) -> list[str]:
    """The weights only BASE holds whose module the roles and stacks target: left out of the adapter for want of a
    TUNED tensor. A head TUNED replaced (a causal LM's lm_head under a classifier's score) is not targeted."""
    out = []
    for name in pairing.only_in_base:
        module = name.removesuffix(".weight")
        info = module_info(module, pairing.config)
        if (name.endswith(".weight") and role_selected(info.role, _roles_used(roles, stacks), module)
                and stack_selected(info.stack, stacks)):
            out.append(name)
    return out


def _embedding_entries(entries, model_names: dict[str, str], model) -> set[str]:
    """Names of the entries whose module is an nn.Embedding, whose LoRA PEFT holds as ``lora_embedding_A/B``.

    The model's own module type where there is a model: T5's and SwitchTransformers'
    ``relative_attention_bias`` (role other) is an Embedding, and written as a Linear's ``lora_A``/``lora_B``
    PEFT loaded none of it, with only a warning. Without one (no ``config.json``): role embed, or a position or
    token-type embedding by name.
    """
    if model is None:
        return {e.name for e in entries if e.info.role == "embed" or _OTHER_EMBEDDINGS.search(e.name)}
    modules = dict(model.named_modules())
    return {e.name for e in entries if isinstance(modules.get(model_names[e.name]), torch.nn.Embedding)}


def _conv_kernels(entries, model_names: dict[str, str], pairing: Pairing, model) -> dict[str, tuple[int, ...]]:
    """Entry name → the kernel size (k…) of a convolution's weight (out, in, k…), which pairing flattens to
    (out, in·k…).

    PEFT's LoRA on a Conv holds A as a convolution of that kernel, (r, in, k…), and B as a 1×…×1 one,
    (out, r, 1…); its ΔW is B @ A.flatten(1) viewed (out, in, k…), so the factors of the flattened ΔW are
    written reshaped (they were written 2-D, and PEFT refused to load them). A grouped convolution is
    refused: PEFT cannot merge a LoRA on one.
    """
    modules = {} if model is None else dict(model.named_modules())
    out = {}
    for entry in entries:
        shape = tuple(pairing.base.info(entry.base_tensor).shape)
        if entry.expert_index is not None or len(shape) <= 2:
            continue
        groups = getattr(modules.get(model_names[entry.name]), "groups", 1)
        if groups != 1:
            raise ConfigError(f"{entry.name}: a convolution of {groups} groups; PEFT cannot merge a LoRA on one, so "
                              "extract does not write it. Leave it out (--roles, or drop it from the plan).")
        out[entry.name] = shape[2:]
    return out


_EXPERT_INDEX = re.compile(r"\.experts\.\d+\.")
_OTHER_EMBEDDINGS = re.compile(r"(^|\.)(wpe|position_embeddings|token_type_embeddings|embed_positions)$")


def _targets(plan_or_rank, alpha, rslora):
    """(name → (rank, alpha)) from a plan, or None for a uniform rank; and the scaling law."""
    if alpha is not None and not alpha > 0:
        raise ConfigError(f"alpha must be positive, got {alpha} (the update is scaled by alpha/r).")
    if alpha is not None and not math.isfinite(alpha):  # > 0 lets +inf through: every weight of the merge inf/NaN
        raise ConfigError(f"alpha must be finite, got {alpha} (the update is scaled by alpha/r).")
    if plan_or_rank == "full":
        return None, rslora, None
    if isinstance(plan_or_rank, int):
        if plan_or_rank < 1:
            raise ConfigError(f"rank must be ≥ 1, got {plan_or_rank}.")
        return None, rslora, None
    from spectra.ranks import RankPlan, load_plan

    plan = plan_or_rank if isinstance(plan_or_rank, RankPlan) else load_plan(plan_or_rank)
    if not plan.modules:
        raise ConfigError("the plan targets no module; relax its policy in `spectra recommend`.")
    return {m.name: (m.rank, m.alpha) for m in plan.modules}, plan.policy.rslora, plan


def _select(pairing: Pairing, targets, roles, stacks=None):
    matrices = [e for e in pairing.entries if e.kind == "matrix"]
    if targets is not None:
        by_name = {e.name: e for e in matrices}
        missing = [n for n in targets if n not in by_name]
        in_base = [n for n in missing if f"{n}.weight" in pairing.base]  # so TUNED is the side that lacks them
        if in_base and isinstance(pairing.tuned, AdapterSource):  # their ΔW is 0
            raise ConfigError(f"the plan names module(s) that the adapter {pairing.tuned.spec} does not adapt (their "
                              f"ΔW is 0): {', '.join(in_base[:5])}. Plan from an analysis of this adapter "
                              "(spectra analyze BASE ADAPTER), or extract with --rank.")
        lacking = [n for n in in_base if f"{n}.weight" not in pairing.tuned]
        if lacking:
            raise ConfigError(f"the plan names module(s) that the base holds but the tuned checkpoint "
                              f"{pairing.tuned.spec} lacks: {', '.join(lacking[:5])}. Is TUNED a fine-tune of "
                              f"this base, saved whole?")
        if missing:
            raise ConfigError(f"the plan names module(s) absent from the base {pairing.base.spec}: "
                              f"{', '.join(missing[:5])}. Was it made from an analysis of another model?")
        bare = {n: (by_name[n].base_tensor, tuple(pairing.base.info(by_name[n].base_tensor).shape)) for n in targets
                if _bare_parameter(by_name[n])}
        if bare:  # a plan written before recommend left such a parameter out (a ViT's position table)
            from spectra.ranks.plan import planned_bare_parameters

            raise planned_bare_parameters(bare, f"the base {pairing.base.spec}")
        return [by_name[n] for n in targets]
    wanted = set(_roles_used(roles, stacks))
    return [e for e in matrices  # GPT-2's crossattention.c_attn: xk, xv
            if role_selected(e.info.role, wanted, e.name) and stack_selected(e.info.stack, stacks)
            and not _bare_parameter(e)]


def _refuse_bare_parameters(pairing: Pairing, roles, stacks) -> None:
    """Where the roles select nothing but changed matrices that are parameters of their own (:func:`_bare_parameter`:
    Gemma 3's ``mm_input_projection_weight`` under ``--roles other``), refuse naming them and why, not as "nothing
    matches"."""
    wanted = set(_roles_used(roles, stacks))
    bare = [e.name for e in pairing.entries if e.kind == "matrix" and _bare_parameter(e)
            and role_selected(e.info.role, wanted, e.name) and stack_selected(e.info.stack, stacks)]
    if bare:
        raise ConfigError(f"{', '.join(bare[:5])}: {bare_parameters_why(len(bare))}, and the roles select nothing else: copy it from TUNED onto the loaded model. Leave their "
                          "role out (--roles) to extract other modules.")


def _bare_parameter(entry) -> bool:
    """Whether a pairing entry is a parameter of its own, no layer's weight (a ViT's or BLIP-2's (1, N, d) table
    measured as N × d: :func:`~spectra.checkpoints.names.is_bare_parameter`). Roles do not select it; a plan naming one
    is refused in :func:`_select`, in the words of a plan applied to a model
    (:func:`~spectra.ranks.plan.planned_bare_parameters`); changed, it is named among what the adapter does not carry,
    with the advice to copy it from TUNED (:mod:`spectra.lora.left_out`)."""
    return is_bare_parameter(entry.base_tensor, expert=entry.expert_index)


def _stored_names(entries) -> dict[str, str]:
    """Entry name → its module's name in the checkpoint (the tuned one's where both have it)."""
    return {e.name: (e.tuned_tensor or e.base_tensor).removesuffix(".weight") for e in entries}


def _adapter_model(pairing: Pairing, model_class: str | None, entries, saved_modules: list[str]):
    """(class name, model on the meta device) whose module names the adapter's keys use; (None, None) without one.

    An adapter is applied to the base, so its keys name the base's class: a bare ``LlamaModel``
    fine-tune of a ``LlamaForCausalLM`` base (keys ``layers.0…``) is written for
    ``LlamaForCausalLM`` (``model.layers.0…``), or PEFT would load none of it. When the base's
    class lacks a module the adapter needs (a classification head saved whole from a fine-tune
    of a bare base) and the tuned checkpoint's class has them all, the adapter is for the
    tuned class; neither holding them all ends in :func:`_model_names`' error. ``model_class``
    overrides the choice, built from the base's config (the tuned one's when the base has none).
    """
    base_config = pairing.base.config
    tuned_config = pairing.tuned.config if isinstance(pairing.tuned, CheckpointSource) else None
    if model_class is not None:
        config = base_config if base_config and base_config.get("model_type") else tuned_config
        model = meta_model(config, model_class)
        if model is None:
            spec = pairing.base.spec if config is base_config else pairing.tuned.spec
            raise ConfigError(f"model_class {model_class!r}: this transformers has no such class, or cannot build it "
                              f"from the config.json of {spec} (model_type {(config or {}).get('model_type')!r}). "
                              "Name a class of that family, e.g. "
                              f"{architecture(base_config) or architecture(tuned_config)}.")
        return model_class, model
    candidates = []  # (class, model): the base's, then the tuned checkpoint's when it differs
    for config in (base_config, tuned_config):
        cls = architecture(config)
        if cls and cls not in [c for c, _ in candidates] and (model := meta_model(config)) is not None:
            candidates.append((cls, model))
    stored = list(_stored_names(entries).values())
    for cls, model in candidates:
        found, (holders, _) = model_targets(stored, model), owning_modules(saved_modules, model)
        if all(found[n] is not None for n in stored) and all(holders[n] is not None for n in saved_modules):
            return cls, model
    return candidates[0] if candidates else (None, None)


def _model_names(entries, model, model_class: str | None) -> dict[str, str]:
    """Entry name → the name of its module in the model class (the adapter's keys and targets).

    Adapter keys must use the model's module names, which may differ from the checkpoint's
    (see :mod:`spectra.checkpoints.targets`): a prefix (the original GPT-2 checkpoint stores
    ``h.0.attn.c_attn``, ``GPT2LMHeadModel`` has ``transformer.h.0.attn.c_attn``), a tensor
    transformers renames on loading (GPT-NeoX's ``embed_out`` is the model's ``lm_head``). A
    name the model has no module for is refused, as PEFT would skip it silently. Without a
    ``config.json`` the checkpoint's names are kept. Expert slices keep their stored names (with
    the model's prefix): PEFT maps those onto fused expert parameters itself (or extract writes
    them there: :func:`_unconverted_parameters`, which also takes experts a plan gives different
    ranks: PEFT holds one rank for all experts of a parameter, the largest, the others' factors
    padded with zeros). A weight other than an expert's that
    the model holds as a parameter PEFT only adapts through ``target_parameters`` (a router's:
    PhiMoE's, a Linear whose forward returns a tuple, which a LoRA module cannot wrap; Mixtral's,
    a MixtralTopKRouter, no Linear) keeps its stored name too, and is written onto the parameter
    (:func:`_unconverted_parameters`).
    """
    stored = _stored_names(entries)
    if model is None:
        return stored
    found = model_targets(stored.values(), model)
    names, bad = {}, []
    for e in entries:
        name, target = stored[e.name], found[stored[e.name]]
        if target is not None and target.parameter:
            names[e.name] = target.stored_name
        elif target is None:
            bad.append(name)
        else:
            names[e.name] = target.name
    if bad:
        bad = list(dict.fromkeys(bad))  # the experts of one stored 3-D tensor share its name
        raise ConfigError(f"{', '.join(bad[:5])}: not module(s) of {model_class} that PEFT can adapt (transformers "
                          "names, fuses or wraps these weights otherwise when it loads the checkpoint), so PEFT "
                          "could not apply an adapter under this name. Leave their role out (--roles) or drop them "
                          "from the plan.")
    return names


def _tied_head(save_names: list[str], pairing: Pairing, model) -> tuple[str, str] | None:
    """(the output head's module, the saved embedding tensor) when a tied input embedding is saved whole.

    PEFT keeps a tied head on the base embedding unless the adapter asks for
    ``ensure_weight_tying`` and carries the head's tensor too.
    """
    if not (pairing.config or {}).get("tie_word_embeddings", False):
        return None
    if model is None or model.get_input_embeddings() is None or model.get_output_embeddings() is None:
        return None
    modules = {id(m): name for name, m in model.named_modules()}
    embed, head = modules.get(id(model.get_input_embeddings())), modules.get(id(model.get_output_embeddings()))
    saved = [n for n in save_names if resolve_name(n.removesuffix(".weight"), [embed]) is not None]
    return (head, saved[0]) if head and saved else None


def _tied_lora_notes(lora_modules, pairing: Pairing, model) -> list[str]:
    """A note when the adapter puts LoRA on an input embedding that another module reads.

    PEFT applies an Embedding LoRA to that module's own lookup only. Where the model looks tokens
    up through other modules sharing its weight (T5, BART: ``shared`` beside ``encoder.embed_tokens``
    and ``decoder.embed_tokens``, tied head or not), the LoRA is never called: unmerged, the adapter
    carries none of the embedding's update. Where only the output head is tied to it, the head keeps
    reading the base weight. Either way ``merge_and_unload()`` writes ΔW into the shared tensor and is
    exact. (PEFT's ``ensure_weight_tying`` does not help a LoRA: on Qwen2 the merge then adds ΔW twice.)
    """
    try:
        embedding = None if model is None else model.get_input_embeddings()
    except NotImplementedError:  # a composite model (CLIP, OWL-ViT) that names no one input embedding
        return []
    if embedding is None:
        return []
    modules = {id(m): name for name, m in model.named_modules()}
    embed = modules.get(id(embedding))
    if not embed or embed not in lora_modules:
        return []
    whole = (f"To be exact both ways, save the embedding whole instead: --modules-to-save "
             f"{embed.rpartition('.')[2]} (and leave embed out of --roles).")
    lookups = [name for name, m in model.named_modules()
               if m is not embedding and isinstance(m, torch.nn.Embedding) and m.weight is embedding.weight]
    if lookups:
        return [f"{embed}'s LoRA is never called: the model looks tokens up through {', '.join(lookups)}, "
                f"separate modules sharing its weight, and PEFT applies an embedding's LoRA to its own lookup only. "
                f"Unmerged, the adapter carries none of {embed}'s update; merge_and_unload() writes it into the "
                f"shared weight and reproduces the fine-tune. {whole}"]
    if not (pairing.config or {}).get("tie_word_embeddings", False) or model.get_output_embeddings() is None:
        return []
    head = modules.get(id(model.get_output_embeddings()))
    return [f"{embed} is tied to the output head {head}: PEFT applies its LoRA to the embedding lookup only, so "
            f"the adapter reproduces the fine-tune after merge_and_unload() (the head then shares the merged "
            f"weight) but not unmerged, where {head} keeps the base embedding. {whole}"]


# the weights from_pretrained(folder) loads, in its order of preference
_LOADED_FIRST = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _base_name_or_path(path) -> str:
    """What the adapter records as its base: a weights file's folder when that folder holds the model's config.json
    and from_pretrained(folder) loads that very file (``AutoPeftModel`` loads the base from it; a
    ``model.safetensors`` path it reads as a malformed hub id). A folder that would load other weights (base.safetensors
    beside the fine-tune's model.safetensors) is not recorded: the adapter would be applied to the fine-tune."""
    path = Path(path)
    if path.is_file() and (path.parent / "config.json").is_file():
        loaded = next((name for name in _LOADED_FIRST if (path.parent / name).is_file()), None)
        if loaded == path.name:
            return str(path.parent)
    return str(path)


def _factorize(delta: torch.Tensor, rank: int, scaling: float, *, full_below: int, seed: int):
    """A (r, in), B (out, r) with s·B@A the best rank-r approximation of delta; plus its error."""
    if min(delta.shape) <= full_below:
        spec = full_svd(delta, compute_vectors=True)
        U, S, Vh = spec.U[:, :rank], spec.values[:rank], spec.Vh[:rank]
    else:
        spec = randomized_svd(delta, rank, compute_vectors=True, random_state=seed, tol=CONVERGED_TOL)  # block Krylov
        U, S, Vh = spec.U, spec.values, spec.Vh
    U, S, Vh = (x.to(device=delta.device, dtype=torch.float32) for x in (U, S, Vh))
    root = torch.sqrt(S / scaling)  # (r,): each factor carries √(σ/s)
    B = U * root  # (out, r)
    A = root[:, None] * Vh  # (r, in)
    fro, error = _residual_norms(delta, B, A, scaling)
    tail = math.sqrt(max(spec.total_energy - float((spec.values[:rank].double() ** 2).sum()), 0.0))
    return A, B, (fro, error, tail, spec.method)


def _residual_norms(delta: torch.Tensor, B: torch.Tensor, A: torch.Tensor, scaling: float, *,
                    whiten: torch.Tensor | None = None) -> tuple[float, float]:
    """(‖ΔW·M‖_F, ‖(ΔW − s·B A)·M‖_F) in float64, M = `whiten` (in, in) or the identity, a block of ≤ 4 MB rows at
    a time.

    Formed whole, ΔW, s·B A and their difference were float64 temporaries of twice ΔW's size
    each (~280 MB on a 5632×2048 module), whose page faults and passes over memory took a
    third of extract's time on a TinyLlama-shaped pair; by row blocks they take a few MB.
    """
    A64 = A.double() * scaling  # (r, in)
    rows = max(1, (4 << 20) // (8 * delta.shape[1]))
    fro2 = err2 = 0.0
    for i in range(0, delta.shape[0], rows):
        D = delta[i:i + rows].double()
        R = D - B[i:i + rows].double() @ A64
        if whiten is not None:
            D, R = D @ whiten, R @ whiten  # (rows, in) @ (in, in)
        fro2 += float((D * D).sum())
        err2 += float((R * R).sum())
    return math.sqrt(fro2), math.sqrt(err2)


def _factorize_on_data(delta: torch.Tensor, rank: int, scaling: float, C: torch.Tensor, *, epsilon: float,
                       full_below: int, seed: int):
    """As :func:`_factorize`, with s·B@A the data-optimal rank-r update; its norms on the calibration inputs X (in, N).

    The truncation is the SVD of ΔW·C_ε^{1/2} (:func:`~spectra.calibration.truncation_factors`: the ridge ε keeps
    C_ε^{-1/2} defined where the inputs span a subspace). The norms are without the ridge, as analyze's
    ``rms_output_change`` (:func:`~spectra.calibration.whitened_spectrum`): ‖M·C^{1/2}‖_F = ‖M X‖_F / √N, the RMS
    output change per token. ``fro`` is ‖ΔW C^{1/2}‖_F (analyze's rms_output_change), ``error`` ‖(ΔW − s·B A)
    C^{1/2}‖_F, and ``tail`` the Eckart–Young tail of ΔW C^{1/2}, the least error any rank-r update has on X:
    error ≥ tail, equal up to O(ε). Measured in C_ε's norm they had differed from analyze's by the ridge's share,
    ε·(tr C / in)·‖ΔW − s·B A‖_F², which is all there is of an update the inputs never see.
    """
    from spectra.calibration import covariance_root, truncation_factors, whitening

    C = C.to(delta.device)  # C is collected on the CPU
    whiten, unwhiten, _ = whitening(C, epsilon=epsilon)
    U, S, Vw, spec = truncation_factors(delta, rank, covariance=C, epsilon=epsilon, full_below=full_below, seed=seed,
                                        roots=(whiten, unwhiten))
    root = torch.sqrt(S / scaling)  # (r,): each factor carries √(σ/s)
    B = (U * root).float()  # (out, r)
    A = (root[:, None] * Vw).float()  # (r, in) = √(σ/s) V_rᵀ C_ε^{-1/2}
    data_root = covariance_root(C)  # (in, in) C^{1/2}, no ridge: C's own root, as analyze's spectrum takes it
    fro, error = _residual_norms(delta, B, A, scaling, whiten=data_root)
    seen = delta.double() @ data_root  # (out, in) @ (in, in): ΔW as the data sees it
    if min(seen.shape) <= full_below:  # every σ (float64 gesdd, as analyze's): the tail summed as it is
        tail = math.sqrt(float((full_svd(seen).values[rank:].double() ** 2).sum()))
    else:
        top = randomized_svd(seen, rank, compute_vectors=False, random_state=seed, tol=CONVERGED_TOL)  # block Krylov
        tail = math.sqrt(max(top.total_energy - float((top.values.double() ** 2).sum()), 0.0))
    return A, B, (fro, error, tail, f"data-optimal {spec.method}")


def _peft_config(ranks: dict, use_rslora: bool, saved: list[str], pairing: Pairing, model,
                 model_class: str | None, *, parameters: set[str] = frozenset()) -> dict[str, Any]:
    """The adapter_config.json dict, checked against the model's module names (the checkpoint's without one).

    Its ``task_type`` is the model class's (``CAUSAL_LM``, ``SEQ_CLS``, …; null where PEFT has
    none for it), as in the plan's ``peft_config``: it had always been null. But for a
    classifier whose head the adapter does not save: PEFT's ``SEQ_CLS``/``TOKEN_CLS``/
    ``QUESTION_ANS`` models wrap their head (``classifier``/``score``, ``qa_outputs``) as a
    module to save and then refuse to load an adapter without it, so such an adapter stays
    task-less (its merge is the same).

    ``ranks``' and ``saved``'s names count as modules too: expert slices keep their stored names (PEFT maps them).
    Experts the model fuses into one parameter per projection (no module of theirs exists) are converted by
    PEFT at the config's global ``r`` and ``lora_alpha``, whatever ``rank_pattern`` says: those are theirs then.
    ``ranks``' names in `parameters` are parameters the adapter adapts itself (experts PEFT does not
    convert, a router no LoRA module can wrap: :func:`_unconverted_parameters`): ``target_parameters``,
    whose ``rank_pattern`` PEFT applies.
    """
    from spectra.checkpoints.targets import peft_task_type
    from spectra.ranks import check_peft_config, check_peft_conversion, lora_config

    model_modules = None if model is None else {n for n, _ in model.named_modules() if n}
    # experts left for PEFT to convert share one (rank, α): :func:`_unconverted_parameters` writes experts at
    # different ones onto their parameters
    fused = {n: ranks[n][:2] for n in ranks if model_modules is not None and _EXPERT_INDEX.search(n)
             and n not in model_modules}
    r, alpha = next(iter(fused.values())) if fused else (None, None)
    config = lora_config(ranks, use_rslora=use_rslora, r=r, alpha=alpha, parameters=parameters) | {
        "init_lora_weights": True,
        "task_type": _task_type(peft_task_type(pairing.config, model_class), saved),
        "modules_to_save": sorted(saved) or None,
        "base_model_name_or_path": _base_name_or_path(pairing.base.path),
        "peft_version": _peft_version(),
    }
    if model_modules is None:
        source = pairing.tuned if hasattr(pairing.tuned, "names") else pairing.base
        known = {n.rsplit(".", 1)[0] for n in source.names()}
    else:
        known = model_modules
    check_peft_config(config, known | (set(ranks) - parameters) | set(saved),
                      parameter_names=[n for n, _ in model.named_parameters()] if parameters else ())
    if model is not None:
        check_peft_conversion(config, model)  # what PEFT wraps after rewriting the config is what it names
    return config


def _peft_module_count(config: dict, model) -> int:
    """The LoRA modules PEFT creates loading an adapter of ``config`` onto ``model``: the modules it wraps and the
    parameters it adapts (:func:`~spectra.checkpoints.peft_match.config_targets`), after its own rewrite of a
    transformers-5 MoE's config (:func:`~spectra.checkpoints.peft_match.peft_converted`: every expert of a projection
    in one fused parameter). Without a model (no config.json), the config's entries."""
    from spectra.checkpoints.peft_match import config_targets, peft_converted

    if model is None or isinstance(config.get("target_modules"), str):
        return len(config.get("target_modules") or ()) + len(config.get("target_parameters") or ())
    converted = peft_converted(config, model) or config
    found = config_targets(converted, [n for n, _ in model.named_modules() if n],
                           parameter_names=[n for n, _ in model.named_parameters()])
    return len(found.modules) + len(found.parameters)


def _peft_version() -> str | None:
    try:
        import peft

        return peft.__version__
    except ImportError:  # pragma: no cover - peft is a dependency
        return None


def _write_atomically(out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, *, overwrite: bool) -> None:
    from safetensors.torch import save_file

    # an old adapter (one extract wrote) is set aside, and put back if the swap fails
    with staged_directory(out_dir, command="extract", overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
