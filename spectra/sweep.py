"""Truncation sweeps: the fine-tune with every ΔW cut to rank r, evaluated. No training.

For each rank r the model is evaluated with every targeted weight set to
``W_base + ΔW_r``, ΔW_r the best rank-r truncation of ``ΔW = W_tuned − W_base``: Eckart–Young
(best in ‖ΔW − ΔW_r‖_F), or, given calibration data, the data-optimal truncation (best in
‖(ΔW − ΔW_r)X‖_F; SVD-LLM, arXiv:2403.07378; see :mod:`spectra.calibration`). Rank 0 is
W_base, and a rank at or above min(out, in) is W_tuned itself, read from the checkpoint,
so the end points are exact. That is the curve an extracted adapter (``spectra extract``)
would trace, measured on the user's data.

Non-targeted tensors (norms, biases, embeddings, heads) come from the fine-tune
(``non_target="tuned"``, what an adapter with ``modules_to_save`` can express) or from the
base (``"base"``; a tensor the base lacks, such as a new classifier, still comes from the
fine-tune, and the result says so), or both curves are measured.

Given a plan, its modules are the targets of every curve, and one more point is the
function of the adapter ``spectra extract --plan`` writes for it: each planned module at its
rank and every other tensor, the modules the plan leaves out included, the base's (whatever
``non_target`` says: an adapter on the base changes nothing else), but for the plan's
``modules_to_save`` (a sequence classifier's head, which PEFT trains in full): the adapter
saves the fine-tune's, so the point takes the fine-tune's. With calibration data it
is the adapter ``spectra extract --plan --calibration`` writes (data-optimal truncations). A
planned embedding whose head is tied to it moves the head too, as the merged adapter does
(PEFT's unmerged embedding LoRA leaves a tied head at the base's: ``spectra extract`` says so).

Per-role curves (``groups="role"``) truncate one role of one stack at a time: a multimodal
checkpoint's vision tower and its language model each have a q curve ("vision q" and "q",
named as the analysis reports name their groups; :func:`~spectra.ranks.functional.role_curves`),
so a functional rank read off one is never applied to the other.

A curve the eval data never reaches is said so (``unreached`` in ``sweep.json``, and a note). Text never
passes through a multimodal checkpoint's vision tower, an MoE expert the router never picks on the eval set
is never run: truncating such modules leaves every output as it was, rank 0 (their ΔW removed) included,
and the flat curve would read as "rank 0 suffices". The criterion is exact: a curve whose changed modules
(ΔW ≠ 0) at rank 0 give every eval example exactly the full fine-tune's loss and metric (per example, to
the bit; every swept rank too) is unreached. Rank 0 is evaluated for that check when it was not swept (and,
with non-targets from the base, the full rank), only for a curve whose swept points are all identical: a
sweep whose curves all move costs nothing more.
A module the data does run through but whose ΔW changes no output in floating point cannot be told apart
from one it never runs through: both are unreached, since the eval set gives no evidence about either.
A curve whose modules are all unchanged (ΔW = 0) is flat for that reason and is not marked.

Each module's SVD is computed once, to the largest rank asked for, and reused at every
rank. Every metric is pooled per example as Σ numerator / Σ denominator, so its noise is
stated by a percentile bootstrap over eval examples (Efron & Tibshirani 1993), paired
across points for the gap to the full fine-tune.
"""

from __future__ import annotations

import operator
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from spectra.calibration import Calibration, CalibrationConfig, collect_calibration, truncation_factors
from spectra.checkpoints.architectures import parse_stacks
from spectra.checkpoints.pairing import check_device
from spectra.checkpoints.relatedness import unrelated_note
from spectra.errors import ConfigError
from spectra.groups import curve_name, stack_index
from spectra.lora.data import check_max_length, check_task
from spectra.ranks.functional import role_curves
from spectra.sweep_metrics import Metric, example_stats, resolve_metric
from spectra.sweep_weights import ModelWeights

SCHEMA_VERSION = 1
NON_TARGET = ("tuned", "base", "both")
GROUPS = ("model", "role", "both")


@dataclass(frozen=True)
class SweepConfig:
    """Options of :func:`truncation_sweep` besides what is swept. Written into ``sweep.json``.

    Attributes
    ----------
    roles : tuple of str, optional
        Roles whose ΔW are truncated; None: every block linear (q, k, v, o, qkv, gate, up,
        down, gate_up), what LoRA targets. Ignored with a plan (its modules are the targets).
    stacks : tuple of str, optional
        Stacks whose modules of ``roles`` are truncated (``language``, ``vision``, ``encoder`` …:
        ``architectures.STACK_NAMES``); None: every stack. Refused with a plan.
    task : {"auto", "causal_lm", "seq_cls", "seq2seq_lm"}
        ``auto``: ``seq2seq_lm`` for an encoder–decoder (``{"source", "target"}`` records,
        token-level metrics over the targets), else classification when every eval record
        has a ``label``.
    max_length : int, optional
        Tokens per eval (and calibration) example; None: 128, or the model's position limit
        when shorter (a note says so). A length beyond a table of positions (learned, or a fixed
        sinusoid as Marian's) is refused.
    batch_size : int
        Eval examples per forward pass.
    bootstrap : int
        Bootstrap replicates for the intervals (0: none).
    confidence : float
        Coverage of the percentile intervals.
    full_below : int
        Exact SVD when min(out, in) ≤ this, else randomized top-k.
    calibration_epsilon : float
        Ridge of the calibration second moments when ``calibration`` is a data file (a
        :class:`~spectra.calibration.Calibration` brings its own). Named as in
        ``AnalysisConfig``; it was ``epsilon``, which a report's configuration block showed
        beside the functional ε of ``--epsilon``.
    device : str
        Where the model is evaluated: ``cpu``, ``cuda`` or ``cuda:N`` (the SVDs of ΔW run
        on the CPU once per module; the evaluations are what a large model spends its time on).
    seed : int
        Seed of the bootstrap and of any randomized SVD.
    """

    roles: tuple[str, ...] | None = None
    stacks: tuple[str, ...] | None = None  # None: every stack, as roles alone select
    task: str = "auto"
    max_length: int | None = None  # None -> 128 cut to the model's positions, as training and verify
    batch_size: int = 32  # eval is forward only: larger batches are cheap
    bootstrap: int = 1000  # percentile endpoints settle to ~0.1 of their width at 1000 replicates
    confidence: float = 0.95  # the usual two-sided 95 %
    full_below: int = 1024  # exact SVD takes well under a second up to here
    calibration_epsilon: float = 1e-6  # as CalibrationConfig: leaves the data term exact to ~1e-6
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.roles is not None:
            object.__setattr__(self, "roles", tuple(self.roles))
        object.__setattr__(self, "stacks", parse_stacks(self.stacks, option="stacks (--stacks)"))
        check_task(self.task, option="task (--task)")
        check_max_length(self.max_length, option="max_length (--max-length)")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}.")
        if self.bootstrap < 0:
            raise ConfigError(f"bootstrap must be ≥ 0, got {self.bootstrap}.")
        if not 0 < self.confidence < 1:
            raise ConfigError(f"confidence {self.confidence} must lie in (0, 1), e.g. 0.95.")
        check_device(self.device)


@dataclass
class SweepResult:
    """Metric vs rank of truncated fine-tunes, with the base and the full fine-tune.

    ``data`` is the ``sweep.json`` dict: ``reference`` (``base``, ``tuned``), ``points`` (one
    per group, non-target source and rank: ``metric``, ``interval``, ``gap`` to the full
    fine-tune, ``gap_interval``, ``loss``, ``accuracy``), ``metric``, ``examples``, ``modules``
    (the truncated ones: ``name``, ``role``, ``stack`` where not the language model's, ``shape``,
    ``full_rank``, ``plan_rank``), ``unreached`` (the curves the eval data never reached: ``group``,
    ``non_target``, ``modules``, ``note``; see the module docstring; absent from a sweep.json written
    before it was checked) and the sources and options. A point's ``group`` is ``model``,
    ``plan`` or a role curve (:func:`~spectra.ranks.functional.role_curves`: "q", or "vision q"
    where the sweep truncates another stack beside the language model). ``gap`` is positive when the
    point is worse than the full fine-tune.
    """

    data: dict

    def to_dict(self) -> dict:
        return self.data

    @property
    def points(self) -> list[dict]:
        return self.data["points"]

    @property
    def reference(self) -> dict:
        return self.data["reference"]

    def curve(self, *, group: str = "model", non_target: str | None = None) -> list[dict]:
        """The points of one curve, by rank: ``group`` "model" or a role curve ("q", "vision q"), ``non_target``
        "tuned"/"base"."""
        non_target = non_target or self.data["non_target"][0]
        return sorted((p for p in self.points if p["group"] == group and p["non_target"] == non_target
                       and p["rank"] is not None), key=lambda p: p["rank"])

    def figure(self, *, marks: dict[str, int] | None = None):
        """The curve (metric vs rank, base and full fine-tune as lines, ``marks`` as verticals) as a Figure."""
        from spectra.report.sweep import plot_truncation_curve

        return plot_truncation_curve(self.to_dict(), marks=marks)

    def write_report(self, out_dir, *, overwrite: bool = False, marks: dict[str, int] | None = None,
                     plan=None, functional: dict | None = None) -> Path:
        """``sweep.json``, ``report.md``, ``report.html`` and the curve figure, written atomically.

        ``marks``: label → rank drawn as vertical lines (e.g. the functional and energy ranks).
        ``plan``: a :class:`~spectra.ranks.RankPlan` (e.g. the functional one) written as
        ``plan.json`` in the same staged directory, so the folder appears complete at once.
        ``functional``: :func:`~spectra.ranks.functional_ranks` of this sweep, recorded in
        ``sweep.json`` and summarised in the report (as ``spectra sweep --epsilon`` does).
        """
        from spectra.report.sweep import write_truncation_report

        return write_truncation_report(self.data, out_dir, overwrite=overwrite, marks=marks, plan=plan,
                                       functional=functional)

    @classmethod
    def load(cls, path) -> "SweepResult":
        """Read a ``sweep.json`` written by :meth:`write_report` (or its directory)."""
        from spectra.ranks import read_sweep

        return cls(read_sweep(path))


# ---------------------------------------------------------------------------- the sweep


def truncation_sweep(base, tuned, data, *, ranks=(1, 2, 4, 8, 16, 32, 64), plan=None,
                     metric: Metric | str | Callable | None = None, non_target: str = "tuned", groups: str = "model",
                     calibration: Calibration | str | Path | None = None, config: SweepConfig | None = None,
                     progress: bool = True) -> SweepResult:
    """Evaluate the fine-tune with every targeted ΔW truncated to each rank.

    Parameters
    ----------
    base, tuned : str or path
        The pretrained checkpoint and its full fine-tune (model directories with config.json).
    data : str or path
        Eval data: ``.txt`` (language modelling) or ``.jsonl`` of ``{"text"}`` /
        ``{"text", "label"}`` records.
    ranks : sequence of int
        Ranks to evaluate (0 allowed). A module is never truncated above min(out, in).
    plan : RankPlan or path, optional
        Its modules become the targets, and one more point (group ``"plan"``, non-targets
        ``"base"``) is the base with the plan's extracted adapter: each planned module at
        its rank, every other tensor at the base's but for the plan's ``modules_to_save``
        (a classifier's head: the fine-tune's, listed in the point's ``saved_from_tuned``),
        as ``spectra extract --plan`` gives.
    metric : Metric, {"accuracy", "loss", "perplexity"} or callable, optional
        The curve's metric; default accuracy for classification, perplexity for language
        modelling. A callable ``f(logits, batch) -> Tensor (B,)`` gives per-example scores
        (higher is better, averaged); wrap it in :class:`Metric` for anything else. Both
        arguments are on ``config.device``: a tensor the callable creates should be too.
        Loss and accuracy are recorded at every point whatever the metric.
    non_target : {"tuned", "base", "both"}
        Where the non-targeted tensors come from (see the module docstring).
    groups : {"model", "role", "both"}
        ``model``: one rank for every targeted module. ``role``: one role of one stack at a
        time, the other targets kept at the full fine-tune (per-role curves, for per-role
        ranks; a vision tower's q is a curve of its own, "vision q").
    calibration : Calibration or path, optional
        Use the data-optimal truncation (a data file is collected on the base first).
    config : SweepConfig, optional
    progress : bool
        tqdm bar over evaluations.

    Returns
    -------
    SweepResult

    Raises
    ------
    ConfigError
        Bad options, unreadable data, a tuned checkpoint that is an adapter, nothing to target.
    """
    import tqdm

    from spectra.lora.data import prepare_data
    from spectra.lora.train import load_model, model_dir

    config = config or SweepConfig()
    ranks = _check(ranks, non_target, groups)
    if plan is not None and config.stacks is not None:  # before the data, the model and the calibration are read
        raise ConfigError("a plan names the modules to truncate, so stacks (--stacks) would be ignored; plan the "
                          "stacks with `spectra recommend --stacks`, or sweep without a plan.")
    start = time.perf_counter()
    notes: list[str] = []  # the data's, then the calibration's, then the pairing's
    task, tokens, _, label_names, tokenizer = prepare_data(model_dir(tuned), data, task=config.task,
                                                           max_length=config.max_length, notes=notes)
    metric = resolve_metric(metric, task)
    model = load_model(tuned, task=task, device=config.device, pad_token_id=tokenizer.pad_token_id, complete=True,
                       notes=notes)
    if task == "seq_cls" and label_names and len(label_names) > model.config.num_labels:
        raise ConfigError(f"{data} has {len(label_names)} labels ({', '.join(label_names[:5])}) but {tuned}'s "
                          f"classifier has {model.config.num_labels} outputs: eval data of another task?")
    if isinstance(calibration, (str, Path)):
        calibration = collect_calibration(base, calibration, config=CalibrationConfig(
            epsilon=config.calibration_epsilon, max_length=config.max_length, task=task, device=config.device),
            max_length_option="max_length (--max-length)", progress=progress)  # the sweep's option cuts both
    if calibration is not None:
        notes += [n for n in calibration.notes if n not in notes]  # the base cut as the data was: said once
    weights = ModelWeights(model, base, tuned, plan=plan, roles=config.roles, stacks=config.stacks)
    weights.notes[:0] = notes
    top = max((r for r in ranks if r > 0), default=0)
    uncalibrated = []
    changed: dict[str, bool] = {}  # module -> ΔW ≠ 0, noted where ΔW is read anyway (the unreached check's)
    for module in weights.targets:  # one SVD per module, reused at every rank (and at its planned one)
        k = min(max(top, module.plan_rank or 0), module.full_rank)
        if k:
            C = None if calibration is None else calibration.covariance(module.base_tensor)
            if calibration is not None and C is None:
                uncalibrated.append(module.name)
            epsilon = config.calibration_epsilon if calibration is None else calibration.config.epsilon
            delta = weights.delta(module)
            changed[module.name] = bool(delta.any())
            U, S, Vw, _ = truncation_factors(delta, k, covariance=C, epsilon=epsilon,
                                             full_below=config.full_below, seed=config.seed)
            module.factors = (U, S, Vw)
    unrelated = unrelated_note(size for size in weights.relative_sizes.values() if size)  # as analyze warns
    if unrelated:
        weights.notes.append(unrelated)
    if uncalibrated:  # as extract_adapter(calibration=...) truncates them
        weights.notes.append(f"{len(uncalibrated)} targeted module(s) have no calibration moments (calibration hooks "
                             "Linear layers: an MoE expert held in a fused parameter, an embedding is none) and are "
                             f"truncated by Eckart–Young, as `spectra extract --calibration` does: "
                             f"{', '.join(uncalibrated[:5])}" + (", …" if len(uncalibrated) > 5 else "") + ".")

    modes = ("tuned", "base") if non_target == "both" else (non_target,)
    plan_ranks = weights.plan_ranks()
    modules = _module_rows(weights.targets)
    curve_of = role_curves(modules)
    curves = [curve_of[t.name] for t in weights.targets]  # each target's role curve: "q", "vision q"
    # the language model's curves first, then each other stack's; within a stack, in the targets' order
    role_groups = sorted(dict.fromkeys(zip((t.stack for t in weights.targets), curves)),
                         key=lambda group: stack_index(group[0]))
    jobs = [("tuned", "reference", "tuned", None), ("base", "reference", "base", None)]  # (mode, group, label, rank)
    for mode in modes:
        if groups in ("model", "both"):
            jobs += [(mode, "model", f"r={r}", r) for r in ranks]
        if groups in ("role", "both"):
            jobs += [(mode, curve, f"{curve} r={r}", r) for _, curve in role_groups for r in ranks]
    if plan_ranks is not None:  # the plan's adapter on the base: not the non-targets of the fine-tune, nor the
        jobs.append(("base", "plan", "plan", None))  # modules it leaves out (one evaluation, whatever the modes)
    stats: dict[tuple, dict] = {}  # configuration -> per-example arrays (identical configurations run once)
    keys = [_key(weights, curves, *job, plan_ranks) for job in jobs]
    bar = tqdm.tqdm(total=len(set(keys)), desc="sweep", unit="eval", disable=not progress, dynamic_ncols=True)

    def evaluate(key: tuple, label: str) -> None:
        if key not in stats:
            if bar.n >= bar.total:  # a check of a flat curve's reach, beyond the planned evaluations
                bar.total += 1
            bar.set_postfix_str(f"{key[0]} non-targets, {label}", refresh=False)
            weights.apply(key[1], non_target=key[0])
            stats[key] = example_stats(model, tokens, metric, batch_size=config.batch_size)
            bar.update(1)

    for job, key in zip(jobs, keys):
        evaluate(key, job[2])
    unreached = _unreached_curves(weights, curves, jobs, keys, stats, evaluate, changed, metric=metric.name)
    bar.close()
    weights.notes += [u["note"] for u in unreached]
    return SweepResult(_summarize(jobs, keys, stats, metric, weights, modules, config, ranks=ranks, non_target=modes,
                                  unreached=unreached, groups=groups, task=task, base=base, tuned=tuned, data=data,
                                  calibration=calibration, label_names=label_names,
                                  seconds=time.perf_counter() - start))


def _whole(r) -> int:
    """A rank as an int: an int or numpy integer; a bool, float or string is refused (TypeError)."""
    if isinstance(r, bool):
        raise TypeError(f"{r!r} is not a rank")
    return operator.index(r)


def _check(ranks, non_target: str, groups: str) -> list[int]:
    if non_target not in NON_TARGET:
        raise ConfigError(f"non_target {non_target!r} is not one of {', '.join(NON_TARGET)}.")
    if groups not in GROUPS:
        raise ConfigError(f"groups {groups!r} is not one of {', '.join(GROUPS)}.")
    try:  # whole numbers only: int(2.7) had swept rank 2 (and True rank 1) and recorded that, not what was asked
        out = sorted({_whole(r) for r in ranks})
    except TypeError:
        raise ConfigError(f"ranks {ranks!r}: expected integers like 1,2,4,8.") from None
    if not out or out[0] < 0:
        raise ConfigError(f"ranks {ranks!r}: give ranks ≥ 0, e.g. 0,1,2,4,8.")
    return out


def _key(weights, curves: list[str], mode: str, group: str, label: str, rank: int | None, plan_ranks) -> tuple:
    """(non-target source, per-module ranks) of a job: what fixes the model's weights. ``curves``: each target's role
    curve (a role ``group`` truncates the targets of its curve only)."""
    full = [m.full_rank for m in weights.targets]
    if group == "reference":
        return mode, tuple(full if label == "tuned" else [0] * len(full))
    if group == "plan":  # the base's non-targets, but for the modules the plan saves whole (weights.plan_source)
        return weights.plan_source, tuple(plan_ranks)
    if group == "model":
        return mode, tuple(min(rank, f) for f in full)
    return mode, tuple(min(rank, m.full_rank) if curve == group else m.full_rank
                       for m, curve in zip(weights.targets, curves))


# ---------------------------------------------------------------------------- unreached curves


def _unreached_curves(weights, curves: list[str], jobs, keys, stats: dict, evaluate, changed: dict[str, bool], *,
                      metric: str) -> list[dict]:
    """The curves the eval data never reaches: their changed modules at rank 0 leave every example's outputs as the
    full fine-tune's.

    A curve (of one non-target source) is a candidate when its swept points all have the same per-example
    statistics, equal to those of its full-rank configuration where that was evaluated (the full fine-tune, for
    non-targets from it): a curve the data reaches moves between ranks, and costs nothing here. A candidate with a
    changed module (ΔW ≠ 0) is evaluated at its full rank and at rank 0 where not yet (``evaluate(key, label)``), and
    is unreached when all give the same statistics, example by example and bit for bit. A curve that moves with the
    sweep's first non-target source is taken as reached with the second (the data runs through the same modules
    whichever side the norms and heads come from; an untargeted MoE router is the exception, and a curve it leaves
    unreached with the base's only is then not marked), so ``non_target="both"`` costs no full-rank evaluation with
    the base's non-targets for a curve the data reaches. A sweep with non-targets from the base alone and one swept
    rank costs that one evaluation.

    Returns
    -------
    list of dict
        One per unreached curve, in the sweep's order: ``group``, ``non_target`` (the sources it is unreached
        with), ``modules`` (its changed modules) and ``note`` (what it means, for the notes and the report).
    """
    points: dict[tuple[str, str], list[tuple]] = {}  # (curve, non-target source) -> its points' configurations
    for (mode, group, *_), key in zip(jobs, keys):
        if group not in ("reference", "plan"):
            points.setdefault((group, mode), []).append(key)
    full = tuple(t.full_rank for t in weights.targets)
    found: dict[str, dict] = {}
    reached = set()  # curves seen to move with the sweep's first non-target source: not checked again with the next
    for (group, mode), swept in points.items():  # the first source's curves first
        if group in reached:
            continue
        reference = stats.get((mode, full))
        first = stats[swept[0]]
        if (not all(_same(stats[k], first) for k in swept[1:])
                or (reference is not None and not _same(first, reference))):
            reached.add(group)  # the curve moves: the data reaches it
            continue
        members = [t for t, curve in zip(weights.targets, curves) if group == "model" or curve == group]
        moved = [t.name for t in members if _changed(weights, t, changed)]
        if not moved:  # ΔW = 0 throughout: flat because nothing changed, not because nothing was reached
            continue
        evaluate((mode, full), "full rank")  # evaluated already unless the non-targets are the base's
        if _same(first, stats[(mode, full)]):
            zero = _key(weights, curves, mode, group, "", 0, None)
            evaluate(zero, f"{group} r=0")
            if _same(stats[zero], first):
                found.setdefault(group, {"group": group, "non_target": [], "modules": moved})["non_target"].append(mode)
                continue
        reached.add(group)
    outputs = "loss" if metric == "loss" else f"loss and {metric}"
    for entry in found.values():
        names = entry["modules"]
        curve = curve_name(entry["group"])
        entry["note"] = (f"{curve} (non-targets from {' and '.join(entry['non_target'])}) is not reached by the eval "
                         f"data: with its {len(names)} changed module(s) at rank 0 (ΔW removed), as at every swept "
                         f"rank, every eval example's {outputs} are exactly the full fine-tune's. The data "
                         "never ran through them (a vision tower on text, an expert the router never picks), so "
                         "the curve says nothing about their rank: no functional rank is read off it, and "
                         "`spectra recommend --functional` gives them their spectral (energy) rank: "
                         + ", ".join(names[:3]) + (", …" if len(names) > 3 else "") + ".")
    return list(found.values())


def _same(a: dict, b: dict) -> bool:
    """Whether two evaluations gave every example the same statistics (metric, loss, accuracy), bit for bit."""
    return all(np.array_equal(a[k], b[k]) for k in ("num", "den", "loss", "correct", "count"))


def _changed(weights, target, changed: dict[str, bool]) -> bool:
    """ΔW ≠ 0 for ``target``, read once (the sweep's SVD loop notes it for the modules it factors)."""
    if target.name not in changed:
        changed[target.name] = bool(weights.delta(target).any())
    return changed[target.name]


# ---------------------------------------------------------------------------- summary


def _module_rows(targets) -> list[dict]:
    """The ``modules`` of ``sweep.json``: each target's name, role, stack (written only when not the language
    model's, as ``analysis.json`` writes it), shape, full and planned rank."""
    return [{"name": m.name, "role": m.role, **({} if m.stack is None else {"stack": m.stack}), "shape": list(m.shape),
             "full_rank": m.full_rank, "plan_rank": m.plan_rank} for m in targets]


def _summarize(jobs, keys, stats, metric: Metric, weights, modules: list[dict], config: SweepConfig, *, ranks,
               non_target, unreached, groups, task, base, tuned, data, calibration, label_names, seconds) -> dict:
    tuned_key = keys[0]
    order = list(dict.fromkeys(keys))  # distinct configurations, tuned first
    num = np.stack([stats[k]["num"] for k in order], axis=1)  # (n, P)
    den = np.stack([stats[k]["den"] for k in order], axis=1)  # (n, P)
    values = metric.pool(num.sum(0), den.sum(0))  # (P,)
    intervals, gaps = _bootstrap(num, den, metric, config, tuned_index=order.index(tuned_key))
    sign = 1.0 if metric.higher_is_better else -1.0

    def point(k: tuple) -> dict:
        i, s = order.index(k), stats[k]
        return {"metric": float(values[i]), "interval": intervals[i], "gap": float(sign * (values[0] - values[i])) + 0.0,
                "gap_interval": gaps[i], "loss": float(s["loss"].sum() / s["count"].sum()),
                "accuracy": float(s["correct"].sum() / s["count"].sum())}

    reference, points = {}, []
    saved = sorted(weights.saved_keys)  # the plan point's tensors from the fine-tune: the modules its adapter saves
    for (mode, group, label, rank), k in zip(jobs, keys):
        if group == "reference":
            reference[label] = point(k)
        else:
            points.append({"group": group, "non_target": mode, "rank": rank, "label": label, **point(k)}
                          | ({"saved_from_tuned": saved} if group == "plan" and saved else {}))
    first = stats[tuned_key]
    return {
        "schema_version": SCHEMA_VERSION, "kind": "truncation_sweep", "base": str(base), "tuned": str(tuned),
        "fingerprints": {side: source.fingerprint()["fingerprint"]  # as `spectra analyze` records them
                         for side, source in (("base", weights.pairing.base), ("tuned", weights.pairing.tuned))},
        "data": str(data), "task": task, "label_names": label_names,
        "metric": {"name": metric.name, "higher_is_better": metric.higher_is_better},
        "examples": int(first["num"].shape[0]), "units": int(first["count"].sum()),
        "unit": "examples" if task == "seq_cls" else "tokens",
        "truncation": "eckart-young" if calibration is None else "data-optimal",
        "ranks": ranks, "non_target": list(non_target), "groups": groups,
        # the replicates run: none for one eval example (nothing to resample), with the reason
        "bootstrap": {"replicates": config.bootstrap if first["num"].shape[0] >= 2 else 0,
                      "confidence": config.confidence, "seed": config.seed, "resampled": "eval examples"}
        | ({"none_because": "bootstrap=0" if config.bootstrap == 0 else "one eval example: nothing to resample"}
           if config.bootstrap == 0 or first["num"].shape[0] < 2 else {}),
        "reference": reference, "points": points,
        "modules": modules, "unreached": unreached,
        "config": asdict(config), "calibration": None if calibration is None else calibration.describe(),
        "notes": list(weights.notes), "evaluations": len(stats), "seconds": seconds,
    }


def _bootstrap(num: np.ndarray, den: np.ndarray, metric: Metric, config: SweepConfig, *, tuned_index: int
               ) -> tuple[list, list]:
    """Percentile intervals of each point's metric and of its paired gap to the full fine-tune."""
    n, P = num.shape
    if config.bootstrap == 0 or n < 2:
        return [None] * P, [None] * P
    rng = np.random.default_rng(config.seed)
    sign = 1.0 if metric.higher_is_better else -1.0
    vals, gaps = [], []
    for start in range(0, config.bootstrap, 200):  # chunks bound the (B, n) weights in memory
        b = min(200, config.bootstrap - start)
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # (b, n) resampling counts
        v = metric.pool(w @ num, w @ den)  # (b, P)
        vals.append(v)
        gaps.append(sign * (v[:, [tuned_index]] - v))  # paired: same resample for both
    lo, hi = (1 - config.confidence) / 2, (1 + config.confidence) / 2
    qv = np.quantile(np.concatenate(vals), [lo, hi], axis=0)  # (2, P)
    qg = np.quantile(np.concatenate(gaps), [lo, hi], axis=0)  # (2, P)
    return ([[float(qv[0, i]), float(qv[1, i])] for i in range(P)],
            [[float(qg[0, i]) + 0.0, float(qg[1, i]) + 0.0] for i in range(P)])  # + 0.0: no −0.0 in sweep.json
