"""`spectra pairs`, `spectra analyze` and `spectra show`: what pairs, the spectra of a pair, a report's summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape  # module names hold brackets ("c_attn[q]") that rich would read as markup

from spectra.cli.options import (_OVERWRITE_HELP, _STACKS_HELP, _layer_range, _NumberList, _split, _stacks,
                                 _typed_float, _typed_int, _typed_seed, _writable)
from spectra.cli.tables import _fmt, _module_table


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
             *((_fmt(d.expert),) if experts else ()), "×".join(map(str, d.shape)) or "scalar",  # 0-d: logit_scale
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


def analyze(
    ctx: typer.Context,
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint: directory, .safetensors/.bin file, index JSON or hub id.")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same forms), or a PEFT adapter directory.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory to write (refused if it exists, unless --overwrite).")] = Path("reports/analysis"),
    method: Annotated[str, typer.Option(help="SVD: auto (the exact spectrum up to --full-below, the energy sketch above), full, sketch, "
                                               "adaptive (block Krylov to the energy rank), randomized (top --max-rank, default 256).")] = "auto",
    max_rank: Annotated[Optional[int], typer.Option(help="Cap on singular values computed by the randomized/adaptive paths (default: 256 for randomized, no cap for adaptive).", parser=_typed_int)] = None,
    full_below: Annotated[int, typer.Option(help="Short side at or below which 'auto' takes the exact full spectrum.", parser=_typed_int)] = 1024,
    energy: Annotated[str, typer.Option(help="Comma-separated energy fractions whose ranks are reported.",
                                        parser=_NumberList(float, "comma-separated fractions like 0.5,0.9,0.99"))
                      ] = "0.5,0.9,0.95,0.99",
    roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles to analyse (q, k, v, o, qkv, q_a, q_b, kv_a, kv_b, kv, o_a, o_b, xq, xk, xv, xo, gate, up, down, gate_up, projector, embed, pos_embed, head, other; q_a…kv_b: DeepSeek's latent attention, q taking q_a and q_b; xq…xo: an encoder–decoder's cross-attention; pos_embed: position, relative-position and token-type tables, GPT-2's wpe, T5's relative_attention_bias, BERT's token_type_embeddings).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help=_STACKS_HELP)] = None,
    layers: Annotated[Optional[str], typer.Option(help="Layer range FIRST-LAST (inclusive), e.g. 0-11.")] = None,
    include: Annotated[Optional[str], typer.Option(help="Only modules whose name matches this glob (or re:REGEX).")] = None,
    exclude: Annotated[Optional[str], typer.Option(help="Skip modules whose name matches this glob (or re:REGEX).")] = None,
    dtype: Annotated[str, typer.Option(help="Dtype of ΔW and its SVD: float32 or float64.")] = "float32",
    device: Annotated[str, typer.Option(help="Torch device for the math: cpu, cuda, cuda:1.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the randomized paths.", parser=_typed_seed)] = 0,
    cache_dir: Annotated[Optional[Path], typer.Option(help="Cache of finished modules (default $SPECTRA_CACHE or ~/.cache/spectra).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Recompute everything and cache nothing.")] = False,
    skip_nonfinite: Annotated[bool, typer.Option("--skip-nonfinite", help="Skip tensors holding NaN/Inf instead of stopping.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP)] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar, no summary (tensors it could not pair are still named, on stderr).")] = False,
    resolve: Annotated[float, typer.Option(help="Energy whose rank the fast 'sketch' path resolves exactly; higher --energy levels are reported when within reach.", parser=_typed_float)] = 0.9,
    workers: Annotated[Optional[int], typer.Option(help="Modules analysed at once, each on its own thread with (torch threads ÷ workers) threads. Default: one per torch thread up to 4 on the CPU, 1 on a GPU.", parser=_typed_int)] = None,
    read_ahead: Annotated[int, typer.Option(help="With one worker: modules read ahead of the math (0: read in line).", parser=_typed_int)] = 2,
    read_ahead_mb: Annotated[int, typer.Option(help="Most ΔW data (MB, float32) held by the modules in flight (one always goes); bounds peak memory. An adapter's expert factors held across a module come out of what it holds beyond room for the two largest modules; more is held on top, with a warning.", parser=_typed_int)] = 512,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration data (.txt, or .jsonl/.csv/.tsv with a text field): also report each ΔW's activation-weighted spectrum, ΔW·C^{1/2} on the base's inputs.")] = None,
    calibration_epsilon: Annotated[float, typer.Option(help="With --calibration: the ε that sets each module's input rank (input_rank in analysis.json), the count of C's eigenvalues above ε times their mean (C: the input second moment). The activation-weighted spectrum uses C itself, with no ridge, so ε leaves it unchanged.", parser=_typed_float)] = 1e-6,
    base_top_k: Annotated[int, typer.Option(help="Also keep the top K singular values of each W_base (base_top_singular_values in analysis.json: exact up to --full-below, above it from a Krylov space in the --sketch-dtype, outliers to ~1e-3), to compare ΔW's top values with W's. 0: none (no report needs them; 16 cost ~12 % more time on a TinyLlama-shaped pair).", parser=_typed_int)] = 0,
    sketch_dtype: Annotated[str, typer.Option(help="GEMM dtype of the energy sketch's power steps (its values come from an exact float32 step whatever this is): auto (bfloat16 where this device runs it ≥ 1.25× faster than float32, e.g. CPUs with AMX or AVX-512 BF16 and GPUs since Ampere; else float32: an AVX2-only CPU emulates bfloat16 50–300× slower), bfloat16, float16, float32.")] = "auto",
    base_rounding: Annotated[str, typer.Option(help="Is the base's rounding in ΔW? auto (decided per module from ΔW's residual: when in doubt, counted), exact (the fine-tune started from the base's stored values, e.g. a bf16 release tuned and saved in bf16: only the fine-tune's rounding is noise), counted (both were rounded from finer weights, e.g. two bf16 releases trained in fp32).")] = "auto",
) -> None:
    """Measure the spectrum of every ΔW = TUNED − BASE and write a report (JSON, Markdown, HTML, figures).

    Example: spectra analyze ./llama-base ./llama-tuned -o reports/run1 --roles q,v
    (a VLM's language model alone: --stacks language; its vision tower alone: --stacks vision)

    Under torchrun (`torchrun --nproc-per-node 4 $(which spectra) analyze BASE TUNED -o out`) the modules
    are shared across ranks and rank 0 writes the report.
    """
    from spectra.errors import ConfigError

    if calibration is None and ctx.get_parameter_source("calibration_epsilon").name != "DEFAULT":
        raise ConfigError("--calibration-epsilon is the ridge of the calibration data's second moment, so without "
                          "--calibration it would be ignored; pass --calibration DATA, or drop it.")
    _writable(output, base, tuned, calibration, command="analyze", overwrite=overwrite)  # before the work
    from spectra.analysis import AnalysisConfig
    from spectra.analysis import analyze as run_analysis

    import os

    main_rank = os.environ.get("RANK", "0") == "0"
    # each level as typed (_NumberList): AnalysisConfig names one it refuses so (2, not 2.0)
    config = AnalysisConfig(method=method, full_below=full_below, max_rank=max_rank, thresholds=energy,
                            roles=_split(roles), stacks=_stacks(stacks), layers=_layer_range(layers),
                            include=include, exclude=exclude, dtype=dtype, device=device, seed=seed, resolve=resolve,
                            on_nonfinite="skip" if skip_nonfinite else "error",
                            calibration=str(calibration) if calibration else None,
                            calibration_epsilon=calibration_epsilon, base_rounding=base_rounding,
                            base_top_k=base_top_k, sketch_dtype=sketch_dtype)
    result = run_analysis(base, tuned, config, cache_dir=False if no_cache else (cache_dir or True), progress=not quiet,
                          read_ahead=read_ahead, read_ahead_mb=read_ahead_mb, workers=workers)
    if not main_rank:
        return  # under torchrun every rank holds the whole result; rank 0 writes it
    path = result.write_report(output, overwrite=overwrite)
    if not quiet:
        _print_summary(result.to_dict())
    _print_notes(result.to_dict(), quiet=quiet)  # a warning: shown under -q too (on stderr there)
    typer.echo(f"report: {path / 'report.html'}  (also report.md, analysis.json, figures/)")


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
    provenance = pairing.get("provenance")  # TUNED may not be of BASE: an adapter of another base, another model type
    if provenance:
        console.print(escape(f"warning: {provenance}"), style="yellow")
    notes = [str(n) for n in pairing.get("notes") or [] if n != provenance]  # tied weights, resized vocabularies, …
    for note in notes[:3]:
        console.print(escape(f"note: {note}"), style="yellow")
    if len(notes) > 3:
        console.print(escape(f"note: {len(notes) - 3} more pairing note(s) (report.md lists them all)"), style="yellow")
    unrelated = _unrelated_note(analysis)
    if unrelated is not None:
        console.print(escape(f"warning: {unrelated}"), style="yellow")
    for note in (analysis.get("calibration") or {}).get("notes") or []:  # e.g. texts cut at the model's positions
        # a note that names the calibration's own option ("calibration max_length: …") says it is the calibration's
        console.print(escape(f"note: {note}" if note.startswith("calibration") else f"note: calibration: {note}"),
                      style="yellow")


def _unrelated_note(analysis: dict) -> str | None:
    """:func:`~spectra.checkpoints.relatedness.unrelated_note` over the changed weight matrices (fused tensors by
    projection); None for a PEFT adapter as TUNED, whose update is its own whatever BASE is (its recorded base is
    checked instead: the pairing's provenance)."""
    from spectra.checkpoints.relatedness import unrelated_note
    from spectra.report.tables import by_projection, matrix_rows, unchanged

    if (analysis.get("tuned") or {}).get("format") == "peft-adapter":
        return None
    return unrelated_note(float(r["relative_size"]) for r in by_projection(matrix_rows(analysis))
                          if not unchanged(r) and r.get("relative_size") is not None)


# the columns that decide a rank, with labels short enough for an 80-column terminal
# (and the headline energy level's rank and share, E90 and E90/full by default)
_TERMINAL_COLUMNS = {"role": "role", "modules": "n", "full rank": "full", "entropy effective rank": "eff.",
                     "rank above noise floor": ">noise", "‖ΔW‖/‖W‖": "‖ΔW‖/‖W‖"}
