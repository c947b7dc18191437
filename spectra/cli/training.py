"""`spectra train` and `spectra verify`: train an adapter (or a full fine-tune), and check one against the full
fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from spectra.cli.messages import _cli_words
from spectra.cli.options import (_OVERWRITE_HELP, _TASK_HELP, _NumberList, _split, _stacks, _typed_float,
                                 _typed_int, _typed_seed, _writable)
from spectra.cli.tables import _plain_table


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
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank of every targeted module (default 8).", parser=_typed_int)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA α (default scale 2: 2·rank, 2·√rank with --rslora).", parser=_typed_float)] = None,
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
        help="Share of --data held out without --eval-data (default 0.1, at least one example; 0: none).", parser=_typed_float)] = None,
    epochs: Annotated[int, typer.Option(help="Passes over the data.", parser=_typed_int)] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many steps, or when --epochs end if sooner (default: when --epochs end).", parser=_typed_int)] = None,
    batch_size: Annotated[int, typer.Option(help="Examples per step.", parser=_typed_int)] = 16,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per example (default 128, or the model's position limit when shorter, said in a note; a value beyond a learned position table, BERT's or GPT-2's, is refused).", parser=_typed_int)] = None,
    group_by_length: Annotated[bool, typer.Option(
        "--group-by-length", help="Batch texts of similar length together: ~2× faster on short texts of mixed "
                                  "length (less padding), batches a little less random.")] = False,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (default 5e-4 adapters, 1e-4 full).", parser=_typed_float)] = None,
    compute_dtype: Annotated[str, typer.Option(help="QLoRA compute dtype: float32, bfloat16 or float16.")] = "float32",
    teacher: Annotated[Optional[str], typer.Option(help="Distil from this checkpoint's outputs instead of labels.")] = None,
    gradient_checkpointing: Annotated[bool, typer.Option(
        "--gradient-checkpointing", help="Recompute each block in the backward instead of keeping its activations "
                                         "(less memory, ~1/3 more compute; `spectra memory` shows both).")] = False,
    device: Annotated[str, typer.Option(help="Where the model trains: cpu, cuda, cuda:1 (CUDA runs are not "
                                             "bit-reproducible).")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed (same seed, same adapter bytes on CPU).", parser=_typed_seed)] = 0,
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
    for note in result.notes:  # in train's words: "--max-length", not "max_length (--max-length)"
        typer.secho(f"note: {_cli_words(note, ['train'])}", fg="yellow", err=True)
    typer.echo(f"wrote {result.out_dir}  (training_log.jsonl, spectra_train.json)")


def verify(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint the adapter and the full fine-tune started from.")],
    tuned: Annotated[str, typer.Argument(help="The full fine-tune (e.g. from `spectra train --full`).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Report directory to write (refused if it exists, unless --overwrite).")] = Path("reports/verify"),
    adapter: Annotated[Optional[Path], typer.Option(help="An existing PEFT adapter to check (no training).")] = None,
    sweep: Annotated[Optional[str], typer.Option(help="Comma-separated ranks to train and check, e.g. 1,2,4,8,16.",
                                                 parser=_NumberList(int, "comma-separated ranks ≥ 1 like 1,2,4,8",
                                                                    least=1))] = None,
    method: Annotated[str, typer.Option(help="Sweep methods, e.g. lora,dora (qlora, qdora too).")] = "lora",
    data: Annotated[Optional[Path], typer.Option(help="Training data for --sweep.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Eval data: loss/accuracy of base, tuned, adapter, SVD.")] = None,
    eval_fraction: Annotated[Optional[float], typer.Option(
        help="Sweep: share of --data each run holds out for its own eval (default 0.1; 0 for none, e.g. one example).", parser=_typed_float)] = None,
    adapters_dir: Annotated[Optional[Path], typer.Option(help="Where --sweep puts adapters (default OUTPUT-adapters).")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="The plan from `spectra recommend`: its rank is marked.")] = None,
    recommended: Annotated[Optional[int], typer.Option(min=1, help="Rank to mark as recommended (instead of --plan).", parser=_typed_int)] = None,
    distill: Annotated[bool, typer.Option("--distill", help="Sweep: fit adapters to TUNED's outputs, not labels.")] = False,
    roles: Annotated[Optional[str], typer.Option(help="Sweep: roles to target (default every block linear).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help="Sweep: stacks whose modules of --roles to target, as `train "
                                                       "--stacks` takes them (default, as train's: the stacks text "
                                                       "runs through, a vision-language model's language model, not "
                                                       "its vision tower).")] = None,
    epochs: Annotated[int, typer.Option(help="Sweep: passes over the data.", parser=_typed_int)] = 1,
    max_steps: Annotated[Optional[int], typer.Option(help="Sweep: steps per run (default: when --epochs end).", parser=_typed_int)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Sweep: learning rate (default 5e-4, train's for adapters).", parser=_typed_float)] = None,
    group_by_length: Annotated[bool, typer.Option(
        "--group-by-length", help="Sweep: batch texts of similar length together (less padding; see `train`).")] = False,
    device: Annotated[str, typer.Option(help="Where the measures' SVDs, the evaluations and the sweep's training "
                                             "run: cpu, cuda, cuda:1.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of training and of any new head.", parser=_typed_seed)] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP + " With --sweep, each "
                                                                "{method}-r{rank} folder under --adapters-dir is "
                                                                "replaced too, by the same rule (one `train` wrote, or "
                                                                "empty), all checked before the first run trains. "
                                                                "A report of `verify --sweep` (sweep.json) may be "
                                                                "replaced by `verify --adapter`'s; a `spectra sweep` "
                                                                "report (also sweep.json) is refused.")] = False,
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
        for note in result.provenance:  # every measure against W rests on BASE being the adapter's model
            typer.echo(f"warning: {note}", err=True)
        if len(result.notes) > len(result.provenance):
            typer.echo(f"{len(result.notes) - len(result.provenance)} more note(s) in report.md (Notes) and "
                       "verify.json.")
        typer.echo(f"report: {path / 'report.html'}  (also report.md, verify.json, figures/)")
        return
    from spectra.lora.train import TrainConfig
    from spectra.ranks import load_plan

    if data is None:
        raise ConfigError("--sweep trains adapters: pass --data (the fine-tune's training data).")
    ranks = [int(r) for r in sweep]  # the numbers: --sweep 08 trains and names lora-r8, as rank_sweep does
    methods = _split(method) or ("lora",)
    adapters_dir = adapters_dir or output.with_name(output.name + "-adapters")
    from spectra.files import refuse_replacing_others

    for name in dict.fromkeys(f"{m}-r{r}" for m in methods for r in ranks):  # each run replaces its folder whole:
        refuse_replacing_others(adapters_dir / name, command="train", overwrite=overwrite,  # all checked before
                                option="--adapters-dir")  # the first trains
    if plan is not None and recommended is None:
        recommended = load_plan(plan).to_peft_config()["r"]
    if recommended is not None:  # the report's number, checked (≥ 1) as typed: --recommended 02 marks "r=2", not "02"
        recommended = int(recommended)
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
