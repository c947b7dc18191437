"""The demo's one report: its first screen answers the four questions a newcomer asks."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from spectra.report.plots import plot_decay, plot_rank_heatmap
from spectra.report.render import write_bundle
from spectra.report.sweep import plot_truncation_curve
from spectra.report.tables import num, pct
from spectra.report.verify import plot_sweep_energy, plot_sweep_eval


def write_demo_report(summary: Mapping, analysis: Mapping, sweep: Mapping, out_dir, *,
                      truncation: Mapping | None = None) -> Path:
    """``demo.json``, ``report.md``, ``report.html`` and ``figures/`` in ``out_dir`` (replaced atomically)."""
    figures = {"decay": plot_decay(analysis), "rank_heatmap": plot_rank_heatmap(analysis),
               "sweep_energy": plot_sweep_energy(sweep)}
    if truncation is not None:
        func = summary.get("functional") or {}
        marks = {f"recommended (energy {summary['config']['energy']:g})": summary["recommended_rank"]}
        if func.get("rank") is not None:
            marks[f"functional (within {func['epsilon']:g})"] = func["rank"]
        figures["functional"] = plot_truncation_curve(truncation, marks=marks)
    if any(r.get("eval") for r in sweep["runs"]):
        figures["sweep_eval"] = plot_sweep_eval(sweep)
    return write_bundle(out_dir, "demo.json", summary, figures, demo_blocks, command="demo", overwrite=True)


def headline(s: Mapping) -> str:
    """The rank picture in three sentences, from the numbers."""
    roles = [r for r in s["roles"] if r.get("energy_rank_0.9") is not None]
    median = (s.get("modules") or {}).get("share_0.9")  # over modules, not over the roles' medians
    median = float("nan") if median is None else median
    rank = s["recommended_rank"]
    acc = {k: (v or {}).get("accuracy") for k, v in s["evals"].items()}
    lora = s["adapters"].get("lora", {})
    return (f"90% of each update's energy sits in a median of {median:.0%} of the full rank (per role: "
            + ", ".join(f"{r['role']} {r['energy_rank_0.9']:g}/{r['full_rank']:g}" for r in roles) + "). "
            f"spectra recommends rank {rank} for every module ({s['uniform_plan']['params']:,} adapter parameters, "
            f"{pct(s['uniform_plan']['energy'])} of ‖ΔW‖²). "
            f"A LoRA trained at rank {rank} captured {pct(lora.get('captured_energy'))} of the full update's energy "
            f"where the best rank-{rank} approximation holds {pct(lora.get('optimal_energy'))}, and reached "
            f"{pct(acc.get(f'lora (trained, rank {rank})'))} test accuracy against the full fine-tune's "
            f"{pct(acc.get('full fine-tune'))} (base: {pct(acc.get('base'))}).")


def demo_blocks(s: Mapping, *, figures: list[str]) -> list[tuple]:
    rank = s["recommended_rank"]
    blocks: list[tuple] = [
        ("h", 1, "spectra demo: how much rank did this fine-tune use, and which LoRA rank captures it?"),
        ("p", headline(s)),
        ("h", 2, "1. How low-rank was the fine-tune, per module type?"),
        ("table", ["role", "modules", "full rank", "energy-90% rank (median)", "rank above noise floor (median)",
                   "entropy effective rank (median)"],
         [[r["role"], str(r["modules"]), f"{r['full_rank']:g}", _rank(r["energy_rank_0.9"]), _rank(r["noise_rank"]),
           _num(r["effective_rank"])] for r in s["roles"]]),
        ("h", 2, "2. What rank spectra recommends, and what it costs"),
        ("ul", [f"Uniform rank {rank} on {', '.join(sorted({r['role'] for r in s['roles']}))}: "
                f"{s['uniform_plan']['params']:,} parameters, {pct(s['uniform_plan']['energy'])} of ‖ΔW‖² captured",
                f"Per-module ranks at the same energy target: {s['per_module_plan']['params']:,} parameters, "
                f"{pct(s['per_module_plan']['energy'])} of ‖ΔW‖²"]
         + [f"Training memory, {method} at rank {rank} (batch {s['config']['batch_size']} × "
            f"{s['config']['max_length']} tokens, fp32): "
            + (_gib(m["training_total"]) if "training_total" in m else m.get("error", "?"))
            for method, m in s["memory"].items()]),
        ("h", 2, "3. How much of the full fine-tune did the adapters capture?"),
        ("table", ["adapter", f"captured energy (rank {rank})", "Eckart–Young optimum", "φ(r, r)"],
         [[m, pct(v["captured_energy"]), pct(v["optimal_energy"]), _num(v["phi"])]
          for m, v in s["adapters"].items()]),
        ("p", "Captured energy: share of ‖ΔW_full‖² inside the adapter's column space. No adapter of rank r "
              "can exceed the Eckart–Young optimum, the energy of ΔW_full's own top r directions."),
        ("h", 2, "4. Test accuracy"),
        ("table", ["model", "accuracy", "loss"],
         [[k, pct((v or {}).get("accuracy")), _num((v or {}).get("loss"))] for k, v in s["evals"].items()]),
        ("p", "extracted (SVD): the base plus the best rank-r approximation of each module's ΔW, with the "
              "fine-tuned head — what `spectra extract` writes, with no training."),
        ("h", 2, "5. Rank sweep (LoRA)"),
        ("table", ["rank", "captured energy", "Eckart–Young optimum", "accuracy (trained)", "accuracy (extracted)"],
         [[str(r["rank"]), pct(r["captured_energy"]), pct(r["optimal_energy"]), pct(r["accuracy"]),
           pct(r["svd_accuracy"])] for r in s["sweep"]]),
    ]
    func = s.get("functional")
    if func:
        median90 = (s.get("modules") or {}).get("energy_rank_0.9")  # over modules
        blocks += [
            ("h", 2, "6. Energy rank vs functional rank"),
            ("p", f"Energy counts the directions that hold 90% of ‖ΔW‖² (median {_rank(median90)} per module); the "
                  f"task may need fewer. Replacing every targeted ΔW by its best rank-r truncation, with no "
                  f"training, the smallest rank whose test accuracy stays within {func['epsilon']:g} of the full "
                  f"fine-tune's is {func['rank'] if func['rank'] is not None else 'not reached in the sweep'} "
                  f"({func['examples']} test examples; "
                  + ("the bootstrap interval of the gap lies within ε" if func.get("resolved") else
                     "the eval set is too small for the bootstrap interval of the gap to lie within ε")
                  + ")."),
            ("table", ["rank", "accuracy (truncated ΔW)", "95% interval"],
             [[str(p["rank"]), pct(p["accuracy"]), _interval(p.get("interval"))] for p in func["points"]]),
        ]
    blocks.append(("h", 2, "Figures"))
    captions = {
        "decay": "Singular-value decay of ΔW per role (σᵢ/σ₁, log scale; one line per layer).",
        "rank_heatmap": "Energy-90% rank of ΔW by layer and role.",
        "sweep_energy": "Captured energy vs rank: trained LoRA vs the Eckart–Young optimum; the recommended rank "
                        "is marked.",
        "sweep_eval": "Test accuracy vs rank, with the base and the full fine-tune as lines.",
        "functional": "Test accuracy with every targeted ΔW truncated to rank r (no training), the base and the "
                      "full fine-tune as lines, the recommended and the functional rank marked.",
    }
    blocks += [("figure", f, captions.get(f, f)) for f in figures]
    blocks += [("h", 2, "How this was made"),
               ("p", f"Base: {s['base']}. Data: docstrings of the Python standard library "
                     "labelled by area (spectra.demo.data). Regenerate with `spectra demo`."),
               ("code", json.dumps(s["config"], indent=2))]
    return blocks


def _num(x) -> str:
    return num(x, digits=3)  # the demo's first screen: three digits are plenty


def _rank(x) -> str:
    """A median of integer ranks, whole or .5, as is (three digits would print 106.5 as 106)."""
    return "–" if x is None else f"{x:g}"


def _interval(iv) -> str:
    return "–" if not iv else f"{100 * iv[0]:.1f}–{100 * iv[1]:.1f}%"


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"
