"""`spectra sweep`: TUNED evaluated with every ΔW truncated to each rank, the functional rank curve."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape  # module names hold brackets ("c_attn[q]") that rich would read as markup

from spectra.cli.messages import _cli_message, _cli_words
from spectra.cli.options import (_OVERWRITE_HELP, _STACKS_HELP, _TASK_HELP, _NumberList, _split, _stacks,
                                 _typed_float, _typed_int, _typed_seed, _writable)


def sweep(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint (model directory with config.json).")],
    tuned: Annotated[str, typer.Argument(help="The full fine-tune (model directory with config.json).")],
    data: Annotated[Path, typer.Option(help="Eval data: .txt (perplexity), or .jsonl of {\"text\", \"label\"} / .csv/.tsv "
                                            "with text,label columns (accuracy), or {\"source\", \"target\"} records "
                                            "for an encoder-decoder (perplexity over target tokens).")],
    ranks: Annotated[str, typer.Option(help="Comma-separated ranks to evaluate (0: ΔW dropped, the base's weights).",
                                       parser=_NumberList(int, "comma-separated ranks ≥ 0 like 0,1,2,4,8",
                                                          least=0))] = "1,2,4,8,16,32,64",
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory to write (refused if it exists, unless --overwrite).")] = Path("reports/sweep"),
    non_target: Annotated[str, typer.Option(help="Norms, biases, heads, embeddings from: tuned, base or both.")] = "tuned",
    by_role: Annotated[bool, typer.Option("--by-role", help="Also one curve per role of each stack (that role truncated, the rest full; a vision tower's q is 'vision q').")] = False,
    metric: Annotated[Optional[str], typer.Option(help="accuracy, loss or perplexity (default: accuracy with labels, else perplexity).")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="A plan from `spectra recommend`: its modules are the targets of every curve, plus one point for the adapter `spectra extract --plan` writes (the base with each planned module at its rank, every other tensor the base's).")] = None,
    epsilon: Annotated[Optional[float], typer.Option(help="Mark the smallest rank within ε of the full fine-tune (metric units).", parser=_typed_float)] = None,
    analysis: Annotated[Optional[Path], typer.Option(help="With --epsilon: an analysis of the pair; writes OUTPUT/plan.json from the functional policy.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration data: truncate data-optimally (best on these inputs) instead of by Eckart–Young.")] = None,
    roles: Annotated[Optional[str], typer.Option(help="Roles to truncate (default every block linear: q, k, v, o, qkv, gate, up, down, gate_up; q also takes DeepSeek's q_a and q_b, k and v its kv_a and kv_b).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help=_STACKS_HELP)] = None,
    task: Annotated[str, typer.Option(help=_TASK_HELP)] = "auto",
    batch_size: Annotated[int, typer.Option(help="Eval examples per forward pass.", parser=_typed_int)] = 32,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example (default 128, or the model's position limit when shorter, said in a note; a value beyond a learned position table, BERT's or GPT-2's, is refused).", parser=_typed_int)] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap replicates of the intervals (0: none).", parser=_typed_int)] = 1000,
    device: Annotated[str, typer.Option(help="Where the model is evaluated: cpu, cuda, cuda:1.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.", parser=_typed_seed)] = 0,
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
    config = SweepConfig(roles=_split(roles), stacks=_stacks(stacks), task=task, batch_size=batch_size, max_length=max_length,
                         bootstrap=bootstrap, device=device, seed=seed)
    result = truncation_sweep(base, tuned, data, ranks=tuple(int(r) for r in ranks), plan=plan, metric=metric, non_target=non_target,
                              groups="both" if by_role else "model", calibration=calibration, config=config,
                              progress=not quiet)
    marks = {}
    if plan is not None:
        planned = sorted(m.rank for m in load_plan(plan).modules if m.rank)  # as the figure's star takes it
        if planned:
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
                typer.echo(f"functional rank ({group}, ε={epsilon}): {functional_text(c)}")  # as typed: 1e-5, not 1e-05
    for note in result.data["notes"]:  # in sweep's words: "--max-length", not "max_length (--max-length)"
        typer.secho(f"note: {_cli_words(note, ['sweep'])}", fg="yellow", err=True)
    if plan_error is not None:
        typer.secho(f"note: plan.json not written: {_cli_message(plan_error, ['sweep'])}", fg="yellow", err=True)
    typer.echo(f"report: {path / 'report.html'}  (also report.md, sweep.json, figures/"
               + (", plan.json)" if functional_plan is not None else ")"))
