"""Setting a loaded model's weights to W_base + ΔW_r per module, for truncation sweeps.

The model is loaded once (from the fine-tune) and its tensors are overwritten in place,
read from the memory-mapped checkpoints on demand: a targeted weight at rank 0 is the
base's tensor, at full rank the fine-tune's, in between ``W_base + U_r diag(S_r) Vw_r``;
every other tensor comes from the fine-tune or from the base. Only what changed since the
last configuration is rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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
        from spectra.checkpoints.names import match_names
        from spectra.checkpoints.pairing import Pairing, PairingOptions
        from spectra.checkpoints.source import AdapterSource
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
            self.notes.append(f"{len(skipped)} expert slices of 3-D MoE tensors are not truncated (kept as tuned).")
        entries = [e for e in entries if e.expert_index is None]
        match = match_names([e.tuned_tensor for e in entries], list(self.state))
        self.targets = [Target(e.name, e.info.role, tuple(e.shape), e.base_tensor, e.tuned_tensor,
                               match.pairs[e.tuned_tensor], e.conv1d, e,
                               plan_rank=planned[e.name] if plan is not None else None)
                        for e in entries if e.tuned_tensor in match.pairs]
        if not self.targets:
            raise ConfigError(f"nothing to truncate: no weight matrix of roles {', '.join(options.roles or ())} pairs "
                              f"between {base} and {tuned} and the loaded model.")
        targeted = {t.key for t in self.targets}
        self._tuned_names = _by_key(match_names(self.pairing.tuned.names(), list(self.state)))
        self._base_names = _by_key(match_names(self.pairing.base.names(), list(self.state)))
        self.non_target = [k for k in self.state if k not in targeted and k in self._tuned_names]
        for key in self.non_target:
            name = self._base_names.get(key)
            if name is None or tuple(self.pairing.base.info(name).shape) != tuple(self.state[key].shape):
                self._base_names.pop(key, None)
                self.notes.append(f"{key}: absent from the base (or resized); taken from the fine-tune in every "
                                  "configuration.")
        # keys no checkpoint name matches: transformers renamed them on load (gpt_neox's embed_out is the model's
        # lm_head), unless they share storage with a matched key (tied weights follow that key)
        known = {self.state[k].data_ptr() for k in (*targeted, *self._tuned_names)}
        self.renamed = [k for k in self.state if k not in targeted and k not in self._tuned_names
                        and self.state[k].data_ptr() not in known]
        self._renamed_values: dict[str, dict[str, torch.Tensor]] = {
            "tuned": {k: self.state[k].detach().to("cpu", copy=True) for k in self.renamed}}
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
            for key, value in self._renamed_for(non_target).items():
                self.state[key].copy_(value)
            self._mode = non_target
        for i, (target, rank) in enumerate(zip(self.targets, ranks)):
            if self._ranks[i] != rank:
                self.state[target.key].copy_(self._weight(target, rank))
                self._ranks[i] = rank

    def _renamed_for(self, mode: str) -> dict[str, torch.Tensor]:
        """Values of the renamed keys on the ``mode`` side; the base's as transformers loads the base model."""
        if mode not in self._renamed_values:
            base_values = {}
            if self.renamed:
                from spectra.lora.train import model_dir, quiet_loading

                with quiet_loading():
                    loaded, info = self._model_class.from_pretrained(
                        str(model_dir(self._base_spec)), dtype=torch.float32, output_loading_info=True,
                        ignore_mismatched_sizes=True)
                absent = set(info["missing_keys"]) | {k for k, *_ in info["mismatched_keys"]}
                state = loaded.state_dict()
                for key in self.renamed:
                    if key in absent or key not in state or state[key].shape != self.state[key].shape:
                        self.notes.append(f"{key}: absent from the base (or resized); taken from the fine-tune in "
                                          "every configuration.")
                        base_values[key] = self._renamed_values["tuned"][key]
                    else:
                        base_values[key] = state[key].detach().clone()
                        self.notes.append(f"{key}: named differently in the checkpoints; its base value is the one "
                                          "transformers loads into the base model.")
                del loaded, state
            self._renamed_values[mode] = base_values
        return self._renamed_values[mode]

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


def _by_key(match) -> dict[str, str]:
    """state_dict key -> checkpoint name, from a match of checkpoint names against keys."""
    return {key: name for name, key in match.pairs.items()}
