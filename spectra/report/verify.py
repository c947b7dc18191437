"""Reports of ``spectra verify``: one adapter against a full fine-tune, or a rank sweep.

Same shape as the analysis report (:mod:`spectra.report.render`): JSON, Markdown and a
self-contained HTML page rendered from one list of blocks, figures as PNG and SVG, and
the directory built beside its destination and renamed into place when complete.
Figures are :class:`matplotlib.figure.Figure` objects built without ``pyplot``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from spectra.errors import ConfigError
from spectra.files import command_of, record_origin, record_writer
from spectra.report.plots import whole_ticks
from spectra.report.tables import num, pct
from spectra.report.render import plain, write_bundle
from spectra.report.sweep import signed

_ROW_COLUMNS = (("module", "name", "s"), ("rank (used)", "rank", "rank"), ("captured (col)", "captured_energy", "%"),
                ("Eckart–Young", "optimal_energy", "%"), ("captured (row)", "captured_energy_row", "%"),
                ("φ(k, r)", "phi", "f"), ("rel. error", "relative_error", "f"),
                ("amplification ad/full", ("amplification_adapter", "amplification_full"), "2f"),
                ("intruders ad/full", ("intruders_adapter", "intruders_full"), "2d"), ("NF4 error", "quant_error", "%"))

_PLAIN_ERROR = "rel. error: ‖ΔW_adapter − ΔW_full‖_F / ‖ΔW_full‖_F."
_QLORA_ERROR = ("rel. error: ‖W₀ + ΔW_adapter − W_tuned‖_F / ‖ΔW_full‖_F, W₀ the 4-bit base (it holds W₀'s NF4 "
                "error); rel. error (none): ‖W₀ − W_tuned‖_F / ‖ΔW_full‖_F, no update's, which a module's "
                "adapter is 'worse than' where its error is larger (– where W₀ is W_base).")
_COLUMN_LEGEND = (
    "rank (used): the adapter's rank r (and the directions its factors use, where fewer). captured (col) / (row): "
    "share of ‖ΔW_full‖_F² inside the adapter's column / row space; Eckart–Young: the most any rank-r update could "
    "capture. φ(k, r): subspace similarity of the adapter's top-k and the full update's top-r left singular vectors "
    "(LoRA §7; 1 = same subspace). rel. error: ‖ΔW_adapter − ΔW_full‖_F / ‖ΔW_full‖_F. amplification ad/full: "
    "‖ΔW‖_F / ‖Uᵀ W V‖_F for the adapter's and the full update's top-r directions (LoRA §7, Table 7). intruders "
    "ad/full: top singular vectors of the tuned weight with no close match among the base's (Shuttleworth et al. "
    "2024). NF4 error: ‖W₀ − W_base‖_F / ‖W_base‖_F of QLoRA's quantised base.")

# ---------------------------------------------------------------------------- writing


def write_verify_report(result: Mapping, out_dir, *, overwrite: bool = False) -> Path:
    """Write a verify result as ``verify.json``, ``report.md``, ``report.html``, ``figures/``, atomically.

    ``verify.json`` says ``"command": "verify --adapter"`` (:data:`spectra.files.RECORD_WRITERS`).
    """
    _refuse_other_writer(result, "verify --adapter", "write_verify_report")
    if not result.get("modules"):
        raise ConfigError("the verify result has no module rows; nothing to report.")
    figures = {"energy": plot_energy(result)}
    if result.get("phi_matrices"):
        figures["phi"] = plot_phi(result["phi_matrices"], title="φ(ΔW_adapter, ΔW_full, i, j), left singular "
                                                                 "vectors (LoRA §7.2)")
    return write_bundle(out_dir, "verify.json", result, figures, verify_blocks, command="verify",
                        overwrite=overwrite, writer="verify --adapter")


def write_sweep_report(sweep: Mapping, out_dir, *, overwrite: bool = False) -> Path:
    """Write a rank sweep as ``sweep.json``, ``report.md``, ``report.html``, ``figures/``, atomically.

    ``sweep.json`` says ``"command": "verify --sweep"``: `spectra sweep` writes a ``sweep.json`` too (a truncation
    sweep), and neither replaces (``overwrite``) nor reads the other's (:data:`spectra.files.RECORD_WRITERS`).
    """
    _refuse_other_writer(sweep, "verify --sweep", "write_sweep_report")
    if not sweep.get("runs"):
        raise ConfigError("the sweep has no runs; nothing to report.")
    return write_bundle(out_dir, "sweep.json", sweep, sweep_figures(sweep), sweep_blocks, command="verify",
                        overwrite=overwrite, writer="verify --sweep")


def _refuse_other_writer(data: Mapping, writer: str, function: str) -> None:
    """Refuse data that says another command wrote it (a truncation sweep given to the rank sweep's writer)."""
    if record_writer(data) not in (None, writer):
        raise ConfigError(f"the given data is {record_origin(data)}; {function} writes "
                          f"{record_origin({'command': writer})}.")


def sweep_figures(sweep: Mapping) -> dict[str, Figure]:
    """The sweep's figures by name: captured energy vs rank, eval vs rank, φ between ranks."""
    figures = {"sweep_energy": plot_sweep_energy(sweep)}
    if any(r.get("eval") for r in sweep["runs"]):
        figures["sweep_eval"] = plot_sweep_eval(sweep)
    if sweep.get("phi_between_ranks"):
        figures["sweep_phi"] = plot_phi({f"{p['module']} ({p['method']})": p["matrix"]
                                         for p in sweep["phi_between_ranks"]},
                                        title="φ(A_low, A_high, i, j) between adapter ranks, right singular "
                                              "vectors (LoRA §7.2, Fig. 3)",
                                        labels=("i (low rank)", "j (high rank)"))
    return figures


# ---------------------------------------------------------------------------- blocks


def verify_blocks(result: Mapping, *, figures: list[str]) -> list[tuple]:
    """The verify report as render blocks (headings, summary, eval table, figures, per-module table)."""
    s = result.get("summary", {})
    adapter = result.get("adapter") or {}
    blocks: list[tuple] = [("h", 1, "spectra verify: does the adapter capture the fine-tune's update?"),
                           ("p", headline(s)), ("h", 2, "Summary"), ("ul", [
                               f"Adapter: {adapter.get('path', '?')} ({adapter.get('method', '?')}"
                               f"{', NF4 base' if adapter.get('quantized') else ''}), ranks {s.get('ranks')}",
                               f"Full fine-tune: {(result.get('tuned') or {}).get('path', '?')}",
                               f"Adapted modules: {s.get('modules')}, holding {pct(s.get('coverage'))} of ‖ΔW_full‖²",
                               f"Captured in the adapter's column space: {pct(s.get('captured_energy'))} "
                               f"(row space {pct(s.get('captured_energy_row'))}); Eckart–Young optimum at the "
                               f"same ranks {pct(s.get('optimal_energy'))}",
                               f"φ(k, r), energy-weighted (k: the directions the adapter uses, r unless its factors are "
                               f"rank-deficient): {num(s.get('phi'))}; intruder dimensions: adapter "
                               f"{s.get('intruders_adapter')}, full fine-tune {s.get('intruders_full')}",
                           ] + ([f"NF4 quantisation error of W₀ (mean ‖ΔQ‖/‖W₀‖): {pct(s['quant_error'])}"]
                                if s.get("quant_error") is not None else []))]
    if result.get("evals"):
        blocks += [("h", 2, "Eval"), ("table", list(EVAL_HEADERS), eval_rows(result["evals"])),
                   ("p", "svd: W_base + the rank-r truncated SVD of ΔW_full on the adapted modules (what "
                         "`spectra extract` writes at the adapter's ranks). loss gap: the loss minus the full "
                         "fine-tune's (positive: worse)."
                         + (" adapter: a LoRA on a tied weight merged, as merge_and_unload() leaves it (the tied "
                            "modules move together, as in the full fine-tune and svd); adapter_unmerged: PEFT's "
                            "unmerged model, where the tied module keeps the base weight (see the notes)."
                            if "adapter_unmerged" in result["evals"] else ""))]
    blocks.append(("h", 2, "Figures"))
    captions = {"energy": "Share of ‖ΔW_full‖² in each adapter's column space (bars) vs the Eckart–Young "
                          "optimum at the same rank (ticks): no adapter can exceed its tick.",
                "phi": "Subspace similarity φ(i, j) between the adapter's top-i and the full update's top-j "
                       "left singular vectors, for the modules with the largest updates."}
    blocks += [("figure", f, captions.get(f, f)) for f in figures]
    columns, legend = _ROW_COLUMNS, _COLUMN_LEGEND
    if _quantised(result.get("summary") or {}):  # QLoRA: the error is of W₀ + ΔW_adapter, beside W₀'s own
        at = [c[1] for c in columns].index("relative_error") + 1
        columns = (*columns[:at], ("rel. error (none)", "relative_error_none", "f"), *columns[at:])
        legend = legend.replace(_PLAIN_ERROR, _QLORA_ERROR)
    blocks += [("h", 2, "Per module"), ("table", [c[0] for c in columns],
                                        [[_cell(row, key, kind) for _, key, kind in columns]
                                         for row in result["modules"]]),
               ("p", legend)]
    if result.get("notes"):
        blocks += [("h", 3, "Notes"), ("ul", list(result["notes"]))]
    blocks += [("h", 2, "Configuration"), ("code", json.dumps(plain(result.get("config", {})), indent=2))]
    return blocks


def headline(summary: Mapping) -> str:
    """'The adapter captured 41 % of the full fine-tune's update in the modules it adapts, where rank 8 could
    capture 78 % (…)'; the share of the whole update those modules hold follows when it is not all of it (the
    headline had read as a share of the whole update)."""
    ranks = summary.get("ranks") or []
    at = f"rank {ranks[0]}" if len(ranks) == 1 else "the same ranks"
    coverage = summary.get("coverage")
    whole = ("" if coverage is None or coverage >= 0.9995 else
             f" Those modules hold {pct(coverage)} of the whole update's ‖ΔW_full‖_F².")
    worse, error = summary.get("worse_than_none") or 0, summary.get("relative_error")
    # the shares measure spaces, blind to sign: an adapter of −ΔW_full (BASE and TUNED swapped) "captured" all of it
    farther = ("‖W₀ + ΔW_adapter − W_tuned‖ > ‖W₀ − W_tuned‖, W₀ the 4-bit base" if _quantised(summary)
               else "‖ΔW_adapter − ΔW_full‖ > ‖ΔW_full‖")
    wrong = ("" if not worse else
             f" But in {worse} of {summary.get('modules', '')} modules its update is farther from the fine-tune's "
             f"than no update at all ({farther}; relative error "
             + (f"{error:.2f} overall" if error is not None else "above 1")
             + "): the shares measure column spaces, not direction or size (a flipped sign, BASE and TUNED "
               "swapped, or an update larger than the fine-tune's there).")
    return (f"The adapter captured {pct(summary.get('captured_energy'))} of the full fine-tune's update in the "
            f"{summary.get('modules', '')} modules it adapts (share of their ‖ΔW_full‖_F² in its column spaces) where "
            f"{at} could capture {pct(summary.get('optimal_energy'))} (Eckart–Young).{whole}{wrong}")


# ---------------------------------------------------------------------------- tables (report and terminal)

EVAL_HEADERS = ("model", "loss", "loss gap", "accuracy")
SWEEP_HEADERS = ("method", "rank", "params", "captured", "Eckart–Young", "φ(r, r)", "intruders", "eval loss",
                 "eval accuracy", "SVD eval loss", "step (ms)")


def _quantised(summary: Mapping) -> bool:
    """Whether QLoRA stored some adapted module in 4 bits: its relative error is then of W₀ + ΔW_adapter, W₀ the
    dequantised base, against W_tuned (ΔW_adapter may undo some of W₀'s NF4 error)."""
    return summary.get("quant_error") is not None


def summary_rows(summary: Mapping) -> list[list[str]]:
    """The verify summary's headline measures as (measure, value) rows: what `spectra verify` prints."""
    error = ("relative error ‖W₀ + ΔW_adapter − W_tuned‖/‖ΔW_full‖ (W₀ 4-bit)" if _quantised(summary)
             else "relative error ‖ΔW_adapter − ΔW_full‖/‖ΔW_full‖")
    return [["captured (column space)", pct(summary.get("captured_energy"))],
            ["captured (row space)", pct(summary.get("captured_energy_row"))],
            ["Eckart–Young optimum at the same ranks", pct(summary.get("optimal_energy"))],
            ["φ(k, r), energy-weighted", num(summary.get("phi"))],
            [error, num(summary.get("relative_error"))],
            ["intruder dimensions adapter / full", f"{_text(summary.get('intruders_adapter'))} / "
                                                   f"{_text(summary.get('intruders_full'))}"]]


def eval_rows(evals: Mapping) -> list[list[str]]:
    """One row per evaluated model (base, tuned, adapter, svd): loss, its gap to the full fine-tune's loss
    (positive: worse) and accuracy."""
    tuned = (evals.get("tuned") or {}).get("loss")
    return [[name, num(v.get("loss")),
             "–" if tuned is None or v.get("loss") is None else signed(v["loss"] - tuned), pct(v.get("accuracy"))]
            for name, v in evals.items()]


def sweep_rows(sweep: Mapping) -> list[list[str]]:
    """One row per run of a rank sweep, in the columns of :data:`SWEEP_HEADERS`."""
    return [[r["method"], str(r["rank"]), f"{r['trainable_params']:,}", pct(r.get("captured_energy")),
             pct(r.get("optimal_energy")), num(r.get("phi")), _text(r.get("intruders_adapter")),
             num((r.get("eval") or {}).get("loss")), pct((r.get("eval") or {}).get("accuracy")),
             num((r.get("svd_eval") or {}).get("loss")),
             "–" if r.get("step_median_s") is None else f"{1e3 * r['step_median_s']:.1f}"] for r in sweep["runs"]]


def reference_lines(sweep: Mapping) -> list[str]:
    """'tuned eval: loss 0.4, accuracy 90.0%' for the full fine-tune and the base a sweep was measured against."""
    return [f"{k} eval: loss {num(v.get('loss'))}, accuracy {pct(v.get('accuracy'))}"
            for k, v in (sweep.get("reference_evals") or {}).items()]


def _text(value) -> str:
    return "–" if value is None else str(value)


def sweep_blocks(sweep: Mapping, *, figures: list[str]) -> list[tuple]:
    """The sweep report as render blocks."""
    blocks: list[tuple] = [("h", 1, "spectra verify: rank sweep"),
                           ("ul", [f"Base: {sweep.get('base')}", f"Full fine-tune: {sweep.get('tuned')}",
                                   f"Data: {sweep.get('data')}; eval: {sweep.get('eval_data')}",
                                   f"Recommended rank (spectra recommend): {sweep.get('recommended_rank') or '–'}"]
                            + reference_lines(sweep)),
                           ("h", 2, "Runs"), ("table", list(SWEEP_HEADERS), sweep_rows(sweep)),
                           ("p", "step (ms): median time of an optimiser step (forward, backward, update) after the "
                                 "first, which includes warm-up; a run of one step shows that step."),
                           ("h", 2, "Figures")]
    captions = {"sweep_energy": "Captured share of ‖ΔW_full‖² vs rank: trained adapters (solid) against the "
                                "Eckart–Young optimum (dashed); the dotted line marks the recommended rank.",
                "sweep_eval": "Eval metric vs rank, with the full fine-tune and base as horizontal lines.",
                "sweep_phi": "How much of the low-rank adapter's subspace the high-rank adapter contains."}
    blocks += [("figure", f, captions.get(f, f)) for f in figures]
    blocks += [("h", 2, "Training configuration"),
               ("p", "Shared by every run; each run's method and rank are its row's in the table above."),
               ("code", json.dumps(plain(sweep.get("train_config", {})), indent=2))]
    return blocks


# ---------------------------------------------------------------------------- figures


def plot_energy(result: Mapping) -> Figure:
    """Per module: captured energy (bar) and the Eckart–Young optimum at its rank (tick)."""
    rows = [r for r in result["modules"] if r.get("captured_energy") is not None]
    fig = Figure(figsize=(8, max(2.5, 0.28 * len(rows) + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(rows))
    ax.barh(y, [r["captured_energy"] for r in rows], color="tab:blue", label="captured (column space)")
    ax.scatter([r["optimal_energy"] for r in rows], y, marker="|", s=200, color="black",
               label="Eckart–Young optimum at the rank", zorder=3)
    ax.set_yticks(y, [f"{r['name']} (r={r['rank']})" for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of ‖ΔW_full‖²")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("Captured share of each module's full update vs the best at the adapter's rank", fontsize=9)
    return fig


def plot_phi(matrices: Mapping[str, list], *, title: str, labels=("i (adapter)", "j (full fine-tune)")) -> Figure:
    """φ heatmaps, one panel per entry of ``matrices`` (name → (I, J) nested list)."""
    names = list(matrices)
    cols = min(2, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(5.2 * cols, 2.4 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    image = None
    for ax, name in zip(axes, names):
        grid = np.asarray(matrices[name], dtype=np.float64)  # (I, J)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="upper",
                          extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
        ax.set_title(name, fontsize=8)
        ax.set_xlabel(labels[1], fontsize=8)
        ax.set_ylabel(labels[0], fontsize=8)
        ax.xaxis.set_major_locator(whole_ticks())  # i and j count directions: no 0.5, 1.5, …
        ax.yaxis.set_major_locator(whole_ticks())
    for ax in axes[len(names):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=list(axes[:len(names)]), label="φ")
    fig.suptitle(title, fontsize=9)
    return fig


def plot_sweep_energy(sweep: Mapping) -> Figure:
    """Captured energy vs rank per method, the Eckart–Young curve, and the recommended rank."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.add_subplot()
    runs = sweep["runs"]
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        ax.plot([r["rank"] for r in mine], [r["captured_energy"] for r in mine], marker="o", label=method)
    optimal = sorted({(r["rank"], r["optimal_energy"]) for r in runs if r.get("optimal_energy") is not None})
    ax.plot([o[0] for o in optimal], [o[1] for o in optimal], ls="--", color="black", label="Eckart–Young optimum")
    _mark_recommended(ax, sweep)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("rank r")
    ax.set_ylabel("share of ‖ΔW_full‖² captured")
    ax.set_title("Captured share of the full update vs rank: trained adapters against the Eckart–Young optimum",
                 fontsize=9)
    ax.legend(fontsize=8)
    return fig


def plot_sweep_eval(sweep: Mapping) -> Figure:
    """Eval loss and accuracy vs rank per method, with the full fine-tune and base lines."""
    fig = Figure(figsize=(10, 3.8), layout="constrained")
    runs, ref = sweep["runs"], sweep.get("reference_evals") or {}
    for ax, metric in zip(fig.subplots(1, 2), ("loss", "accuracy")):
        for method in dict.fromkeys(r["method"] for r in runs):
            mine = [r for r in runs if r["method"] == method and r.get("eval")]
            ax.plot([r["rank"] for r in mine], [r["eval"][metric] for r in mine], marker="o", label=method)
        svd = sorted({(r["rank"], r["svd_eval"][metric]) for r in runs if r.get("svd_eval")})
        if svd:
            ax.plot([s[0] for s in svd], [s[1] for s in svd], ls="--", marker="x", color="0.4", label="SVD of ΔW_full")
        for name, style in (("tuned", dict(color="black", ls="-")), ("base", dict(color="0.6", ls=":"))):
            if name in ref:
                ax.axhline(ref[name][metric], lw=1.2, label="full fine-tune" if name == "tuned" else name, **style)
        _mark_recommended(ax, sweep)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("rank r")
        ax.set_ylabel(f"eval {metric}")
        ax.legend(fontsize=7)
    fig.suptitle("Eval loss and accuracy vs rank: trained adapters, the SVD of ΔW_full, the full fine-tune and the base",
                 fontsize=9)
    return fig


def _mark_recommended(ax, sweep: Mapping) -> None:
    rank = sweep.get("recommended_rank")
    if rank:
        ax.axvline(rank, color="tab:red", ls=":", lw=1.5, label=f"recommended r={rank}")


# ---------------------------------------------------------------------------- cells


def _cell(row: Mapping, key, kind: str) -> str:
    if isinstance(key, tuple):
        a, b = (row.get(k) for k in key)
        fmt = (lambda v: "–" if v is None else f"{v:.2f}") if kind == "2f" else (lambda v: "–" if v is None else str(v))
        return f"{fmt(a)} / {fmt(b)}"
    value = row.get(key)
    if kind == "rank":  # the nominal rank, and the directions s·B·A really has when fewer
        used = row.get("effective_adapter_rank")
        return str(value) if used is None or used == value else f"{value} ({used})"
    if kind == "%":
        return pct(value)
    if kind == "f":
        return num(value)
    return "–" if value is None else str(value)




def load_result(path: str | os.PathLike) -> dict:
    """Read ``verify.json`` or ``sweep.json`` (or the report directory holding one) that `spectra verify` wrote.

    A ``sweep.json`` of `spectra sweep` (a truncation sweep: :func:`spectra.ranks.read_sweep` reads it) is refused
    by its ``"command"``, or its ``"kind"`` where older.
    """
    path = Path(path)
    if path.is_dir():
        path = next((path / n for n in ("verify.json", "sweep.json") if (path / n).is_file()), path / "verify.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read {path}: {err}") from None
    writer = record_writer(data)
    if writer is not None and command_of(writer) != "verify":
        raise ConfigError(f"{path} is {record_origin(data)}; load_result reads the reports of `spectra verify` "
                          "(verify.json of --adapter, sweep.json of --sweep).")
    return data
