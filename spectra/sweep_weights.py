"""Setting a loaded model's weights to W_base + ΔW_r per module, for truncation sweeps.

The model is loaded once (from the fine-tune) and its tensors are overwritten in place,
read from the memory-mapped checkpoints on demand: a targeted weight at rank 0 is the
base's tensor, at full rank the fine-tune's, in between ``W_base + U_r diag(S_r) Vw_r``;
every other tensor comes from the fine-tune or from the base. Only what changed since the
last configuration is rewritten.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from spectra.checkpoints.names import match_names
from spectra.errors import ConfigError


@dataclass
class Target:
    """One truncated module: names on both sides, the model's key, and its SVD factors."""

    name: str
    role: str
    shape: tuple[int, int]  # (out, in)
    base_tensor: str
    tuned_tensor: str
    key: str  # the model's state_dict key
    conv1d: bool
    entry: object
    plan_rank: int | None = None
    factors: tuple | None = None  # U (out, k), S (k,), Vw (k, in), float64

    @property
    def full_rank(self) -> int:
        return min(self.shape)


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
    """

    def __init__(self, model, base, tuned, *, plan=None, roles=None):
        from spectra.checkpoints.pairing import Pairing, PairingOptions
        from spectra.checkpoints.source import AdapterSource
        from spectra.checkpoints.targets import loading_rename
        from spectra.lora.train import BLOCK_ROLES

        self.state = model.state_dict()  # key -> tensor sharing the parameter's storage
        if plan is not None and not hasattr(plan, "modules"):
            from spectra.ranks import load_plan

            plan = load_plan(plan)
        options = PairingOptions(roles=None if plan is not None else (roles or BLOCK_ROLES), split_fused=False,
                                 vectors=False)
        self.pairing = Pairing(base, tuned, options)
        if isinstance(self.pairing.tuned, AdapterSource):
            raise ConfigError(f"{tuned} is a PEFT adapter; a truncation sweep needs the full fine-tune's checkpoint.")
        self.notes: list[str] = list(self.pairing.notes)
        entries = [e for e in self.pairing.entries if e.kind == "matrix"]
        if plan is not None:
            by_name = {e.name: e for e in entries}
            missing = [m.name for m in plan.modules if m.name not in by_name]
            if missing:
                raise ConfigError(f"the plan names module(s) absent from {base} × {tuned}: {', '.join(missing[:5])}. "
                                  "Was it made from an analysis of this pair?")
            planned = {m.name: m.rank for m in plan.modules}
            entries = [by_name[n] for n in planned]
        skipped = [e.name for e in entries if e.expert_index is not None]
        if skipped:
            self.notes.append(f"{len(skipped)} expert slices of 3-D MoE tensors are not truncated (kept whole, from "
                              "where the non-targets come from" + ("; the plan point holds them at the base's "
                                                                   "weights, not at their planned ranks)."
                                                                   if plan is not None else ")."))
        entries = [e for e in entries if e.expert_index is None]
        rename = loading_rename(model)
        self._tuned_names = _names_by_key(self.pairing.tuned.names(), list(self.state), rename)
        self._base_names = _names_by_key(self.pairing.base.names(), list(self.state), rename)
        key_of = {name: key for key, name in self._tuned_names.items()}  # tuned checkpoint name -> model key
        self.targets = [Target(e.name, e.info.role, tuple(e.shape), e.base_tensor, e.tuned_tensor,
                               key_of[e.tuned_tensor], e.conv1d, e,
                               plan_rank=planned[e.name] if plan is not None else None)
                        for e in entries if e.tuned_tensor in key_of]
        unmatched = [e.name for e in entries if e.tuned_tensor not in key_of]
        if unmatched:  # a checkpoint name transformers maps to no parameter of the loaded model
            self.notes.append(f"{len(unmatched)} module(s) match no parameter of the loaded {type(model).__name__} "
                              f"(fused on loading?) and are not truncated but follow the non-targets"
                              + (" (the plan point: the base's, not their planned ranks)" if plan is not None else "")
                              + f": {', '.join(unmatched[:5])}" + (", …" if len(unmatched) > 5 else "") + ".")
        if not self.targets:
            raise ConfigError(f"nothing to truncate: no weight matrix of roles {', '.join(options.roles or ())} pairs "
                              f"between {base} and {tuned} and the loaded model.")
        targeted = {t.key for t in self.targets}
        self.non_target = [k for k in self.state if k not in targeted and k in self._tuned_names]
        for key in self.non_target:
            name = self._base_names.get(key)
            if name is None or tuple(self.pairing.base.info(name).shape) != tuple(self.state[key].shape):
                self._base_names.pop(key, None)
                self.notes.append(f"{key}: absent from the base (or resized); taken from the fine-tune in every "
                                  "configuration.")
        # keys no one checkpoint tensor feeds: transformers fused several into them on load (Mixtral's experts),
        # unless they share storage with a matched key (tied weights follow that key)
        known = {self.state[k].data_ptr() for k in (*targeted, *self._tuned_names)}
        self.fused = [k for k in self.state if k not in targeted and k not in self._tuned_names
                      and self.state[k].data_ptr() not in known]
        self._fused_values: dict[str, dict[str, torch.Tensor]] = {
            "tuned": {k: self.state[k].detach().to("cpu", copy=True) for k in self.fused}}
        self._base_spec, self._model_class = base, type(model)
        self._mode = "tuned"  # the model as loaded
        self._ranks = [t.full_rank for t in self.targets]

    def delta(self, target: Target) -> torch.Tensor:
        """ΔW of one target, (out, in) float32."""
        (d,) = self.pairing.load(target.entry)
        return d.delta

    def roles(self) -> list[str]:
        return list(dict.fromkeys(t.role for t in self.targets))

    def plan_ranks(self) -> tuple[int, ...] | None:
        if any(t.plan_rank is None for t in self.targets):
            return None
        return tuple(min(t.plan_rank, t.full_rank) for t in self.targets)

    @torch.no_grad()
    def apply(self, ranks: tuple[int, ...], *, non_target: str) -> None:
        """Set every target to its rank (0: base, full: tuned) and the non-targets from ``non_target``."""
        if non_target != self._mode:
            for key in self.non_target:
                source, name = ((self.pairing.base, self._base_names[key])
                                if non_target == "base" and key in self._base_names
                                else (self.pairing.tuned, self._tuned_names[key]))
                self.state[key].copy_(source.read(name))
            for key, value in self._fused_for(non_target).items():
                self.state[key].copy_(value)
            self._mode = non_target
        for i, (target, rank) in enumerate(zip(self.targets, ranks)):
            if self._ranks[i] != rank:
                self.state[target.key].copy_(self._weight(target, rank))
                self._ranks[i] = rank

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

    def _weight(self, target: Target, rank: int) -> torch.Tensor:
        """The target's tensor at ``rank``, in the checkpoint's (= the model's) layout."""
        if rank >= target.full_rank:
            return self.pairing.tuned.read(target.tuned_tensor)
        base = self.pairing.base.read(target.base_tensor)
        if rank == 0:
            return base
        U, S, Vw = target.factors
        if rank > S.shape[0]:
            raise ValueError(f"{target.name}: rank {rank} asked of factors computed to rank {S.shape[0]}")
        delta = (U[:, :rank] * S[:rank]) @ Vw[:rank]  # (out, r) @ (r, in) -> (out, in)
        return base.double() + (delta.T if target.conv1d else delta)  # Conv1D stores (in, out)


def _names_by_key(names, keys: list[str], rename) -> dict[str, str]:
    """state_dict key -> the one checkpoint tensor transformers loads into it, read without loading the model.

    A name is renamed as transformers renames it on loading (gpt_neox's ``embed_out.weight`` is the
    model's ``lm_head.weight``), then matched to a key up to a prefix. A key several tensors are
    fused into (Mixtral's per-expert weights into one ``gate_up_proj``) gets none.
    """
    names = list(names)
    loaded = [rename(n) for n in names]
    counts = Counter(loaded)
    stored = {new: name for new, name in zip(loaded, names) if counts[new] == 1}  # loaded name -> checkpoint name
    return {key: stored[new] for new, key in match_names(list(stored), keys).pairs.items()}
