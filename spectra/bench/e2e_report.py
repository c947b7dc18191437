"""``e2e.md`` / ``e2e.json`` from the end-to-end benchmark's measurements, with issue 8's targets."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from spectra.files import write_text_atomic


def _fmt(x, digits: int = 1) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def _ratio(a, b) -> float | None:
    return None if not a or not b else a / b


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("**met**" if ok else "**not met**")


def targets(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) rows. A ``--quick`` run (a tiny pair) measures no speed target: its floors are
    milliseconds, so their ratios say nothing; the rank and resume checks still hold."""
    rows = _targets(res)
    if res.get("quick"):
        speed = ("wall ≤", "≥ 10×", "≥ 3×", "torchrun")
        rows = [(t, m, "not measured (--quick: a tiny pair)" if t.startswith(speed) else v) for t, m, v in rows]
    return rows


def _targets(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    d, f = res.get("spectra_default", {}), res.get("floors", {})
    wall, rss = d.get("analysis_s"), d.get("peak_anon_mb")
    floor = (f.get("io_s") or 0) + (f.get("gemm_default_s") or 0)
    rows = [("wall ≤ 1.5 × (I/O floor + GEMM floor)",
             f"{_fmt(wall)} s vs {_fmt(f.get('io_s'))} + {_fmt(f.get('gemm_default_s'))} s = "
             f"{_fmt(_ratio(wall, floor), 2)}×", _verdict(None if wall is None else wall <= 1.5 * floor)),
            ("peak anonymous RSS ≤ 1.5 GB", f"{_fmt(rss, 0)} MB", _verdict(None if rss is None else rss <= 1536))]
    agree = res.get("rank_agreement_0.9")
    rows.append(("energy-90% ranks within ±1 of full SVD on every module",
                 "—" if not agree else f"{agree['within_1']}/{agree['modules']} within ±1, {agree['exact']} exact, "
                                       f"max \\|Δ\\| {agree['max_abs_diff']}",
                 _verdict(None if not agree else agree["within_1"] == agree["modules"])))
    full = res.get("spectra_full", {}).get("analysis_s")
    speed = _ratio(full, wall)
    rows.append(("≥ 10× faster than forced full SVD", f"{_fmt(speed)}×", _verdict(None if speed is None else speed >= 10)))
    # A peer that exited with an error did no comparable work: it is listed, not compared.
    peers = [(k, v.get("wall_s"), v.get("timeout_s")) for k, v in (res.get("peers") or {}).items()
             if "unavailable" not in v and not (v.get("rc") and not v.get("killed"))]
    if peers:
        finished = [w for _, w, _ in peers if w]
        fastest = min(finished) if finished else None
        lower = min(t for _, w, t in peers if not w) if len(finished) < len(peers) else None
        best = min(x for x in (fastest, lower) if x)
        # a peer runs once: it meets spectra's slower default run, so that noise does not favour spectra
        slow = max((r["analysis_s"] for r in d.get("runs") or [] if r.get("analysis_s")), default=wall)
        ok = best / slow >= 3 if slow else None
        note = (f"fastest peer {_fmt(best)} s{' (did not finish; lower bound)' if fastest is None else ''} against "
                f"spectra's slower run, {_fmt(slow)} s → {_fmt(best / slow if slow else None)}×")
        rows.append(("≥ 3× faster than the fastest installed peer", note, _verdict(ok)))
    else:
        rows.append(("≥ 3× faster than the fastest installed peer", "no peer run", _verdict(None)))
    one, two = res.get("one_rank_one_thread", {}).get("analysis_s"), res.get("torchrun_two_ranks", {}).get("analysis_s")
    s = _ratio(one, two)
    same = res.get("torchrun_identical", "—")
    if isinstance(same, list):
        same = "identical rows" if not same else "rows differ in " + ", ".join(same)
    rows.append(("torchrun 2 ranks × 1 thread vs 1 × 1: ≥ 1.7×", f"{_fmt(s, 2)}× ({same})",
                 _verdict(None if s is None else s >= 1.7)))
    k = res.get("killed")
    if k:
        r = res.get("resumed", {})
        agree = res.get("resume_matches_default") or {}
        rows.append(("resume after SIGKILL midway",
                     f"killed with {k.get('cached_at_kill')} modules cached (with parallel workers the largest "
                     f"run first, so that is past half the work); resumed in {_fmt(r.get('analysis_s'))} s "
                     f"({(r.get('timings') or {}).get('modules_cached')} read back); ranks equal to the "
                     f"uninterrupted run on {agree.get('exact')}/{agree.get('modules')}",
                     _verdict(bool(r.get("rc") == 0 and agree.get("exact") == agree.get("modules")))))
    return rows


def write_report(res: dict[str, Any], out: str | os.PathLike, *, ground_truth: Path, rows: dict) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    truth = json.loads(Path(ground_truth).read_text())["modules"] if Path(ground_truth).exists() else {}
    default = {m["name"]: m for m in rows.get("spectra_default", []) if m["kind"] == "matrix"}
    planted = [abs(default[n]["energy_rank"]["0.9"] - t["planted_energy_rank_0.9"]) for n, t in truth.items()
               if n in default and default[n]["energy_rank"].get("0.9") is not None and t.get("planted_energy_rank_0.9")]
    res["vs_planted"] = {"modules": len(planted), "median_abs_diff": sorted(planted)[len(planted) // 2] if planted else None}
    lines = ["# spectra analyze, end to end", "",
             f"Pair: `{res['pair']}` ({res['shape']}, bf16, made by `spectra bench make-pair`), {res['cpus']} CPUs. "
             "Every run is a separate process on the same pair, one after the other, page cache warm "
             "(a read pass precedes them). Peak RSS is anonymous memory of the process tree, sampled every 50 ms. "
             "The machine may be shared with other jobs: compare ratios within this table, not with other runs. "
             "Every quantity a target compares (the read pass, the GEMM probe, and each timed spectra run) is "
             "measured twice, in two passes over the list, and the faster kept, so that a busy neighbour "
             "flatters neither side of a ratio; both times are given where two were taken. The peers run once "
             "(minutes each) and are compared with spectra's slower default run.", "",
             *[f"Note: {n}" for n in res.get("notes", [])], "",
             "| run | wall s | analysis s | peak anon RSS MB | modules/s |", "|---|---|---|---|---|"]
    io = res.get("io_floor", {})
    reads = "" if len(io.get("reads_s") or []) < 2 else " (faster of " + " and ".join(
        f"{_fmt(x)} s" for x in io["reads_s"]) + ")"
    lines.append(f"| I/O floor: read every byte of both checkpoints ({io.get('bytes', 0) / 1e9:.1f} GB){reads} | "
                 f"{_fmt(io.get('wall_s'))} | {_fmt(io.get('read_s'))} | {_fmt(io.get('peak_anon_mb'), 0)} | |")
    if io.get("stream_s") is not None:
        lines.append(f"| stream floor: read, up-cast to fp32 and subtract every pair (spectra's exact_difference, same process) | | "
                     f"{_fmt(io.get('stream_s'))} | | |")
    names = [ ("spectra_default", "spectra, default (auto)"),
             ("spectra_full", "spectra, forced full spectrum (method=full)"),
             ("one_rank_one_thread", "spectra, 1 rank × 1 thread, no read-ahead"),
             ("flop_count", "spectra, 1 rank × 1 thread, under the flop-counting dispatch mode (timed against "
                            "nothing: the mode slows every op)"),
             ("torchrun_two_ranks", "spectra under torchrun, 2 ranks × 1 thread"),
             ("killed", "spectra, SIGKILLed midway"), ("resumed", "spectra, resumed from the cache")]
    for key, label in names:
        r = res.get(key)
        if r:
            t = r.get("timings") or {}
            if key.startswith("spectra_") and t.get("workers"):
                label += f", {t['workers']} workers × {t.get('threads_per_worker', '?')} thread(s)"
            if key == "spectra_default" and r.get("sketch_dtype"):
                label += f", sketch power steps in {r['sketch_dtype']} (auto)"
            if len(r.get("runs") or []) > 1:
                label += ("; the faster of two runs (analysis "
                          + " and ".join(f"{_fmt(x.get('analysis_s'))} s" for x in r["runs"])
                          + "; peak RSS the larger)")
            lines.append(f"| {label} | {_fmt(r.get('wall_s'))} | {_fmt(r.get('analysis_s'))} | "
                         f"{_fmt(r.get('peak_anon_mb'), 0)} | {_fmt(r.get('modules_per_s'), 2)} |")
    for key, r in (res.get("peers") or {}).items():
        if "unavailable" in r:
            lines.append(f"| peer {key} | {r['unavailable']} | | | |")
        else:
            if r.get("rc") and not r.get("killed"):
                last = (r.get("tail") or "").strip().splitlines()[-1:] or ["?"]
                lines.append(f"| peer {key} | failed (exit {r['rc']}: {last[0][:120]}) | | | |")
                continue
            wall = _fmt(r.get("wall_s")) if r.get("wall_s") else f"> {r.get('timeout_s'):.0f} (stopped)"
            lines.append(f"| peer {key} | {wall} | | {_fmt(r.get('peak_anon_mb'), 0)} | |")
    f = res.get("floors", {})
    rates = res.get("gemm_rates", {})
    lines += ["", "## Floors", "",
              "- GEMM rates measured here"
              + (" (the faster of a probe in each pass)" if res.get("gemm_probes") == 2 else "")
              + ": "
              + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()) + ".",
              "- Default method's GEMM flops (counted per dtype by a torch dispatch mode in a 1×1 run of their own; every "
              "product, the full path's float64 Gram included): "
              + ", ".join(f"{k} {v / 1e9:.0f} GFLOP" for k, v in (f.get("default_flops") or {}).items())
              + f" → GEMM floor {_fmt(f.get('gemm_default_s'))} s.",
              f"- Forced full spectrum, fp64 Gram products alone: GEMM floor {_fmt(f.get('gemm_full_s'))} s "
              "(the eigen-solves come on top).", "",
              "## Targets (issue 8)", "", "| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in targets(res)]
    vp = res["vs_planted"]
    lines += ["", f"Against the generator's planted energy-90% rank (computed from the planted signal and tail, "
                  f"before bf16 rounding): median |Δ| {vp['median_abs_diff']} over {vp['modules']} modules "
                  "(rounding noise adds energy, so measured ranks sit a little above the planted ones).", "",
              "## What each peer does", "",
              "- **WeightWatcher** `analyze(base_model=…)`: loads both models whole (float32), forms W − W_base per "
              "layer and computes its full eigenvalue spectrum plus power-law fits; closest to spectra's analysis, "
              "more work per layer (fits), and no streaming.",
              "- **mergekit** `extract_lora --max-rank 64`: a truncated SVD per module to write a LoRA adapter; the "
              "same decomposition spectra needs, but with vectors and written to disk.", ""]
    write_text_atomic(out / "e2e.json", json.dumps(res, indent=1, default=str))
    return write_text_atomic(out / "e2e.md", "\n".join(lines) + "\n")
