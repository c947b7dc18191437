"""The block roles an adapter may target, and the one check of a ``roles`` selection: ``spectra train``'s
``TrainConfig.roles`` and ``spectra memory``'s ``roles`` read it alike (no torch, no transformers here:
``spectra.memory`` imports this module at its top).

A role is a module's place in a block (:mod:`spectra.checkpoints.architectures` names it from the module's
checkpoint name); :func:`~spectra.checkpoints.architectures.role_selected` decides which modules a selection takes.
"""

from __future__ import annotations

from collections.abc import Iterable

from spectra.errors import ConfigError

# x…: cross-attention; q_a … kv_b: multi-head latent attention's factors (DeepSeek-V2/V3, Kimi-K2, MiniCPM3, …);
# kv, o_a, o_b: DeepSeek-V4's key-value head (K = V; Gemma 4's k_proj that its full-attention layers read as K = V
# too) and output factors; projector: a multimodal projector's Linears, which only the projector stack holds, so a
# selection of stacks decides whether the default roles take them
BLOCK_ROLES = ("q", "k", "v", "o", "qkv", "q_a", "q_b", "kv_a", "kv_b", "kv", "o_a", "o_b", "xq", "xk", "xv", "xo",
               "gate", "up", "down", "gate_up", "projector")
# Stack → the role only its modules hold, which the default roles take only where a selection names that stack
# (architectures gives a projector's Linears role projector)
_STACK_ONLY_ROLES = {"projector": "projector"}


def stack_roles(stacks) -> tuple[str, ...]:
    """The roles that default roles add for `stacks` (a selection as
    :func:`~spectra.checkpoints.architectures.parse_stacks` returns it): ``("projector",)`` where it names the
    projector stack, else ``()``. None (every stack, or a command's default stacks) adds none, so a command that
    names no stack adapts no projector by default, as before its Linears had a role of their own.

    >>> stack_roles(("language", "projector")), stack_roles(None)
    (('projector',), ())
    """
    return tuple(role for stack, role in _STACK_ONLY_ROLES.items() if stacks is not None and stack in stacks)


def default_roles(stacks) -> tuple[str, ...]:
    """The roles an adapter of `stacks` targets when none are named: every block role but those only a stack holds,
    plus those of the stacks named (:func:`stack_roles`): ``--stacks projector`` adapts a projector's Linears."""
    return tuple(r for r in BLOCK_ROLES if r not in _STACK_ONLY_ROLES.values()) + stack_roles(stacks)


def check_roles(roles: Iterable[str] | None) -> tuple[str, ...] | None:
    """``roles`` as a tuple of block roles, or None for every block role.

    None and an empty selection both mean every block role (as ``roles or BLOCK_ROLES`` reads them), so
    both come back None: a caller that tells "given" from "left out" sees an empty selection as left out.

    Raises
    ------
    ConfigError
        A role that is not one of :data:`BLOCK_ROLES`, exactly as spelt (``--roles`` takes ``q``, not ``q_proj``).
    """
    if roles is None:
        return None
    roles = tuple(roles)
    if not roles:
        return None
    bad = sorted(set(roles) - set(BLOCK_ROLES))
    if bad:
        raise ConfigError(f"roles {bad}: LoRA targets the block linears {', '.join(BLOCK_ROLES)}.")
    return roles
