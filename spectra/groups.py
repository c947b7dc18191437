"""How modules are grouped and named across stacks: a leaf below every stage that labels them (the sweep, the
functional ranks, the reports), so that none of them imports a later stage for it. No torch.

A multimodal checkpoint's vision tower numbers its layers from 0 like its language model, and its q_proj is no more
the language model's q than its layer 0 is theirs. A row's ``stack`` (absent for the language model, and in files
written before it existed, whose readers fill it in as a new run would: :func:`rows_with_stacks`) keeps them apart:
modules are grouped by (stack, role) (:func:`group_of`), and where more than one stack is shown, another stack's roles
read "vision q" (:func:`group_label`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from spectra.checkpoints.architectures import (STACKS, encoder_decoder_config, module_info, module_stack,
                                               stage_depths)

_DIGITS = re.compile(r"\d+")

# Stacks in report order: the language model (None) first, then the others as architectures.STACKS lists them.
STACK_ORDER = (None, *STACKS)


def stack_index(stack: str | None) -> tuple[int, str]:
    """Sort key of ``stack``: its place in :data:`STACK_ORDER` (unknown stacks last, by name)."""
    return (STACK_ORDER.index(stack), "") if stack in STACK_ORDER else (len(STACK_ORDER), str(stack))


def stacks_in(rows: list[Mapping]) -> list[str | None]:
    """The distinct stacks of ``rows`` (None: the language model, or a row written without a stack), in order."""
    return sorted({r.get("stack") for r in rows}, key=stack_index)


# analysis settings that select modules by layer or name: the rows may lack whole blocks
_SELECTING = ("layers", "include", "exclude")


def rows_with_stacks(modules: list, model_type: str | None, settings: Mapping | None = None) -> list:
    """The rows of an analysis as this spectra labels their stacks: a row without a ``stack`` (a file written
    before spectra gave a vision-only model its one stack, or before a stack existed) gets the one its name and the
    checkpoint's model type give (:func:`~spectra.checkpoints.architectures.module_stack`), as a new run does: an
    old ViT's rows read ``vision``, not the language model's; an old SAM's mask decoder ``mask_decoder``; an old
    T5's or Whisper's encoder ``encoder`` (an encoder–decoder's model type says what config.json's
    ``is_encoder_decoder`` did: :func:`~spectra.checkpoints.architectures.encoder_decoder_config`). A row whose stack
    is the language model keeps none, so an LM's analysis reads as written. Rows that are no dict, or that name no
    module, are returned as they are (the readers' checks name them).

    A hierarchical backbone's rows (Swin's ``layers.S.blocks.B``, ConvNeXt's ``stages.S.layers.B`` …) written before
    spectra numbered its blocks over the whole stack (``sum(depths[:S]) + B``) carry the old reading (S for Swin, B
    for ConvNeXt): where every row's layer is the old reading and the names hold every stage's blocks
    (:func:`~spectra.checkpoints.architectures.stage_depths`), their layers are renumbered as a new run gives them.
    A file of the new numbering, or one whose names do not give the depths, reads as written, and so does one whose
    `settings` (the analysis's ``config``) selected modules by ``layers``, ``include`` or ``exclude``: its names may
    lack whole blocks, which would give wrong depths (ConvNeXt's block 0 of each stage read [0, 1, 2, 3], not
    [0, 3, 6, 15]).

    `model_type` is ``config.json``'s, as the analysis keeps it (``pairing.config_model_type``, :func:`model_type_of`).

    >>> rows_with_stacks([{"name": "encoder.layer.0.attention.attention.query"}], "vit")
    [{'name': 'encoder.layer.0.attention.attention.query', 'stack': 'vision'}]
    >>> rows_with_stacks([{"name": "model.layers.0.self_attn.q_proj"}], "llama")
    [{'name': 'model.layers.0.self_attn.q_proj'}]
    >>> rows_with_stacks([{"name": "encoder.block.0.layer.0.SelfAttention.q"}], "t5")
    [{'name': 'encoder.block.0.layer.0.SelfAttention.q', 'stack': 'encoder'}]
    """
    config = encoder_decoder_config(model_type)
    known: dict[str, str | None] = {}  # by the name with its numbers as 0: no stack rule tells layer 3 from layer 4
    out = []
    for row in modules:
        if isinstance(row, Mapping) and "stack" not in row and isinstance(row.get("name"), str):
            shape = _DIGITS.sub("0", row["name"])
            if shape not in known:  # a DeepSeek-V3 analysis has 47k rows and a few hundred shapes of name
                known[shape] = module_stack(row["name"], config)
            stack = known[shape]
            row = {**row, "stack": stack} if stack is not None else row
        out.append(row)
    if any((settings or {}).get(key) for key in _SELECTING):  # a selection may have dropped a stage's blocks
        return out
    return _renumbered_stages(out, model_type)


def _renumbered_stages(rows: list, model_type: str | None) -> list:
    """`rows` with a hierarchical backbone's layers as a new run numbers them, where every row that the two
    numberings tell apart holds the old one (:func:`rows_with_stacks`); else `rows` as they are."""
    named = [r for r in rows if isinstance(r, Mapping) and isinstance(r.get("name"), str)]
    depths = stage_depths([r["name"] for r in named], model_type)
    if depths is None:
        return rows
    old_config = {"model_type": model_type}  # no depths: module_info reads the stage (or block) number, as it did
    changed = {}
    for row in named:
        old, new = module_info(row["name"], old_config).layer, module_info(row["name"], depths).layer
        if old != new:
            if row.get("layer") != old:
                return rows  # written with the new numbering (or another): as written
            changed[row["name"]] = new
    return [{**r, "layer": changed[r["name"]]} if isinstance(r, Mapping) and r.get("name") in changed else r
            for r in rows]


def model_type_of(analysis: Mapping) -> str | None:
    """``config.json``'s model type of the checkpoints an analysis dict compared (``pairing.config_model_type``,
    which every analysis.json holds), or None."""
    pairing = analysis.get("pairing") if isinstance(analysis, Mapping) else None
    model_type = pairing.get("config_model_type") if isinstance(pairing, Mapping) else None
    return model_type if isinstance(model_type, str) else None


def group_of(row: Mapping) -> tuple[str | None, str]:
    """What the per-role table, the role panels and the heatmap cells group a module by: (stack, role)."""
    return row.get("stack"), row["role"]


def group_label(group: tuple[str | None, str], stacks: list) -> str:
    """A group as the reports name it: its role ("q"), prefixed by its stack ("vision q") where ``stacks`` (those of
    the analysis, :func:`~spectra.report.tables.stacks_of`) are more than one and it is not the language model's."""
    stack, role = group
    return role if stack is None or len(stacks) < 2 else f"{stack} {role}"


def curve_name(group: str) -> str:
    """A truncation sweep's curve as sentences name it: "the whole-model curve" for ``model``, else "the 'vision q'
    curve" (a role curve, named by :func:`group_label` of its modules' group)."""
    return "the whole-model curve" if group == "model" else f"the '{group}' curve"
