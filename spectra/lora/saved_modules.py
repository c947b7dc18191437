"""Which modules an adapter saves whole (PEFT's ``modules_to_save``), and which tensors it must hold for them.

``spectra extract --modules-to-save`` copies modules from TUNED into the adapter. What PEFT loads decides what the
adapter must hold: a saved module comes with every tensor of its ``state_dict``, its children's included
(:func:`_saved_tensors`); PEFT reads each entry as the end of any module's name, not at a dot, so it also wraps the
modules whose names end with a saved one's, which are then saved whole too (:func:`peft_wrapped`,
:func:`_also_wrapped`); a task model (``SEQ_CLS`` …) adds its head, so an adapter whose head is not saved stays
task-less (:func:`_task_type`). A LoRA inside a saved module, a module the model does not hold as stored, and a
tensor TUNED lacks are refused before any decomposition.

Names follow the stages: TUNED's modules matched by name (:func:`_modules_to_save`), mapped onto the model's
(:func:`_saved_names`), then their tensors as adapter keys (:func:`_saved_tensors`, :func:`_also_wrapped`).
"""

from __future__ import annotations

import math

from spectra.checkpoints.adapter import PEFT_PREFIX
from spectra.checkpoints.names import natural_key
from spectra.checkpoints.pairing import Pairing
from spectra.checkpoints.targets import configured_labels, meta_model, owning_modules, peft_task_type, with_labels
from spectra.errors import ConfigError


def _holding_modules(names) -> set[str]:
    """The modules that hold other modules, read from a checkpoint's tensor names: ``a`` and ``a.b`` of
    ``a.b.c.weight`` (``a.b.c`` holds the tensor only)."""
    holders = set()
    for name in names:
        parts = name.split(".")
        holders.update(".".join(parts[:i]) for i in range(1, len(parts) - 1))
    return holders


def _modules_to_save(pairing: Pairing, names: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(TUNED's modules copied whole, the names of every tensor TUNED holds under them), each name matched as a
    module's name or its end at a dot (the modules PEFT wraps beside them, whose names end with theirs as strings:
    :func:`_also_wrapped`).

    A module is matched whether it holds its tensors itself or through its children: RoBERTa's ``classifier`` (a
    RobertaClassificationHead of ``dense`` and ``out_proj``), BART's ``classification_head``, OWL-ViT's ``owlvit``
    (``logit_scale`` and both towers). PEFT's ModulesToSaveWrapper copies the whole module and loads every tensor of
    its ``state_dict`` from the adapter (:func:`_saved_tensors`). Only tensors sitting on a module had been matched,
    so ``classifier`` was refused as no module of RoBERTa, and ``owlvit`` saved ``logit_scale`` alone, which PEFT
    refused (``KeyError``). A module matched inside another one is saved with it.
    """
    if not names:
        return [], []
    if not hasattr(pairing.tuned, "names"):
        raise ConfigError("modules_to_save needs a full tuned checkpoint, not an adapter.")
    stored = list(pairing.tuned.names())
    modules = (_holding_modules(stored) | {n.rpartition(".")[0] for n in stored}) - {""}
    matched = set()
    for wanted in names:
        hits = {m for m in modules if m == wanted or m.endswith("." + wanted)}
        if not hits:
            raise ConfigError(f"modules_to_save: no module named {wanted!r} in {pairing.tuned.spec}.")
        matched |= hits
    outer = sorted((m for m in matched if not any(m.startswith(o + ".") for o in matched)), key=natural_key)
    return outer, [n for n in stored if any(n.startswith(m + ".") for m in outer)]


def with_planned(entries: tuple[str, ...], plan, pairing: Pairing) -> tuple[str, ...]:
    """The ``modules_to_save`` entries as given, then the plan's (``RankPlan.modules_to_save``: the modules PEFT trains
    in full for its task type, a sequence classifier's ``classifier`` or ``score``), each once.

    PEFT saves those whole, so an adapter of the plan carries TUNED's, as ``--modules-to-save`` would; extract had
    left them out, and the adapter task-less (:func:`_task_type`). Not where TUNED is an adapter, which holds no
    modules to copy (:func:`_modules_to_save`): its change there is left out, with a note.
    """
    if plan is None or not hasattr(pairing.tuned, "names"):
        return entries
    return tuple(dict.fromkeys([*entries, *(m.name for m in plan.modules_to_save)]))


def typed_entry(module: str, entries) -> str:
    """The ``modules_to_save`` entry, as the user gave it, that matched TUNED's `module` (:func:`_modules_to_save`:
    the module's name or its end at a dot), or one that matched a module holding it; else its last name."""
    for entry in entries:
        if module == entry or module.endswith("." + entry):
            return entry
    for entry in entries:
        if f".{entry}." in f".{module}.":
            return entry
    return module.rpartition(".")[2]


def saved_whole_notes(entries, saved_modules: list[str], pairing: Pairing) -> list[str]:
    """A note for each ``modules_to_save`` entry (as given) that saves more than one module holding a matrix whole
    (`saved_modules`, TUNED's names): how many, and their parameters, weights included. A last name (``q_proj``)
    saves every layer's module of that name, whose change a LoRA could carry at a fraction of that; a full name
    saves one. Norms saved by their last name (``input_layernorm``) get none: vectors, which no LoRA carries."""
    if not saved_modules:
        return []
    notes, names = [], list(pairing.tuned.names())
    for entry in entries:
        matched = [m for m in saved_modules if m == entry or m.endswith("." + entry)]
        if len(matched) < 2 or not any(len(pairing.tuned.info(t).shape) >= 2 for t in names
                                       if t.startswith(tuple(m + "." for m in matched))):
            continue
        params = sum(math.prod(pairing.tuned.info(t).shape) for t in names
                     if t.startswith(tuple(m + "." for m in matched)))
        notes.append(f"modules_to_save {entry!r} saves {len(matched)} modules whole from TUNED ({matched[0]} … "
                     f"{matched[-1]}): {params:,} parameters, their weights included; a module's full name "
                     f"({matched[0]}) saves that module alone")
    return notes


def _saved_tensors(saved_names: dict[str, str], pairing: Pairing, model, model_class: str | None,
                   lora_targets: set[str], entries=()) -> dict[str, str]:
    """Adapter key → TUNED's tensor, for every tensor of the modules saved whole (`saved_names`: TUNED's module →
    the model's). Refused, before any work: a saved module that is or holds a LoRA target of the adapter
    (`lora_targets`, the model's names: the modules it adapts, those left out as unchanged not among them), which
    PEFT leaves unwrapped in a module to save, so the LoRA would not load (BART's ``classification_head`` holds
    ``out_proj``, of role o); the module saved whole carries TUNED's values. The refusal quotes the user's
    ``modules_to_save`` entry that matched the module (`entries`, as given: :func:`typed_entry`).

    PEFT loads a module to save by its ``state_dict`` (``ModulesToSaveWrapper.adapter_state_dict_load_map``), each
    key ``base_model.model.<module>.<tensor>``, children's included (``classifier.dense.weight``), and fails on a
    missing one (``KeyError``). With a model, those are the model's module's tensors, each read from TUNED under the
    same name below the module, refused where TUNED lacks one; without one (no config.json), TUNED's tensors under
    the module.
    """
    if not saved_names:
        return {}
    stored = list(pairing.tuned.names())
    held = set(stored)
    keys = {}
    for checkpoint, module in saved_names.items():
        lora = sorted((t for t in lora_targets if t == module or t.startswith(module + ".")), key=natural_key)
        if lora:
            entry = typed_entry(checkpoint, entries)
            precise = (", or name there only the modules the adapter does not adapt, by their full names as TUNED "
                       "stores them" if sum(typed_entry(c, entries) == entry for c in saved_names) > 1 else "")
            raise ConfigError(f"modules_to_save: {entry!r} saves {module} whole, with TUNED's values, and the adapter "
                              f"would also adapt {', '.join(lora[:3])}{' …' if len(lora) > 3 else ''} in it with a "
                              "LoRA, which PEFT does not load inside a module to save. Leave "
                              f"those roles out (--roles) or drop them from the plan, or leave {entry!r} out of "
                              f"--modules-to-save{precise}.")
        if model is None:
            tensors = [n[len(checkpoint) + 1:] for n in stored if n.startswith(checkpoint + ".")]
        else:
            tensors = list(model.get_submodule(module).state_dict())
            missing = [t for t in tensors if f"{checkpoint}.{t}" not in held]
            if missing:
                raise ConfigError(f"modules_to_save: PEFT loads every tensor of {module} ({model_class}'s) from the "
                                  f"adapter, and {pairing.tuned.spec} has no {checkpoint}.{missing[0]} to save "
                                  f"({len(missing)} of its {len(tensors)} tensors missing), so the adapter would not "
                                  f"load. Leave {checkpoint.rpartition('.')[2]!r} out of --modules-to-save.")
        keys |= {f"{PEFT_PREFIX}{module}.{t}": f"{checkpoint}.{t}" for t in tensors}
    return keys


def _saved_names(saved_modules: list[str], model, model_class: str | None) -> dict[str, str]:
    """Modules saved whole: checkpoint name → the model's module (the checkpoint's names without a model).

    Any module that holds the stored tensors, whether or not a LoRA module could wrap it
    (:func:`~spectra.checkpoints.targets.owning_modules`): PEFT's ``modules_to_save`` copies the module and
    runs its own forward, so a router whose LoRA must go onto its weight (PhiMoE's ``mlp.router``, Mixtral's
    ``mlp.gate``) is saved as its module. Under the stored name ``block_sparse_moe.gate`` PEFT matched no
    module and left the base's router, without a word. A module the model does not hold as stored is refused
    for the same reason.
    """
    if model is None:
        return {m: m for m in saved_modules}
    found, converted_names = owning_modules(saved_modules, model)
    missing = [m for m in saved_modules if found[m] is None]
    converted = [m for m in missing if m in converted_names]
    if converted:
        raise ConfigError(f"modules_to_save: {', '.join(converted[:5])} is no module of {model_class} as stored "
                          "(transformers fuses or converts its weight when it loads the checkpoint), so PEFT "
                          "would save and restore nothing under this name. Leave it out of --modules-to-save.")
    if missing:
        raise ConfigError(f"modules_to_save: {model_class} has no module {', '.join(missing[:5])}, so PEFT would save "
                          "and restore nothing under this name. Name the class you will load the adapter onto "
                          "(--model-class, e.g. a …ForSequenceClassification for a classifier's score), or leave "
                          "the module out of --modules-to-save.")
    return found


# where PEFT's task models (PeftModelForSequenceClassification, …) wrap modules_to_save a second time: on the
# PeftModel itself, whose module names carry this prefix (and which holds these two modules around the model)
_PEFT_MODEL_PREFIX, _PEFT_MODEL_ROOTS = "base_model.model.", ("base_model", "base_model.model")


def peft_wrapped(entries, module_names, *, task: str | None = None) -> dict[str, str]:
    """Module → the ``modules_to_save`` entry PEFT wraps it for (a ModulesToSaveWrapper), and so expects its tensors
    in the adapter, loading onto a model of these `module_names` an adapter of this ``task_type``.

    PEFT 0.21's ``_set_trainable`` (``peft/utils/other.py``) wraps every module whose name *ends with* an entry as a
    plain string, ``key.endswith(entry)``, not at a dot: ``layer_norm`` also wraps OWL-ViT's
    ``owlvit.text_model.final_layer_norm``. A task model adds its heads to the entries (``classifier`` and ``score``
    for ``SEQ_CLS``: :data:`_TASK_HEADS`) and wraps them once more on the PeftModel, whose names carry
    ``base_model.model.``; a match there of the PeftModel's own modules (an entry ``model``) is keyed by their name.
    """
    entries = [*entries, *_TASK_HEADS.get(task, ())]
    keys = {n: n for n in module_names if n}
    if task in _TASK_HEADS:
        keys |= {_PEFT_MODEL_PREFIX + n: n for n in keys} | {r: r for r in _PEFT_MODEL_ROOTS}
    out = {}
    for key, module in keys.items():
        entry = next((e for e in entries if key.endswith(e)), None)
        if entry is not None:
            out.setdefault(module, entry)
    return out


def _also_wrapped(saved_names: dict[str, str], pairing: Pairing, model, model_class: str | None,
                  lora_targets: set[str], entries=()) -> tuple[list[tuple[str, str, str]], dict[str, str]]:
    """The modules PEFT wraps as modules to save beside the saved ones (:func:`peft_wrapped`), which the adapter
    must then hold whole: ([(TUNED's module name, the model's, the entry that matched it)], adapter key → TUNED's
    tensor name for each tensor of theirs: every one of the module's ``state_dict``, which PEFT loads each of).

    PEFT reads each ``modules_to_save`` entry as the end of a module name, so a saved ``layer_norm`` (OWL-ViT's
    top-level one) also wraps ``owlvit.text_model.final_layer_norm``, and PEFT refused the adapter without its
    tensors (``KeyError: 'base_model.model.owlvit.text_model.final_layer_norm.weight'``). The entries are the saved
    modules' full names already, which no other name can narrow, so those modules are saved too, with TUNED's values
    (the wrapper replaces the module: its values are the model's then, changed or not). Refused: a module so
    wrapped that a LoRA of the adapter adapts or lies in (PEFT would wrap the LoRA layer), the PeftModel itself, or
    one whose tensors TUNED does not hold under its name; the refusal quotes the user's entry (`entries`, as given)
    that saved the module whose name matched.
    """
    if not saved_names:
        return [], {}
    if model is not None:
        module_names = [n for n, _ in model.named_modules()]
    else:  # no config.json: the checkpoint's names, holding modules too
        module_names = sorted(_holding_modules(pairing.tuned.names()) | {n.rpartition(".")[0]
                                                                        for n in pairing.tuned.names()})
    saved = list(saved_names.values())
    task = _task_type(peft_task_type(pairing.config, model_class), saved)  # as _peft_config writes it
    wrapped = {m: e for m, e in peft_wrapped(saved, module_names, task=task).items() if m not in saved}
    if not wrapped:
        return [], {}
    stored = set(pairing.tuned.names())
    holders = sorted(_holding_modules(stored) | {n.rpartition(".")[0] for n in stored})
    also, keys = [], {}
    stored_as = {m: c for c, m in saved_names.items()}  # the model's saved module -> TUNED's
    for module, entry in sorted(wrapped.items(), key=lambda x: natural_key(x[0])):
        typed = typed_entry(stored_as[entry], entries) if entry in stored_as and entries else entry
        why = f"modules_to_save: PEFT also wraps {module} (its name ends with {entry!r}; PEFT matches an entry as " \
              "the end of a module's name, not at a dot)"
        if module in _PEFT_MODEL_ROOTS:
            raise ConfigError(f"{why}, which is the whole model. Leave {typed!r} out of --modules-to-save.")
        lora = sorted(t for t in lora_targets if t == module or t.startswith(module + "."))
        if lora:
            raise ConfigError(f"{why}, which the adapter also adapts with a LoRA ({', '.join(lora[:3])}): PEFT "
                              "would wrap the LoRA layer. Leave its role out (--roles) or drop it from the plan, or "
                              f"leave {typed!r} out of --modules-to-save.")
        leaf = module.rpartition(".")[2]
        if model is None:
            checkpoint = module if module in holders else None
            tensors = [n[len(module) + 1:] for n in stored if n.startswith(module + ".")] if checkpoint else []
        else:
            candidates = [h for h in holders if h.rpartition(".")[2] == leaf]
            found, _ = owning_modules(candidates, model)
            checkpoint = next((c for c in candidates if found[c] == module), None)
            tensors = list(model.get_submodule(module).state_dict())
        missing = [t for t in tensors if f"{checkpoint}.{t}" not in stored]
        if checkpoint is None or missing or not tensors:
            lacking = f"{checkpoint}.{missing[0]}" if checkpoint and missing else module
            raise ConfigError(f"{why}, so the adapter must hold it whole, and {pairing.tuned.spec} has no "
                              f"{lacking} to save. Leave {typed!r} out of --modules-to-save.")
        also.append((checkpoint, module, entry))
        keys |= {f"{PEFT_PREFIX}{module}.{t}": f"{checkpoint}.{t}" for t in tensors}
    return also, keys


# the heads PEFT's task models add to modules_to_save (and then expect in the adapter)
_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def _task_type(task: str | None, saved: list[str]) -> str | None:
    """`task`, or None for a classifier task whose head is not among the `saved` modules (see :func:`_peft_config`)."""
    if task in _TASK_HEADS and not any(name.rpartition(".")[2] in _TASK_HEADS[task] for name in saved):
        return None
    return task


def saved_num_labels(saved_keys: dict[str, str], pairing: Pairing, model_class: str | None,
                     resized: frozenset[str] = frozenset()) -> tuple[int | None, list[str]]:
    """(the ``num_labels`` to build ``model_class`` from BASE with, so that the saved tensors fit it; None: BASE's
    config as it is), and a note where no ``num_labels`` makes them fit.

    The adapter loads onto ``model_class.from_pretrained(BASE)``, built from the base's config: a head saved whole
    from a fine-tune with more or fewer classes (a DistilBERT classifier of 3 labels, the base's config 2) has
    TUNED's (3, d) weight, and PEFT's load fails on the size mismatch. Built with TUNED's class count
    (``from_pretrained(BASE, num_labels=3)``) the model holds that shape. `saved_keys` maps the adapter's keys to
    TUNED's tensors; `resized` names TUNED's tensors of a resized vocabulary (``resize_token_embeddings`` instead).
    """
    base_config = pairing.base.config
    tuned_config = pairing.tuned.config if hasattr(pairing.tuned, "names") else None
    if not saved_keys or not model_class or not base_config or not base_config.get("model_type"):
        return None, []

    def misfits(config) -> list[tuple[str, tuple, tuple | None]] | None:  # (TUNED's tensor, its shape, the model's)
        model = meta_model(config, model_class)
        if model is None:
            return None
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        out = []
        for key, tensor in saved_keys.items():
            held = tuple(pairing.tuned.info(tensor).shape)
            if tensor not in resized and shapes.get(key.removeprefix(PEFT_PREFIX), held) != held:
                out.append((tensor, held, shapes[key.removeprefix(PEFT_PREFIX)]))
        return out

    found = misfits(base_config)
    if not found:
        return None, []
    classes = configured_labels(tuned_config) if tuned_config else None
    if classes is not None and classes != configured_labels(base_config):
        if misfits(with_labels(base_config, classes)) == []:
            return classes, []
    tensor, held, built = found[0]
    return None, [f"modules_to_save: {tensor} is {'×'.join(map(str, held))} in TUNED but "
                  f"{'×'.join(map(str, built))} in a {model_class} built from the base's config"
                  + (f" ({len(found)} such tensors)" if len(found) > 1 else "")
                  + ", so PEFT refuses to load the adapter onto that model: build the model with TUNED's shapes "
                  "(from TUNED's config) before loading it"]
