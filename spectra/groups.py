"""How modules are grouped and named across stacks: a leaf below every stage that labels them (the sweep, the
functional ranks, the reports), so that none of them imports a later stage for it. No torch.

A multimodal checkpoint's vision tower numbers its layers from 0 like its language model, and its q_proj is no more
the language model's q than its layer 0 is theirs. A row's ``stack`` (absent for the language model, and in files
written before it existed) keeps them apart: modules are grouped by (stack, role) (:func:`group_of`), and where more
than one stack is shown, another stack's roles read "vision q" (:func:`group_label`).
"""

from __future__ import annotations

from collections.abc import Mapping

from spectra.checkpoints.architectures import STACKS

# Stacks in report order: the language model (None) first, then the others as architectures.STACKS lists them.
STACK_ORDER = (None, *STACKS)


def stack_index(stack: str | None) -> tuple[int, str]:
    """Sort key of ``stack``: its place in :data:`STACK_ORDER` (unknown stacks last, by name)."""
    return (STACK_ORDER.index(stack), "") if stack in STACK_ORDER else (len(STACK_ORDER), str(stack))


def stacks_in(rows: list[Mapping]) -> list[str | None]:
    """The distinct stacks of ``rows`` (None: the language model, or a row written without a stack), in order."""
    return sorted({r.get("stack") for r in rows}, key=stack_index)


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
