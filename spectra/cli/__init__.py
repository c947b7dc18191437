"""The ``spectra`` command line: parse, make one library call, print or write.

Heavy imports (torch, transformers, matplotlib) happen inside commands so that
``spectra --help`` answers at once. All math lives in the library.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape  # module names hold brackets ("c_attn[q]") that rich would read as markup

from spectra.checkpoints.architectures import STACKS, parse_stacks  # no torch: the names --stacks takes

app = typer.Typer(
    name="spectra",
    help=(
        "Spectral analysis of fine-tuning weight updates.\n\n"
        "Measure how much rank a fine-tune really used (ΔW = W_tuned − W_base, per module) "
        "and which LoRA rank would have captured it."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Benchmarks of this machine, side by side with peers; results under reports/bench/.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")

_state = {"debug": False}
# --stacks of every command with --roles: the stacks by the names the reports print (architectures.STACK_NAMES)
_STACKS_HELP = ("Comma-separated stacks to keep, with --roles: language (the language model; reports call it "
                f"'language model', or 'decoder' beside an encoder), {', '.join(STACKS)} — what a report's "
                "'vision q' starts with. E.g. --roles q,v "
                "--stacks language: the language model's q and v, not the vision tower's (--roles alone takes "
                "both, as PEFT's target_modules do); --stacks vision: the vision tower only. Default: every stack.")
# --task of train and sweep: the choices, and what each wants of the data
_TASK_HELP = ("auto (default: seq2seq_lm for an encoder-decoder such as T5 or BART, else seq_cls when every record has "
              "a label, else causal_lm), causal_lm (text: .txt, or {\"text\"} records), seq_cls ({\"text\", \"label\"} "
              "records) or seq2seq_lm (an encoder-decoder learns to write target from source: .jsonl of "
              "{\"source\": ..., \"target\": ...} records, or .csv/.tsv with source,target columns; the loss is over "
              "target tokens).")

_OVERWRITE_HELP = ("Replace an existing output directory that this command wrote, or an empty one; a folder holding "
                   "any other file is refused, naming it.")


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------------------- checkpoints


@app.command()
def pairs(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint: directory, .safetensors/.bin file, index JSON or hub id.")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same forms), or a PEFT adapter directory.")],
    roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles to keep, e.g. q,k,v,o.")] = None,
    stacks: Annotated[Optional[str], typer.Option(help=_STACKS_HELP)] = None,
    layers: Annotated[Optional[str], typer.Option(help="Layer range FIRST-LAST (inclusive), e.g. 0-11.")] = None,
    include: Annotated[Optional[str], typer.Option(help="Keep only names matching this glob (or re:REGEX).")] = None,
    exclude: Annotated[Optional[str], typer.Option(help="Drop names matching this glob (or re:REGEX).")] = None,
) -> None:
    """List the ΔW pairs spectra finds in BASE × TUNED (names, roles, layers, shapes), without any math.

    The selection options are `spectra analyze`'s: what this lists is what it would analyse.
    """
    from rich.console import Console

    from spectra.checkpoints.pairing import Pairing, PairingOptions
    from spectra.report.tables import stack_label

    options = PairingOptions(roles=_split(roles), stacks=_stacks(stacks), layers=_layer_range(layers),
                             include=include, exclude=exclude, load=False)
    pairing = Pairing(base, tuned, options)
    deltas = list(pairing)
    chosen = [f"--{flag} {value}" for flag, value in (("roles", roles), ("stacks", stacks), ("layers", layers),
                                                       ("include", include), ("exclude", exclude)) if value is not None]
    if not deltas and chosen:  # an empty untitled table, exit 0, said nothing
        from spectra.errors import ConfigError

        raise ConfigError(f"no ΔW pair of {base} × {tuned} matches {', '.join(chosen)}; `spectra pairs BASE TUNED` "
                          "without them lists every pair, with its name, role and layer.")
    experts = any(d.expert is not None for d in deltas)  # the column only for mixture-of-experts models
    show_stacks = any(d.stack is not None for d in deltas)  # and for checkpoints of several stacks (a vision tower)
    shown = {d.stack for d in deltas}
    rows = [(*((stack_label(d.stack, shown),) if show_stacks else ()), d.role, _fmt(d.layer),
             *((_fmt(d.expert),) if experts else ()), "×".join(map(str, d.shape)),
             f"{d.base_format or d.base_dtype}→{d.tuned_format or d.tuned_dtype}", d.kind) for d in deltas]
    headers = (*(("stack",) if show_stacks else ()), "role", "layer", *(("expert",) if experts else ()), "shape", "dtypes",
               "kind")
    console = Console()
    console.print(_module_table(f"{len(deltas)} ΔW pairs", [d.name for d in deltas], rows, headers))
    for label, names in (("only in BASE, not paired", pairing.only_in_base),
                         ("only in TUNED, not paired", pairing.only_in_tuned)):
        if names:  # what does not pair is what a user runs `pairs` to find
            console.print(escape(f"{len(names)} tensor(s) {label}: " + ", ".join(list(names)[:5])
                                 + (", …" if len(names) > 5 else "")), style="yellow")
    for note in pairing.notes:
        console.print(escape(f"note: {note}"), style="yellow")


# ---------------------------------------------------------------------------- demo


@app.command()
def demo(
    output: Annotated[Path, typer.Option("-o", "--output", help="Where the demo report goes (replaced if `spectra demo` wrote it or it is empty; a folder holding any other file is refused).")] = Path("reports/demo"),
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache of the demo pair and adapters (default $SPECTRA_CACHE or ~/.cache/spectra).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Another BERT-family checkpoint to run the demo on (default: all-MiniLM-L6-v2 from the demo extra).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """The whole story on a real pretrained model, offline: fine-tune all-MiniLM-L6-v2 on a text task,
    analyse the update, recommend a LoRA rank, extract and train adapters at it, and verify them.

    The first run builds the pair (a few minutes on a laptop CPU); later runs reuse the cache.
    """
    _writable(output, base, cache_dir, command="demo", overwrite=True)  # replaced if spectra demo wrote it, or empty
    import time

    from spectra.demo.run import DemoConfig, run_demo

    start = time.perf_counter()
    result = run_demo(DemoConfig(base=base), out_dir=output, cache_dir=cache_dir, progress=not quiet)
    from spectra.demo.report import headline

    typer.echo("\n" + headline(result.summary))
    typer.echo("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()))
    typer.echo(f"report: {result.out_dir / 'report.html'}  (also report.md, demo.json, figures/) — "
               f"{time.perf_counter() - start:.0f} s in all")


# ---------------------------------------------------------------------------- analyze


@app.command()
def analyze(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint: directory, .safetensors/.bin file, index JSON or hub id.")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same forms), or a PEFT adapter directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory to write (refused if it exists, unless --overwrite).")] = Path("reports/analysis"),
    method: Annotated[str, typer.Option(help="SVD: auto (the exact spectrum up to --full-below, the bf16 energy sketch above), full, sketch, "
                                               "adaptive (block Krylov to the energy rank), randomized (top --max-rank, default 256).")] = "auto",
    max_rank: Annotated[Optional[int], typer.Option(help="Cap on singular values computed by the randomized/adaptive paths.")] = None,
    full_below: Annotated[int, typer.Option(help="Short side at or below which 'auto' takes the exact full spectrum.")] = 1024,
    energy: Annotated[str, typer.Option(help="Comma-separated energy fractions whose ranks are reported.")] = "0.5,0.9,0.95,0.99",
    roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles to analyse (q, k, v, o, qkv, q_a, q_b, kv_a, kv_b, xq, xk, xv, xo, gate, up, down, gate_up, embed, head, other; q_a…kv_b: DeepSeek's latent attention, q taking q_a and q_b; xq…xo: an encoder–decoder's cross-attention).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help=_STACKS_HELP)] = None,
    layers: Annotated[Optional[str], typer.Option(help="Layer range FIRST-LAST (inclusive), e.g. 0-11.")] = None,
    include: Annotated[Optional[str], typer.Option(help="Only modules whose name matches this glob (or re:REGEX).")] = None,
    exclude: Annotated[Optional[str], typer.Option(help="Skip modules whose name matches this glob (or re:REGEX).")] = None,
    dtype: Annotated[str, typer.Option(help="Dtype of ΔW and its SVD: float32 or float64.")] = "float32",
    device: Annotated[str, typer.Option(help="Torch device for the math: cpu, cuda, cuda:1.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the randomized paths.")] = 0,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache of finished modules (default $SPECTRA_CACHE or ~/.cache/spectra).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute everything and cache nothing.")] = False,
    skip_nonfinite: Annotated[bool, typer.Option("--skip-nonfinite", help="Skip tensors holding NaN/Inf instead of stopping.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no summary (tensors it could not pair are still named, on stderr).")] = False,
    resolve: Annotated[float, typer.Option(help="Energy whose rank the fast 'sketch' path resolves exactly; higher --energy levels are reported when within reach.")] = 0.9,
    workers: Annotated[Optional[int], typer.Option(help="Modules analysed at once, each on its own thread with (torch threads ÷ workers) threads. Default: one per torch thread up to 4 on the CPU, 1 on a GPU.")] = None,
    read_ahead: Annotated[int, typer.Option(help="With one worker: modules read ahead of the math (0: read in line).")] = 2,
    read_ahead_mb: Annotated[int, typer.Option(help="Most ΔW data (MB, float32) held by the modules in flight (one always goes); bounds peak memory. An adapter's expert factors held across a module come out of what it holds beyond room for the two largest modules; more is held on top, with a warning.")] = 512,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration data (.txt, or .jsonl/.csv/.tsv with a text field): also report each ΔW's activation-weighted spectrum, ΔW·C^{1/2} on the base's inputs.")] = None,
    calibration_epsilon: Annotated[float, typer.Option(help="Ridge of the input second moment C, relative to its mean eigenvalue.")] = 1e-6,
    base_rounding: Annotated[str, typer.Option(help="Is the base's rounding in ΔW? auto (decided per module from ΔW's residual: when in doubt, counted), exact (the fine-tune started from the base's stored values, e.g. a bf16 release tuned and saved in bf16: only the fine-tune's rounding is noise), counted (both were rounded from finer weights, e.g. two bf16 releases trained in fp32).")] = "auto",
) -> None:
    """Measure the spectrum of every ΔW = TUNED − BASE and write a report (JSON, Markdown, HTML, figures).

    Example: spectra analyze ./llama-base ./llama-tuned -o reports/run1 --roles q,v
    (a VLM's language model alone: --stacks language; its vision tower alone: --stacks vision)

    Under torchrun (`torchrun --nproc-per-node 4 $(which spectra) analyze BASE TUNED -o out`) the modules
    are shared across ranks and rank 0 writes the report.
    """
    _writable(output, base, tuned, calibration, command="analyze", overwrite=overwrite)  # before the work
    from spectra.analysis import AnalysisConfig
    from spectra.analysis import analyze as run_analysis
    from spectra.errors import ConfigError

    import os

    main_rank = os.environ.get("RANK", "0") == "0"
    try:
        thresholds = tuple(float(t) for t in energy.split(","))
    except ValueError:
        raise ConfigError(f"--energy {energy!r}: expected comma-separated fractions like 0.5,0.9,0.99.") from None
    config = AnalysisConfig(method=method, full_below=full_below, max_rank=max_rank, thresholds=thresholds,
                            roles=_split(roles), stacks=_stacks(stacks), layers=_layer_range(layers),
                            include=include, exclude=exclude, dtype=dtype, device=device, seed=seed, resolve=resolve,
                            on_nonfinite="skip" if skip_nonfinite else "error",
                            calibration=str(calibration) if calibration else None,
                            calibration_epsilon=calibration_epsilon, base_rounding=base_rounding)
    result = run_analysis(base, tuned, config, cache_dir=False if no_cache else (cache_dir or True), progress=not quiet,
                          read_ahead=read_ahead, read_ahead_mb=read_ahead_mb, workers=workers)
    if not main_rank:
        return  # under torchrun every rank holds the whole result; rank 0 writes it
    path = result.write_report(output, overwrite=overwrite)
    if not quiet:
        _print_summary(result.to_dict())
    _print_notes(result.to_dict(), quiet=quiet)  # a warning: shown under -q too (on stderr there)
    typer.echo(f"report: {path / 'report.html'}  (also report.md, analysis.json, figures/)")


@app.command()
def show(report: Annotated[Path, typer.Argument(help="A report directory written by `spectra analyze`, or its analysis.json.")]) -> None:
    """Print a report's summary: the rank picture and the per-role table."""
    from spectra.analysis import AnalysisResult

    analysis = AnalysisResult.load(report).to_dict()
    _print_summary(analysis)
    _print_notes(analysis)


def _print_summary(analysis: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    from spectra.report.tables import headline_level, percent, rank_picture, role_table, role_table_note

    console = Console()
    headers, rows = role_table(analysis)
    if not rows:  # every matrix unchanged (ΔW = 0): no table, the note says why
        console.print(escape(role_table_note(analysis)))
        console.print(escape(rank_picture(analysis)))
        return
    # the terminal gets the columns that decide a rank, at the headline energy level; report.md has them all
    level = percent(headline_level(analysis))
    short = f"E{level.removesuffix('%')}"
    columns = _TERMINAL_COLUMNS | {f"energy-{level} rank": short, f"energy-{level} rank / full rank": f"{short}/full"}
    keep = [i for i, h in enumerate(headers) if h in columns]
    table = Table(title="ΔW spectra by role: median over modules (min–max)",
                  caption=f"{short}: energy-{level} rank · eff.: entropy effective rank · >noise: singular values "
                          "above the dtype noise floor (– where the sketch held none below it) · report.md has every "
                          "column")
    for i in keep:  # wrap a long (min–max) range rather than cut it
        table.add_column(columns[headers[i]], overflow="fold")
    for row in rows:
        table.add_row(*(escape(row[i]) for i in keep))
    console.print(table)
    console.print(escape(rank_picture(analysis)))  # names the unchanged matrices the table leaves out


def _print_notes(analysis: dict, *, quiet: bool = False) -> None:
    """Name the tensors only in BASE or TUNED, or skipped, give the pairing's notes (the first three) and say what the
    calibration decided (its notes): report.md lists them too, but a user reading only the terminal must not miss
    them (with ``-q`` on stderr, which -q leaves for warnings)."""
    from rich.console import Console

    console = Console(stderr=quiet)
    pairing = analysis.get("pairing") or {}
    for key, label in (("only_in_base", "only in BASE, not analysed"), ("only_in_tuned", "only in TUNED, not analysed"),
                       ("skipped", "skipped (--skip-nonfinite)")):
        listed = [str(x) for x in pairing.get(key) or []]
        if listed:
            console.print(escape(f"note: {len(listed)} tensor(s) {label}: " + ", ".join(listed[:3])
                                 + (", …" if len(listed) > 3 else "") + " (report.md lists them all)"), style="yellow")
    notes = [str(n) for n in pairing.get("notes") or []]  # tied weights, resized vocabularies, skipped buffers
    for note in notes[:3]:
        console.print(escape(f"note: {note}"), style="yellow")
    if len(notes) > 3:
        console.print(escape(f"note: {len(notes) - 3} more pairing note(s) (report.md lists them all)"), style="yellow")
    unrelated = _unrelated_size(analysis)
    if unrelated is not None:
        console.print(escape(
            f"warning: the median module's ‖ΔW‖/‖W‖ is {unrelated:.2f}: TUNED differs from BASE by as much as the "
            f"weights themselves (two independent initialisations of one architecture give √2 ≈ 1.41; a fine-tune "
            f"moves a weight by a small fraction of it). Check that TUNED is a fine-tune of BASE."), style="yellow")
    for note in (analysis.get("calibration") or {}).get("notes") or []:  # e.g. texts cut at the model's positions
        # a note that names the calibration's own option ("calibration max_length: …") says it is the calibration's
        console.print(escape(f"note: {note}" if note.startswith("calibration") else f"note: calibration: {note}"),
                      style="yellow")


# the median ‖ΔW‖/‖W‖ from which a pair reads as two unrelated checkpoints: ΔW as large as W itself is no fine-tune
# (independent initialisations of one architecture give √2; full fine-tunes move weights by well under 1)
_UNRELATED_SIZE = 1.0


def _unrelated_size(analysis: dict) -> float | None:
    """The median ‖ΔW‖/‖W‖ over the changed weight matrices (fused tensors by projection) when it reaches
    ``_UNRELATED_SIZE``, else None."""
    import statistics

    from spectra.report.tables import by_projection, matrix_rows, unchanged

    sizes = [float(r["relative_size"]) for r in by_projection(matrix_rows(analysis))
             if not unchanged(r) and r.get("relative_size") is not None]
    median = statistics.median(sizes) if sizes else None
    return median if median is not None and median >= _UNRELATED_SIZE else None


# the columns that decide a rank, with labels short enough for an 80-column terminal
# (and the headline energy level's rank and share, E90 and E90/full by default)
_TERMINAL_COLUMNS = {"role": "role", "modules": "n", "full rank": "full", "entropy effective rank": "eff.",
                     "rank above noise floor": ">noise", "‖ΔW‖/‖W‖": "‖ΔW‖/‖W‖"}


def _analysis_or_pair(sources: list[str]):
    """One path → that analysis; two → analyse the pair now (cached), quietly."""
    from spectra.errors import ConfigError

    if len(sources) == 1:
        return sources[0]
    if len(sources) == 2:
        from spectra.analysis import analyze as run_analysis

        return run_analysis(sources[0], sources[1], progress=True)
    raise ConfigError(f"expected an analysis (one path) or a BASE TUNED pair (two), got {len(sources)} arguments.")


def _analysed_checkpoints(sources: list[str]) -> list[str]:
    """The BASE and TUNED paths an analysis file records (absolute; none where it cannot be read: recommend then
    refuses the analysis itself, with the reason)."""
    import json

    if len(sources) != 1:
        return []
    path = Path(sources[0])
    try:
        data = json.loads((path / "analysis.json" if path.is_dir() else path).read_text())
        return [data[side]["path"] for side in ("base", "tuned") if isinstance(data[side]["path"], str)]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _layer_range(value: str | None) -> tuple[int, int] | None:
    from spectra.errors import ConfigError

    if value is None:
        return None
    first, sep, last = value.partition("-")
    try:
        span = (int(first), int(last if sep else first))
    except ValueError:
        raise ConfigError(f"--layers {value!r}: expected FIRST-LAST, e.g. 0-11, or one layer, e.g. 5.") from None
    if not 0 <= span[0] <= span[1]:
        raise ConfigError(f"--layers {value!r}: FIRST-LAST with 0 ≤ FIRST ≤ LAST, e.g. 0-11.")
    return span


# ---------------------------------------------------------------------------- recommend


@app.command()
def recommend(
    analysis: Annotated[list[str], typer.Argument(help="analysis.json or the report directory of `spectra analyze`; or "
                                                       "BASE TUNED, which are analysed first (cached).")],
    energy: Annotated[Optional[float], typer.Option(help="Per-module energy target τ (default 0.9 unless a budget, "
                                                         "--rank or --knee decides).")] = None,
    noise: Annotated[bool, typer.Option(help="Cap ranks at the noise floor.")] = True,
    knee: Annotated[bool, typer.Option(help="Also target the elbow of the energy curve.")] = False,
    uniform: Annotated[bool, typer.Option(help="One power-of-two rank meeting the energy target on --uniform-share "
                                               "of modules.")] = False,
    uniform_share: Annotated[float, typer.Option(help="Share of modules the uniform rank must satisfy.")] = 0.9,
    rank: Annotated[Optional[int], typer.Option(help="One fixed rank for every module.")] = None,
    budget: Annotated[Optional[str], typer.Option(help="Parameters (20M) or bytes of trainable state (2GB).")] = None,
    min_rank: Annotated[int, typer.Option(help="Smallest rank of a targeted module.")] = 1,
    max_rank: Annotated[Optional[int], typer.Option(help="Largest rank of any module.")] = None,
    power_of_two: Annotated[bool, typer.Option(help="Round ranks up to powers of two.")] = False,
    roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles to target, e.g. q,k,v,o (q also takes cross-attention's xq; xq only it).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help=_STACKS_HELP)] = None,
    include: Annotated[Optional[str], typer.Option(help="Target only names matching this glob (or re:REGEX).")] = None,
    rslora: Annotated[bool, typer.Option(help="Scale by α/√r (rsLoRA).")] = False,
    dora: Annotated[bool, typer.Option(help="Plan DoRA (adds magnitude vectors).")] = False,
    alpha_rule: Annotated[str, typer.Option(help="'scale': same update scale for all; 'constant': one α.")] = "scale",
    scale: Annotated[Optional[float], typer.Option(help="Common update scale for alpha-rule=scale (α = scale·r; "
                                                        "default 2).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="Common α for alpha-rule=constant (default 16).")] = None,
    functional: Annotated[Optional[float], typer.Option(
        help="ε in the sweep metric's units: each module gets the smallest swept rank whose truncated model stays "
             "within ε of the full fine-tune (per role when the sweep has role curves). Needs --sweep; replaces "
             "--energy/--knee.")] = None,
    sweep: Annotated[Optional[Path], typer.Option(help="Truncation sweep of the same pair (the directory or "
                                                       "sweep.json of `spectra sweep`), for --functional.")] = None,
    config: Annotated[Optional[str], typer.Option(help="Model config (file, dir or hub id) for the memory estimate "
                                                       "and for the module names of the plan's peft_config; default: "
                                                       "the analysed base, if local.")] = None,
    method: Annotated[str, typer.Option(help="Method for the memory estimate: lora, qlora or dora.")] = "lora",
    # min=1: refused as the command's input, where the library's refusal would read as "memory: no estimate"
    batch: Annotated[int, typer.Option(min=1, help="Batch size for the memory estimate.")] = 1,
    seq_len: Annotated[Optional[int], typer.Option(min=1, help="Sequence length for the memory estimate (default "
                                                               "2048, or the model's position limit when "
                                                               "shorter).")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write the plan (with its PEFT config) "
                                                                          "as JSON here (refused if it exists, unless "
                                                                          "--overwrite).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON instead of a table.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing -o file.")] = False,
) -> None:
    """Recommend per-module LoRA ranks from an analysis, under an optional budget, as a PEFT-ready plan.

    Examples: spectra recommend reports/run --budget 20M -o plan.json;
    spectra recommend reports/run --functional 0.01 --sweep reports/sweep -o plan.json
    """
    # what recommend reads: the analysis (its file: the report folder's other files stay writable), the checkpoints
    # it measured (the plan's memory estimate reads the base's config.json), the sweep and the config
    _writable(output, *(Path(a) / "analysis.json" if Path(a).is_dir() and len(analysis) == 1 else a
                        for a in analysis), *_analysed_checkpoints(analysis), sweep, config, overwrite=overwrite)
    import json
    import warnings

    from rich.console import Console

    from spectra.errors import ConfigError, PeftConfigWarning
    from spectra.memory import estimate_memory, format_bytes, load_config
    from spectra.ranks import RankPolicy, parse_budget, recommend_ranks, save_plan
    from spectra.ranks.plan import base_config

    budget_kw = parse_budget(budget) if budget is not None else {}
    ignored = {"scale": "--alpha", "constant": "--scale"}.get(alpha_rule)
    if ignored and (alpha if alpha_rule == "scale" else scale) is not None:
        raise ConfigError(f"{ignored} has no effect under --alpha-rule {alpha_rule} (" + (
            "α = scale·r: set --scale, or pass --alpha-rule constant for one α)." if alpha_rule == "scale" else
            "one α for every module: set --alpha, or pass --alpha-rule scale for α = scale·r)."))
    if rank is not None and (energy is not None or knee):
        raise ConfigError(f"--rank {rank} gives every module that rank; {'--energy' if energy is not None else '--knee'}"
                          " would be ignored. Leave one out (a uniform rank from an energy target: --uniform).")
    if (functional is None) != (sweep is None):
        raise ConfigError("--functional ε and --sweep DIR go together: the sweep measured the function at each "
                          "rank, ε says how close to the full fine-tune it must stay.")
    if energy is None and not (budget_kw or rank is not None or knee or functional is not None):
        energy = 0.9
    if method not in ("lora", "qlora", "dora"):
        raise ConfigError(f"--method {method!r}: the memory estimate takes lora, qlora or dora.")
    policy = RankPolicy(energy=energy, noise=noise, knee=knee, uniform=uniform, uniform_share=uniform_share,
                        rank=rank, min_rank=min_rank, max_rank=max_rank, power_of_two=power_of_two,
                        roles=_split(roles), stacks=_stacks(stacks), include=include, rslora=rslora, use_dora=dora,
                        alpha_rule=alpha_rule,
                        scale=2.0 if scale is None else scale, alpha=16.0 if alpha is None else alpha,
                        functional=functional, **budget_kw)
    plan = recommend_ranks(_analysis_or_pair(analysis), policy, sweep=sweep)
    source = config or base_config(plan.base)  # the config.json beside the analysed base (a folder or a file)
    est, memory_skipped = None, None
    if source:
        try:
            est = estimate_memory(source, method="dora" if dora else method, rank_plan_or_rank=plan, batch=batch,
                                  seq_len=seq_len)
        except ConfigError as exc:  # the estimate is an extra: a model the memory model lacks still gets its plan
            memory_skipped = str(exc)
    notes = []
    if output is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PeftConfigWarning)  # printed below from the plan, with the report
            save_plan(plan, output, model_config=load_config(config) if config else None)
        notes = json.loads(output.read_text()).get("peft_config_notes") or []
    if as_json:
        memory = {"memory": est.to_dict() if est else None}
        if memory_skipped:
            memory["memory_skipped"] = memory_skipped
        typer.echo(json.dumps(plan.to_dict() | memory, indent=2))
        return
    console = Console()
    rows = [(_fmt(m.role), "×".join(map(str, m.shape)), str(m.rank), f"{m.alpha:g}",
             f"{m.energy:.1%}" + ("" if m.energy == m.energy_upper else f"–{m.energy_upper:.1%}"), f"{m.params:,}",
             m.reason) for m in plan.modules]
    table = _module_table(f"LoRA plan: {len(plan.modules)} modules, {plan.total_params:,} parameters, "
                          f"{plan.total_energy:.1%} of ΔW energy captured", [m.name for m in plan.modules], rows,
                          ("role", "shape", "rank", "alpha", "energy", "params", "reason"), fold=("reason",))
    console.print(table)
    if plan.left_out:
        console.print(escape(f"left out ({len(plan.left_out)}): " + ", ".join(
            f"{m.name} [{m.reason}; rank {_fmt(m.rank)}]" for m in plan.left_out)))
    if plan.budget_gap:
        console.print(f"budget allocation within {plan.budget_gap:.2%} of ΔW energy of the optimum")
    if est is not None:
        console.print(f"memory ({est.method}, batch {batch} × {est.seq_len} tokens, {est.precision}): "
                      + ", ".join(f"{name} {format_bytes(n)}" for name, n in est.rows() if n))
        for note in est.notes:
            console.print(escape(f"memory note: {note}"), style="yellow")
    elif memory_skipped:
        console.print(escape(f"memory: no estimate ({memory_skipped})"), style="yellow")
    else:
        console.print("memory: pass --config (config.json, its folder or a hub id) for an estimate")
    for note in notes:
        console.print(escape(f"peft_config: {note}"), style="yellow")
    if output is not None:
        console.print(escape(f"plan written to {output}"))


# ---------------------------------------------------------------------------- extract


@app.command()
def extract(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint (directory, file, index JSON or hub id).")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same forms), or a PEFT adapter directory (its "
                                              "merge onto BASE, re-extracted at --rank or --plan).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter directory to write (refused if it exists, unless --overwrite).")],
    plan: Annotated[Optional[Path], typer.Option(help="Plan JSON from `spectra recommend` (per-module ranks and alphas).")] = None,
    rank: Annotated[Optional[str], typer.Option(help="One rank for every targeted module, or 'full' for a lossless adapter.")] = None,
    roles: Annotated[Optional[str], typer.Option(help="With --rank: roles to target (default q, k, v, o, gate, up, down; q also takes cross-attention's xq, k xk, v xv, o xo, and DeepSeek's q_a and q_b; k and v its kv_a and kv_b).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help="With --rank: c" + _STACKS_HELP.removeprefix("C"))] = None,
    alpha: Annotated[Optional[float], typer.Option(help="With --rank: lora_alpha (default scale 2: 2·rank, 2·√rank with --rslora).")] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="With --rank: rsLoRA scaling α/√r.")] = False,
    modules_to_save: Annotated[Optional[str], typer.Option(help="Comma-separated modules copied whole from TUNED, e.g. classifier.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration data (.txt, or .jsonl/.csv/.tsv with a text field): each module's data-optimal rank-r update, best on the base's inputs for these texts (SVD-LLM), instead of the plain truncated SVD.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP)] = False,
    device: Annotated[str, typer.Option(help="Torch device for ΔW and its SVD: cpu, cuda, cuda:1.")] = "cpu",
    workers: Annotated[Optional[int], typer.Option(help="Modules decomposed at once, each on its own thread with (torch threads ÷ workers) threads. Default: one per torch thread up to 4 on the CPU, 1 on a GPU.")] = None,
    model_class: Annotated[Optional[str], typer.Option(
        help="transformers class the adapter is for, whose module names its keys use, e.g. LlamaForCausalLM "
             "(default: the base's class; the tuned one's when only it has the modules the adapter needs).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no table.")] = False,
) -> None:
    """Write a PEFT LoRA adapter whose merge is the best rank-r approximation of TUNED − BASE.

    Examples: spectra extract BASE TUNED --rank 8 --roles q,k,v,o,up,down --modules-to-save classifier -o adapter/
              spectra extract BASE TUNED --plan plan.json -o adapter/
              spectra extract VLM_BASE VLM_TUNED --rank 16 --roles q,v --stacks language -o adapter/
    """
    _writable(output, base, tuned, plan, calibration, command="extract", overwrite=overwrite)
    import warnings

    from spectra.errors import ConfigError, PeftConfigWarning
    from spectra.lora.extract import extract_adapter

    if (plan is None) == (rank is None):
        raise ConfigError("pass exactly one of --plan PLAN.json or --rank R (an integer, or 'full').")
    given = [flag for flag, value in (("--roles", roles), ("--stacks", stacks), ("--alpha", alpha),
                                      ("--rslora", rslora or None)) if value is not None]
    if plan is not None and given:
        raise ConfigError(f"--plan sets every module's rank and α; {', '.join(given)} would be ignored. Plan other "
                          "roles, stacks or scaling with `spectra recommend` (--roles, --stacks, --rslora), or "
                          "extract with --rank.")
    if roles is not None:
        from spectra.checkpoints.architectures import ROLES

        unknown = sorted(set(_split(roles) or ()) - set(ROLES))
        if unknown:
            raise ConfigError(f"--roles: unknown role(s) {', '.join(unknown)}; choose from {', '.join(ROLES)}.")
    if rank is not None and rank != "full" and not rank.isdigit():
        raise ConfigError(f"--rank {rank!r}: expected a positive integer or 'full'.")
    target = plan if plan is not None else (rank if rank == "full" else int(rank))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftConfigWarning)  # printed below, after the table
        result = extract_adapter(base, tuned, target, output, roles=_split(roles), stacks=_stacks(stacks),
                                 alpha=alpha, rslora=rslora,
                                 modules_to_save=_split(modules_to_save) or (), overwrite=overwrite,
                                 progress=not quiet, device=device, model_class=model_class, workers=workers,
                                 calibration=calibration)
    if not quiet:
        from rich.console import Console

        rows = [(str(m.rank), f"{m.alpha:g}", f"{m.fro_norm:.4g}", f"{m.error:.4g}", f"{m.captured_energy:.1%}")
                for m in result.modules]
        Console().print(_module_table(f"adapter {output}: {len(result.modules)} modules",
                                      [m.name for m in result.modules], rows,
                                      ("rank", "alpha", "‖ΔW‖_F", "error ‖ΔW − BA‖_F", "energy kept")))
    for note in result.notes:
        typer.secho(f"note: {_cli_words(note, ['extract'])}", fg="yellow", err=True)
    onto = f"a {result.model_class}" if result.model_class else "the model"
    if result.vocab_size is not None:  # whole embedding/head rows of TUNED's resized vocabulary: resize first
        onto += f" resized to the fine-tune's vocabulary, model.resize_token_embeddings({result.vocab_size}),"
    typer.echo(f"adapter: {output}  (load onto {onto} with peft.PeftModel.from_pretrained(model, '{output}'))")


# ---------------------------------------------------------------------------- memory


@app.command()
def memory(
    model: Annotated[str, typer.Argument(help="config.json, the model directory holding it, or a hub id.")],
    method: Annotated[str, typer.Option(help="full, lora, qlora or dora.")] = "lora",
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank of every targeted module (default 16).")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="A plan from `spectra recommend` instead of --rank.")] = None,
    roles: Annotated[Optional[str], typer.Option(help="Roles --rank targets, as `spectra train --roles` takes them "
                                                      "(default: all block linears; on an MoE the fused experts, "
                                                      "never the router).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help="Stacks --rank targets, with --roles, as `spectra train "
                                                       "--stacks` takes them: language (the language model, which "
                                                       "text-only batches run: always one of them), vision, "
                                                       "projector … of a multimodal config. E.g. --stacks "
                                                       "language,vision adds a VLM's vision tower. Default: the "
                                                       "language model alone, as train's.")] = None,
    batch: Annotated[int, typer.Option(help="Sequences per step.")] = 1,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence (default 2048, or the model's position "
                                                        "limit when shorter; more than a learned position table, "
                                                        "GPT-2's or BERT's, is refused).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="fp32, bf16, fp16 or mixed (bf16 weights and activations, "
                                                         "fp32 master weights and Adam states). Default: mixed for "
                                                         "--method full, bf16 otherwise.")] = None,
    optimizer: Annotated[str, typer.Option(help="adamw, adamw_8bit or sgd.")] = "adamw",
    gradient_checkpointing: Annotated[bool, typer.Option(help="Checkpoint every block (default: on).",
                                                         show_default=False)] = True,
    attention: Annotated[str, typer.Option(help="sdpa (no s×s matrix) or eager.")] = "sdpa",
    double_quant: Annotated[bool, typer.Option(help="QLoRA: double-quantised NF4 constants (4.127 bits per "
                                                    "weight; without, 4.5).")] = True,
    layers: Annotated[Optional[str], typer.Option(help="Layers --rank adapts, FIRST-LAST (PEFT's "
                                                       "layers_to_transform; default all): blocks before the first "
                                                       "keep no activations.")] = None,
    use_cache: Annotated[bool, typer.Option(help="transformers' use_cache during training without checkpointing "
                                                 "(the config's default: on; it copies K and V every forward).")] = True,
    input_require_grads: Annotated[bool, typer.Option(help="The embedding output requires grad (as PEFT's k-bit "
                                                           "preparation makes it for reentrant checkpointing): every "
                                                           "block keeps its tensors (default: off).",
                                                      show_default=False)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Estimate the memory of fine-tuning MODEL (full, LoRA, QLoRA, DoRA) from its config.json alone."""
    import json

    from rich.console import Console
    from rich.table import Table

    from spectra.memory import estimate_memory, format_bytes
    from spectra.ranks import load_plan

    from spectra.errors import ConfigError

    given = [flag for flag, value in (("--rank", rank), ("--roles", roles), ("--stacks", stacks), ("--layers", layers))
             if value is not None]
    if given and (plan is not None or method == "full"):  # each would be ignored
        why = "--plan sets the modules, ranks and layers" if plan else "--method full trains every weight"
        raise ConfigError(f"{why}, so {', '.join(given)} would be ignored; drop {'it' if len(given) == 1 else 'them'}.")
    if plan is not None and method == "full":
        raise ConfigError("--method full trains every weight, so --plan would be ignored; drop one of them.")
    rank_or_plan = load_plan(plan) if plan else 16 if rank is None else rank  # 0 is refused, not read as 16
    est = estimate_memory(model, method=method, rank_plan_or_rank=rank_or_plan,
                          batch=batch, seq_len=seq_len, precision=precision, optimizer=optimizer,
                          gradient_checkpointing=gradient_checkpointing, roles=_split(roles), stacks=_stacks(stacks),
                          attention=attention,
                          double_quant=double_quant, use_cache=use_cache, input_require_grads=input_require_grads,
                          layers_to_transform=tuple(range(span[0], span[1] + 1)) if (span := _layer_range(layers))
                          else None)
    if as_json:  # with what it was asked: the JSON describes its own run
        inputs = {"model": model, "method": method, "rank": None if plan else rank_or_plan, "plan": plan and str(plan),
                  "roles": _split(roles), **({"stacks": _stacks(stacks)} if stacks is not None else {}),
                  "layers": layers, "batch": batch, "seq_len": seq_len,
                  "gradient_checkpointing": gradient_checkpointing, "attention": attention,
                  "double_quant": double_quant, "use_cache": use_cache, "input_require_grads": input_require_grads}
        typer.echo(json.dumps(est.to_dict() | {"inputs": inputs}, indent=2))
        return
    table = Table("component", "bytes", "size",
                  title=f"{method} on {est.params:,} parameters ({est.trainable_params:,} trainable), "
                        f"batch {batch} × {est.seq_len} tokens, {est.precision}, {optimizer}")
    for name, n in est.rows():
        table.add_row(name, f"{n:,}", format_bytes(n))
    console = Console()
    console.print(table)
    for note in est.notes:  # what the estimate leaves out or adapts otherwise than asked (an MoE's experts), and why
        console.print(escape(f"note: {note}"), style="yellow")


@bench_app.command("svd")
def bench_svd(
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for bench_svd.{md,json,png}.")] = Path("reports/bench"),
    shapes: Annotated[Optional[str], typer.Option(help="Comma-separated OUTxIN shapes (default: issue 3's four, 1024x1024, 768x2304, 4096x4096, 4096x11008; with --quick tiny ones).")] = None,
    kinds: Annotated[str, typer.Option(help="Spectrum types: planted,power_law,bf16.")] = "planted,power_law,bf16",
    ks: Annotated[str, typer.Option(help="Comma-separated top-k sizes.")] = "64,256",
    quick: Annotated[bool, typer.Option(help="Tiny shapes, seconds (a smoke test).")] = False,
    repeats: Annotated[int, typer.Option(help="Runs per measurement; the best is kept (runs under 1 s are repeated for about a second, 3–20 times).")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the test matrices and sketches.")] = 0,
) -> None:
    """Time spectra's full, randomized and adaptive SVD side by side with torch, scikit-learn and SciPy."""
    from spectra.bench.svd import DEFAULT_SHAPES, run_svd_bench
    from spectra.errors import ConfigError

    try:
        shape_list = DEFAULT_SHAPES if shapes is None else tuple(
            tuple(int(x) for x in s.lower().split("x")) for s in _split(shapes))
        k_list = tuple(int(k) for k in _split(ks))
    except ValueError as err:
        raise ConfigError(f"--shapes must look like 1024x1024,768x2304 and --ks like 64,256 ({err}).") from None
    path = run_svd_bench(out, shapes=shape_list, kinds=_split(kinds), ks=k_list, quick=quick, repeats=repeats,
                         seed=seed)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------- train / verify


@app.command()
def train(
    base: Annotated[str, typer.Argument(help="Model directory (or hub id) with config.json to fine-tune.")],
    data: Annotated[Path, typer.Option(help=".txt (language modelling), or .jsonl of {\"text\"} / {\"text\", \"label\"} / "
                                            "{\"source\", \"target\"} (encoder-decoder) records, or .csv/.tsv with a "
                                            "text (and label), or source,target, header row.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter directory (or checkpoint with --full) to create (refused if it exists, unless --overwrite).")],
    method: Annotated[Optional[str], typer.Option(help="lora (default; dora for a plan made with `recommend --dora`), "
                                                       "dora, qlora or qdora (4-bit NF4 base).")] = None,
    full: Annotated[bool, typer.Option("--full", help="Full fine-tune instead of an adapter: writes a checkpoint that "
                                                      "pairs with BASE (no --method, --rank, --alpha, --rslora, "
                                                      "--plan, --roles, --stacks).")] = False,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank of every targeted module (default 8).")] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA α (default scale 2: 2·rank, 2·√rank with --rslora).")] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="Scale by α/√r (rsLoRA).")] = False,
    plan: Annotated[Optional[Path], typer.Option(help="Per-module ranks and α from `spectra recommend -o plan.json` "
                                                      "(instead of --rank, --alpha and --roles).")] = None,
    roles: Annotated[Optional[str], typer.Option(help="Roles to target, e.g. q,v (default: every block linear).")] = None,
    stacks: Annotated[Optional[str], typer.Option(
        help="Stacks whose modules of --roles to target: language, encoder, vision, projector, … (default: the "
             "stacks text runs through: a vision-language model's language model, not its vision tower, which "
             "text-only batches never reach, so its adapters would stay at zero).")] = None,
    task: Annotated[str, typer.Option(help=_TASK_HELP)] = "auto",
    eval_data: Annotated[Optional[Path], typer.Option(help="Held-out data (default: --eval-fraction of --data).")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(
        help="Share of --data held out without --eval-data (default 0.1, at least one example; 0: none).")] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps.")] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.")] = 16,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example (default 128, or the model's position limit when shorter, said in a note; a value beyond a learned position table, BERT's or GPT-2's, is refused).")] = None,
    group_by_length: Annotated[bool, typer.Option(
        "--group-by-length", help="Batch texts of similar length together: ~2× faster on short texts of mixed "
                                  "length (less padding), batches a little less random.")] = False,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 5e-4 adapters, 1e-4 full).")] = None,
    compute_dtype: Annotated[str, typer.Option(help="QLoRA compute dtype: float32, bfloat16 or float16.")] = "float32",
    teacher: Annotated[Optional[str], typer.Option(help="Distil from this checkpoint's outputs instead of labels.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute each block in the backward instead of keeping its activations "
                                         "(less memory, ~1/3 more compute; `spectra memory` shows both).")] = False,
    device: Annotated[str, typer.Option(help="Where the model trains: cpu, cuda, cuda:1 (CUDA runs are not "
                                             "bit-reproducible).")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed (same seed, same adapter bytes on CPU).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Train a LoRA/DoRA/QLoRA adapter (or, with --full, a full fine-tune) of BASE on DATA.

    Example: spectra train ./base --data train.jsonl --rank 8 --method dora -o adapter_dora/
    """
    _writable(output, base, data, eval_data, plan, teacher, command="train", overwrite=overwrite)
    from spectra.errors import ConfigError
    from spectra.lora.train import TrainConfig, train_adapter

    # TrainConfig refuses what the method or the plan would ignore; these two it cannot see
    if full and method is not None:
        raise ConfigError(f"--full trains every weight, so --method {method} would be ignored; drop one of them.")
    if eval_data is not None and eval_fraction is not None:
        raise ConfigError("--eval-data is the held-out data, so --eval-fraction would be ignored; drop one of them.")
    if method is None and plan is not None and not full:  # a DoRA plan (`recommend --dora`) trains DoRA
        from spectra.ranks import load_plan

        try:
            method = "dora" if load_plan(plan).policy.use_dora else "lora"
        except ConfigError:
            pass  # an unreadable plan is refused below, after the options, with the reason
    config = TrainConfig(method="full" if full else method or "lora", rank=rank, alpha=alpha, rslora=rslora,
                         plan=str(plan) if plan else None, roles=_split(roles), stacks=_stacks(stacks), task=task,
                         epochs=epochs, max_steps=max_steps, batch_size=batch_size, max_length=max_length, lr=lr,
                         group_by_length=group_by_length, compute_dtype=compute_dtype, teacher=teacher,
                         device=device, seed=seed, gradient_checkpointing=gradient_checkpointing,
                         **({} if eval_fraction is None else {"eval_fraction": eval_fraction}))
    result = train_adapter(base, data, config, output, eval_data=eval_data, overwrite=overwrite, progress=not quiet)
    final = result.final_eval
    typer.echo(f"{result.method}: {result.steps} step{'s' * (result.steps != 1)}, {result.trainable_params:,} "
               "trainable parameters, final "
               f"train loss {result.losses[-1]:.4f}"
               + (f", eval loss {final['loss']:.4f}, accuracy {final['accuracy']:.1%}" if final else ""))
    for note in result.notes:
        typer.secho(f"note: {note}", fg="yellow", err=True)
    typer.echo(f"wrote {result.out_dir}  (training_log.jsonl, spectra_train.json)")


@app.command()
def verify(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint the adapter and the full fine-tune started from.")],
    tuned: Annotated[str, typer.Argument(help="The full fine-tune (e.g. from `spectra train --full`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory to write (refused if it exists, unless --overwrite).")] = Path("reports/verify"),
    adapter: Annotated[Optional[Path], typer.Option(help="An existing PEFT adapter to check (no training).")] = None,
    sweep: Annotated[Optional[str], typer.Option(help="Ranks to train and check, e.g. 1,2,4,8,16.")] = None,
    method: Annotated[str, typer.Option(help="Sweep methods, e.g. lora,dora (qlora, qdora too).")] = "lora",
    data: Annotated[Optional[Path], typer.Option(help="Training data for --sweep.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Eval data: loss/accuracy of base, tuned, adapter, SVD.")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(
        help="Sweep: share of --data each run holds out for its own eval (default 0.1; 0 for none, e.g. one example).")] = None,
    adapters_dir: Annotated[Optional[Path], typer.Option(help="Where --sweep puts adapters (default OUTPUT-adapters).")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="The plan from `spectra recommend`: its rank is marked.")] = None,
    recommended: Annotated[Optional[int], typer.Option(help="Rank to mark as recommended (instead of --plan).")] = None,
    distill: Annotated[bool, typer.Option("--distill", help="Sweep: fit adapters to TUNED's outputs, not labels.")] = False,
    roles: Annotated[Optional[str], typer.Option(help="Sweep: roles to target (default every block linear).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help="Sweep: c" + _STACKS_HELP.removeprefix("C"))] = None,
    epochs: Annotated[int, typer.Option(help="Sweep: passes over the data.")] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Sweep: steps per run.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Sweep: learning rate.")] = None,
    group_by_length: Annotated[bool, typer.Option(
        "--group-by-length", help="Sweep: batch texts of similar length together (less padding; see `train`).")] = False,
    device: Annotated[str, typer.Option(help="Where the measures' SVDs, the evaluations and the sweep's training "
                                             "run: cpu, cuda, cuda:1.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of training and of any new head.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP + " With --sweep, each "
                                                                "{method}-r{rank} folder under --adapters-dir is "
                                                                "replaced too, by the same rule (one `train` wrote, or "
                                                                "empty), all checked before the first run trains. "
                                                                "A report of `verify --sweep` (sweep.json) may be "
                                                                "replaced by `verify --adapter`'s.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars, no tables.")] = False,
) -> None:
    """Check an adapter against the full fine-tune: captured energy vs Eckart–Young, φ, intruders, eval.

    Example: spectra verify ./base ./tuned --adapter adapter/ -o reports/verify1
    """
    _writable(output, base, tuned, adapter, data, eval_data, plan, command="verify", overwrite=overwrite)
    from spectra.errors import ConfigError
    from spectra.lora.verify import VerifyConfig, rank_sweep, verify_adapter

    if (adapter is None) == (sweep is None):
        raise ConfigError("pass either --adapter ADAPTER_DIR (check one adapter) or --sweep RANKS with --data.")
    sweep_only = [flag for flag, given in (("--data", data), ("--plan", plan), ("--recommended", recommended),
                                           ("--eval-fraction", eval_fraction)) if given is not None]
    if adapter is not None and sweep_only:
        raise ConfigError(f"{', '.join(sweep_only)} only apply to --sweep; with --adapter, leave them out.")
    vconfig = VerifyConfig(seed=seed, device=device)
    if adapter is not None:
        result = verify_adapter(base, tuned, adapter, eval_data=eval_data, config=vconfig, progress=not quiet)
        path = result.write_report(output, overwrite=overwrite)
        from spectra.report.verify import EVAL_HEADERS, eval_rows, headline, summary_rows

        typer.echo(headline(result.summary))
        if not quiet:  # the eval numbers were in report.md only
            from rich.console import Console

            console = Console()
            console.print(_plain_table(f"adapter vs full fine-tune ({result.summary.get('modules')} modules)",
                                       ("measure", "value"), summary_rows(result.summary)))
            if result.evals:
                console.print(_plain_table("eval (loss gap: the loss minus the full fine-tune's; svd: the rank-r "
                                           "truncated SVD of ΔW_full)", EVAL_HEADERS, eval_rows(result.evals)))
        typer.echo(f"report: {path / 'report.html'}  (also report.md, verify.json, figures/)")
        return
    from spectra.lora.train import TrainConfig
    from spectra.ranks import load_plan

    if data is None:
        raise ConfigError("--sweep trains adapters: pass --data (the fine-tune's training data).")
    try:
        ranks = [int(r) for r in _split(sweep) or ()]
    except ValueError:
        raise ConfigError(f"--sweep {sweep!r}: expected comma-separated ranks like 1,2,4,8.") from None
    methods = _split(method) or ("lora",)
    adapters_dir = adapters_dir or output.with_name(output.name + "-adapters")
    from spectra.files import refuse_replacing_others

    for name in dict.fromkeys(f"{m}-r{r}" for m in methods for r in ranks):  # each run replaces its folder whole:
        refuse_replacing_others(adapters_dir / name, command="train", overwrite=overwrite,  # all checked before
                                option="--adapters-dir")  # the first trains
    if plan is not None and recommended is None:
        recommended = load_plan(plan).to_peft_config()["r"]
    tconfig = TrainConfig(roles=_split(roles), stacks=_stacks(stacks), epochs=epochs, max_steps=max_steps, lr=lr, seed=seed,
                          group_by_length=group_by_length, teacher=tuned if distill else None, device=device,
                          **({} if eval_fraction is None else {"eval_fraction": eval_fraction}))
    result = rank_sweep(base, tuned, data, ranks=ranks, methods=methods, train_config=tconfig,
                        eval_data=eval_data, adapters_dir=adapters_dir,
                        verify_config=vconfig, recommended_rank=recommended, overwrite=overwrite,
                        progress=not quiet)
    path = result.write_report(output, overwrite=overwrite)
    from spectra.report.verify import SWEEP_HEADERS, reference_lines, sweep_rows

    if not quiet:  # the per-rank numbers were in report.md only
        from rich.console import Console

        data = result.to_dict()
        Console().print(_plain_table("rank sweep: adapters vs the full fine-tune", SWEEP_HEADERS, sweep_rows(data)))
        for line in reference_lines(data):
            typer.echo(line)
    typer.echo(f"report: {path / 'report.html'}  (also report.md, sweep.json, figures/)")


@bench_app.command("train")
def bench_train(
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for train.{md,json}.")] = Path("reports/bench"),
    steps: Annotated[int, typer.Option(help="Timed steps per loop (after warm-up).")] = 20,
    quick: Annotated[bool, typer.Option(help="A tiny model and few steps (a smoke test).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the model and batch.")] = 0,
) -> None:
    """Time the trainer's step against a plain PEFT loop on the same model and batch."""
    from spectra.bench.train import run_train_bench

    path = run_train_bench(out, steps=steps, quick=quick, seed=seed)
    typer.echo(f"wrote {path}")


@bench_app.command("verify")
def bench_verify(
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for verify.{md,json}.")] = Path("reports/bench"),
    quick: Annotated[bool, typer.Option(help="One tiny module, both paths forced (a smoke test).")] = False,
) -> None:
    """Time verify's per-module measures with full SVDs and with certified partial decompositions, side by side."""
    from spectra.bench.verify import run_verify_bench

    path = run_verify_bench(out, quick=quick)
    typer.echo(f"wrote {path}")


@bench_app.command("make-pair")
def bench_make_pair(
    out: Annotated[Path, typer.Argument(help="Directory to create: OUT/base, OUT/tuned, OUT/ground_truth.json.")],
    shape: Annotated[str, typer.Option(help="Model shapes: tinyllama-1.1b, llama-2-7b, llama-110m, llama-tiny.")] = "tinyllama-1.1b",
    seed: Annotated[int, typer.Option(help="Seed of every tensor.")] = 0,
    relative_size: Annotated[float, typer.Option(help="‖ΔW‖/‖W‖ per module.")] = 1e-2,
    tail: Annotated[float, typer.Option(help="Share of ‖ΔW‖² in the broad Gaussian tail.")] = 0.03,
    rank_scale: Annotated[float, typer.Option(help="Multiplies every role's planted effective rank.")] = 1.0,
    shard_mb: Annotated[int, typer.Option(help="Largest safetensors shard, MB.")] = 2048,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT that make-pair wrote (base/, tuned/, ground_truth.json; swapped in when complete); a folder holding any other file is refused.")] = False,
) -> None:
    """Write a realistic bf16 base × tuned pair with a real model's names, shapes and sharding (tensor by tensor)."""
    _writable(out, command="bench make-pair", overwrite=overwrite or (out.is_dir() and not any(out.iterdir())))
    from spectra.bench.make_pair import PairConfig, make_pair

    config = PairConfig(shape=shape, seed=seed, relative_size=relative_size, tail=tail, rank_scale=rank_scale,
                        shard_bytes=shard_mb << 20)
    path = make_pair(out, config, overwrite=overwrite, progress=True)
    typer.echo(f"wrote {path}/base, {path}/tuned and {path}/ground_truth.json")


@bench_app.command("e2e")
def bench_e2e(
    pair: Annotated[Optional[Path], typer.Option(help="A pair written by `spectra bench make-pair` (default: make one under --work).")] = None,
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for e2e.{md,json}.")] = Path("reports/bench"),
    work: Annotated[Path, typer.Option(help="Scratch directory for the generated pair, caches and peer outputs.")] = Path("/tmp/spectra-e2e"),
    shape: Annotated[str, typer.Option(help="Shapes of the generated pair when --pair is not given.")] = "tinyllama-1.1b",
    quick: Annotated[bool, typer.Option(help="Tiny pair, no peers, no SIGKILL run: a smoke test in seconds.")] = False,
    skip: Annotated[Optional[str], typer.Option(help="Comma-separated parts to skip: full, peers, kill, torchrun.")] = None,
    peer_timeout: Annotated[float, typer.Option(help="Seconds a peer may run before it is stopped (reported as a lower bound).")] = 900,
) -> None:
    """End-to-end: spectra (default and forced full SVD), I/O and GEMM floors, peers, resume after SIGKILL, torchrun."""
    from spectra.bench.e2e import run_e2e_bench

    path = run_e2e_bench(out, pair=pair, work=work, shape="llama-tiny" if quick else shape, quick=quick,
                         skip=_split(skip) or (), peer_timeout=peer_timeout)
    typer.echo(f"wrote {path}")


# ---------------------------------------------------------------------------- sweep


@app.command()
def sweep(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint (model directory with config.json).")],
    tuned: Annotated[str, typer.Argument(help="The full fine-tune (model directory with config.json).")],
    data: Annotated[Path, typer.Option(help="Eval data: .txt (perplexity), or .jsonl of {\"text\", \"label\"} / .csv/.tsv "
                                            "with text,label columns (accuracy), or {\"source\", \"target\"} records "
                                            "for an encoder-decoder (perplexity over target tokens).")],
    ranks: Annotated[str, typer.Option(help="Comma-separated ranks to evaluate (0 allowed).")] = "1,2,4,8,16,32,64",
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory to write (refused if it exists, unless --overwrite).")] = Path("reports/sweep"),
    non_target: Annotated[str, typer.Option(help="Norms, biases, heads, embeddings from: tuned, base or both.")] = "tuned",
    by_role: Annotated[bool, typer.Option("--by-role", help="Also one curve per role of each stack (that role truncated, the rest full; a vision tower's q is 'vision q').")] = False,
    metric: Annotated[Optional[str], typer.Option(help="accuracy, loss or perplexity (default: accuracy with labels, else perplexity).")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="A plan from `spectra recommend`: its modules are the targets of every curve, plus one point for the adapter `spectra extract --plan` writes (the base with each planned module at its rank, every other tensor the base's).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Mark the smallest rank within ε of the full fine-tune (metric units).")] = None,
    analysis: Annotated[Optional[Path], typer.Option(help="With --epsilon: an analysis of the pair; writes OUTPUT/plan.json from the functional policy.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration data: truncate data-optimally (best on these inputs) instead of by Eckart–Young.")] = None,
    roles: Annotated[Optional[str], typer.Option(help="Roles to truncate (default every block linear: q, k, v, o, qkv, gate, up, down, gate_up; q also takes DeepSeek's q_a and q_b, k and v its kv_a and kv_b).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help=_STACKS_HELP)] = None,
    task: Annotated[str, typer.Option(help=_TASK_HELP)] = "auto",
    batch_size: Annotated[int, typer.Option(help="Eval examples per forward pass.")] = 32,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example (default 128, or the model's position limit when shorter, said in a note; a value beyond a learned position table, BERT's or GPT-2's, is refused).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates of the intervals (0: none).")] = 1000,
    device: Annotated[str, typer.Option(help="Where the model is evaluated: cpu, cuda, cuda:1.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no table.")] = False,
) -> None:
    """Evaluate TUNED with every ΔW truncated to each rank (no training): the functional rank curve.

    Example: spectra sweep ./base ./tuned --data eval.jsonl --ranks 1,2,4,8,16,32,64 --epsilon 0.01 -o reports/sweep1
    """
    _writable(output, base, tuned, data, plan, analysis, calibration, command="sweep", overwrite=overwrite)
    from spectra.errors import ConfigError
    from spectra.ranks import RankPolicy, functional_ranks, load_plan, recommend_ranks
    from spectra.sweep import SweepConfig, truncation_sweep

    if analysis is not None and epsilon is None:
        raise ConfigError("--analysis writes a functional plan: pass --epsilon too (e.g. --epsilon 0.01).")
    # a bad ε, or an analysis of another pair, is refused now, not after every evaluation
    policy = None if epsilon is None else RankPolicy(energy=None, functional=epsilon)
    if analysis is not None:
        from spectra.ranks.recommend import check_analysis_pair

        check_analysis_pair(analysis, base, tuned)
    try:
        rank_list = [int(r) for r in _split(ranks) or ()]
    except ValueError:
        raise ConfigError(f"--ranks {ranks!r}: expected comma-separated ranks like 1,2,4,8.") from None
    config = SweepConfig(roles=_split(roles), stacks=_stacks(stacks), task=task, batch_size=batch_size, max_length=max_length,
                         bootstrap=bootstrap, device=device, seed=seed)
    result = truncation_sweep(base, tuned, data, ranks=rank_list, plan=plan, metric=metric, non_target=non_target,
                              groups="both" if by_role else "model", calibration=calibration, config=config,
                              progress=not quiet)
    marks = {}
    if plan is not None:
        planned = sorted(m.rank for m in load_plan(plan).modules)
        marks["plan (median rank)"] = planned[len(planned) // 2]
    choice, functional_plan, plan_error = None, None, None
    if epsilon is not None:
        choice = functional_ranks(result, epsilon)
        if choice["groups"].get("model", {}).get("rank") is not None:
            marks[f"functional ε={epsilon:g}"] = choice["groups"]["model"]["rank"]
        if analysis is not None:
            try:
                functional_plan = recommend_ranks(analysis, policy, sweep=result)
            except ConfigError as err:  # e.g. rank 0 within ε everywhere: the evaluations still make their report
                plan_error = err
    from spectra.report.sweep import functional_text, interval_text, signed

    path = result.write_report(output, overwrite=overwrite, marks=marks, plan=functional_plan,
                               functional=choice)  # plan.json staged too
    if not quiet:
        from rich.console import Console
        from rich.table import Table

        name = result.data["metric"]["name"]
        planned = [p for p in result.points if p["group"] == "plan"]
        table = Table("rank", name, "interval", "gap to full", title=f"{name} vs rank ({result.data['examples']} "
                      f"eval examples; full fine-tune {result.reference['tuned']['metric']:.4g}, base "
                      f"{result.reference['base']['metric']:.4g})")
        for p in result.curve() + planned:
            table.add_row("plan" if p["rank"] is None else str(p["rank"]), f"{p['metric']:.4g}",
                          escape(interval_text(p["interval"]) or "–"), signed(p["gap"]))
        Console().print(table)
        shown = ("model", result.data["non_target"][0])
        more = sorted({(p["group"], p["non_target"]) for p in result.points if p["rank"] is not None} - {shown})
        if more:  # --by-role, --non-target both: their curves are in the report
            typer.echo(f"the table is the whole model's curve with non-targets from {shown[1]}; report.md has "
                       f"{len(more)} more: " + ", ".join(f"{g} ({n})" for g, n in more))
        if planned:
            typer.echo("plan: the base with the plan's adapter (`spectra extract --plan`), every other tensor the "
                       "base's.")
        if choice is not None:
            for group, c in choice["groups"].items():
                typer.echo(f"functional rank ({group}, ε={epsilon:g}): {functional_text(c)}")
    for note in result.data["notes"]:
        typer.secho(f"note: {note}", fg="yellow", err=True)
    if plan_error is not None:
        typer.secho(f"note: plan.json not written: {_cli_message(plan_error, ['sweep'])}", fg="yellow", err=True)
    typer.echo(f"report: {path / 'report.html'}  (also report.md, sweep.json, figures/"
               + (", plan.json)" if functional_plan is not None else ")"))


# ---------------------------------------------------------------------------- helpers


def _plain_table(title: str, headers, rows: list[list[str]]):
    """A rich table of text cells, each kept whole (numbers are never wrapped)."""
    from rich.table import Table

    table = Table(*(escape(h) for h in headers), title=escape(title))
    for row in rows:
        table.add_row(*map(escape, row))
    return table


def _module_table(title: str, names: list[str], rows: list[tuple[str, ...]], headers: tuple[str, ...], *,
                  fold: tuple[str, ...] = ()):
    """A per-module rich table: natural order (layer 2 before 10), names after their common prefix
    (which heads the column), and in a narrow terminal the name and the `fold` columns wrapped — a
    name is copied into configs, so it is never cut; the other columns keep their width."""
    from rich.table import Table

    shared = os.path.commonprefix(names).rpartition(".")[0] if len(names) > 1 else ""  # whole dotted parts only
    prefix = shared + "." if shared else ""
    table = Table(title=escape(title))
    table.add_column(escape(f"{prefix}…") if prefix else "module", overflow="fold")  # the header carries the prefix
    for header in headers:
        table.add_column(header, **({"overflow": "fold"} if header in fold else {"no_wrap": True}))
    # the width left for names once the other columns have theirs (a fold column wraps down to 12): names wrap at
    # their dots to fit it, not mid-word ("k_p/roj")
    others = sum(3 + (min(12, w) if h in fold else w)
                 for h, w in ((h, max([len(h)] + [len(r[i]) for r in rows])) for i, h in enumerate(headers)))
    width = max(12, shutil.get_terminal_size().columns - others - 4)
    for name, row in sorted(zip(names, rows), key=lambda pair: _natural(pair[0])):
        table.add_row(escape(_wrap_dotted(name[len(prefix):], width)), *map(escape, row))  # "c_attn[q]": no markup
    return table


def _wrap_dotted(name: str, width: int) -> str:
    """`name` in lines of at most `width`, broken after dots (a part longer than that stays whole: rich folds it)."""
    lines, line = [], ""
    for part in re.findall(r"[^.]*\.|[^.]+$", name):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = ""
        line += part
    return "\n".join(lines + [line])


def _natural(name: str) -> list:
    """Sort key reading the digit runs of a module name as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def _writable(output: Path | None, *inputs, command: str | None = None, overwrite: bool = False) -> None:
    """Refuse, before any work, an output whose folder cannot be written (outputs are staged beside it, then renamed),
    one that would replace an input (the output is, holds or lies inside one of `inputs`), and, for a `command` that
    writes a directory, an existing one unless --overwrite is given and it holds only what `command` writes
    (``files.OUTPUTS``, the table the library's writers read); without `command` (a file output) an existing
    directory there is refused."""
    from spectra.errors import ConfigError
    from spectra.files import refuse_replacing_inputs, refuse_replacing_others

    if output is None:
        return
    refuse_replacing_inputs(output, inputs)
    if command is not None:
        refuse_replacing_others(output, command=command, overwrite=overwrite)
    elif output.is_dir():
        raise ConfigError(f"-o {output} is a directory; this command writes a file there. Choose another -o.")
    elif output.exists() and not overwrite:
        raise ConfigError(f"-o {output} exists; pass --overwrite to replace it or choose another -o.")
    folder = output.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise ConfigError(f"cannot write {output}: {folder} is not a folder this user may write to. Choose another "
                          "-o/--output.")


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _stacks(value: str | None) -> tuple[str, ...] | None:
    """--stacks as the library spells it (decoder → language); an unknown stack refused, naming the option."""
    return parse_stacks(value, option="--stacks")


def _fmt(value) -> str:
    return "" if value is None else str(value)


def _stop_on_ctrl_c(command):
    """Wrap a command so Ctrl-C ends it with one line and exit code 130 (whatever Typer/Click's own handling)."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KeyboardInterrupt:
            if _state["debug"]:
                raise
            typer.echo("stopped (Ctrl-C).", err=True)
            raise typer.Exit(130) from None

    return run


def _interruptible(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        info.callback = _stop_on_ctrl_c(info.callback)
    for group in typer_app.registered_groups:
        _interruptible(group.typer_instance)


_interruptible(app)  # every command above, bench's included


def _quiet_third_party(*, quiet: bool = False) -> None:
    """Drop bitsandbytes' import-time warning that its optional CPU 4-bit kernel package is not installed,
    and under ``-q``/``--quiet`` the progress bars and warnings of Hugging Face libraries too.

    PEFT imports bitsandbytes, so every extract/train/verify printed "Failed to load CPU
    gemm_4bit_forward from kernels-community" although nothing needed it; QLoRA on the CPU
    works without it (bitsandbytes falls back to its own kernel). With ``-q``, transformers'
    "Writing model shards" bars and load reports ("Notes: UNEXPECTED …") went on printing:
    both read their switches from the environment when first imported, which the commands
    do lazily, after this. Only the command line does this: a library user keeps the
    libraries' logging as configured.
    """
    import logging

    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in str(record.msg))


# library fields whose option has another name: analyze's --energy fills AnalysisConfig.thresholds, --skip-nonfinite
# its on_nonfinite='skip'; sweep's --epsilon is the functional policy's ε (recommend's --functional)
_FIELD_OPTIONS = {"thresholds": "energy", "on_nonfinite": "skip_nonfinite", "functional": "epsilon"}
# a library field as an error names it: RankPolicy.energy, workers=0, on_nonfinite='skip', max_rank
# (never inside a path or a dotted name: /data/eval_data/x.txt, model.layers.0.mlp.gate_proj, max_length.txt)
_FIELD = re.compile(r"(?<![\w./\\@-])(?:(?:RankPolicy|[A-Z]\w*Config)\.)?([a-z][a-z0-9]*(?:_[a-z0-9]+)*)"
                    r"(?![\w/\\@-]|\.\w)(?:=('[^']*'|[^\s,;:)]+))?")  # nor an address: eval_data@host


def _cli_message(err: Exception, argv: list[str]) -> str:
    """A library error in the words of the command that was run (`argv`, without the program): the configuration
    fields it names become the command's options (``workers=0`` → ``--workers 0``, ``RankPolicy.energy`` →
    ``--energy``, ``max_rank`` → ``--max-rank``), and the NaN/Inf error's hint names --skip-nonfinite only where the
    command has it. A field is read as one where it is qualified, assigned, holds an underscore or opens the
    message: a plain word ("the rank of") stays prose, and so does a bare word the user typed as a value (a folder
    named eval_data). A field the command has no option for stays as it is."""
    from spectra.errors import NonFiniteWeightError

    text = str(err)
    if isinstance(err, NonFiniteWeightError) and "skip_nonfinite" not in _command_options(argv):
        from spectra.checkpoints.pairing import SKIP_NONFINITE_HINT  # a broken checkpoint: re-saved, not skipped

        text = text.replace(" " + SKIP_NONFINITE_HINT, "")
    return _cli_words(text, argv)


def _command_options(argv: list[str]) -> dict[str, tuple[str, bool, str | None]]:
    """The options of the command `argv` runs: parameter name → (its --option, whether a flag, its --no- form)."""
    words = [a for a in argv if not a.startswith("-")]
    command = typer.main.get_command(app)  # click's objects (typer's own copy of click: asked by what they hold)
    for name in words[:2]:
        if not hasattr(command, "commands"):
            break
        command = command.commands.get(name)
        if command is None:
            return {}
    if hasattr(command, "commands"):
        return {}
    return {p.name: (max((o for o in p.opts if o.startswith("--")), key=len), p.is_flag,
                     next(iter(p.secondary_opts), None))  # --no-noise of --noise
            for p in command.params if p.param_type_name == "option" and any(o.startswith("--") for o in p.opts)}


def _cli_words(text: str, argv: list[str]) -> str:
    """`text` (an error or a note of the library) with the fields it names as the options of the command `argv`
    runs (see :func:`_cli_message`)."""
    options = _command_options(argv)
    # what the user typed as values (a path `eval_data`, --output=max_steps): a bare word equal to one is theirs,
    # named back to them ("cannot read eval_data: no such file"), not the field of the same name
    typed = {a.split("=", 1)[1] if a.startswith("-") else a for a in argv if not a.startswith("-") or "=" in a}

    def option(match: re.Match) -> str:
        field, value = match.group(1), match.group(2)
        name = field if field in options else _FIELD_OPTIONS.get(field)
        bare = match.group(0) == field
        named = not bare or ("_" in field or match.start() == 0) and field not in typed  # a field, not prose
        if name not in options or not named:
            return match.group(0)
        flag, is_flag, off = options[name]
        if is_flag:  # noise=False: --no-noise
            return off if value == "False" and off else flag
        return flag if value is None else f"{flag} {value}"

    text = _FIELD.sub(option, text)
    # "--max-length (--max-length) 128", "--overwrite (CLI: --overwrite)": the option once
    return re.sub(r"(--[\w-]+)((?: [^\s()]+)?) \((?:CLI: )?\1\)", r"\1\2", text)


_PACKAGE = Path(__file__).resolve().parents[1]  # where spectra's own warnings come from: spectra/, not spectra/cli/


def main() -> None:
    """Console entry point: spectra's own errors as one paragraph and exit code 2 (Ctrl-C: 130, above)."""
    from spectra.errors import SpectraError

    _quiet_third_party(quiet=bool({"-q", "--quiet"} & set(sys.argv[1:])))
    import warnings

    default_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        """spectra's own warnings as one line, in the command's words ("warning: the analysis cache … cannot be
        written"); Python's format added the category and the source line that raised it, which tell a user
        nothing. Other libraries' warnings keep their form (their file and line help to report them)."""
        if Path(filename).resolve().is_relative_to(_PACKAGE):
            typer.secho(f"warning: {_cli_words(str(message), sys.argv[1:])}", fg="yellow", err=True)
        else:
            default_show(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    try:
        app()
    except (SpectraError, OSError) as err:  # OSError: a path that cannot be read or written, named in the message
        if _state["debug"]:
            raise
        message = _cli_message(err, sys.argv[1:]) if isinstance(err, SpectraError) else str(err)
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        typer.echo("(run with --debug for the full traceback)", err=True)
        sys.exit(2)
    finally:
        warnings.showwarning = default_show  # main() called in-process (tests) leaves the caller's display

