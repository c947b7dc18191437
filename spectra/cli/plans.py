"""`spectra recommend` and `spectra extract`: per-module LoRA ranks from an analysis, and the adapter they make."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape  # module names hold brackets ("c_attn[q]") that rich would read as markup

from spectra.cli.messages import _cli_words, _command_options
from spectra.cli.options import (_OVERWRITE_HELP, _STACKS_HELP, _split, _stacks, _typed_float, _typed_int,
                                 _writable)
from spectra.cli.tables import _fmt, _module_table


def recommend(
    analysis: Annotated[list[str], typer.Argument(help="analysis.json or the report directory of `spectra analyze`; or "
                                                       "BASE TUNED, which are analysed first (cached).")],
    energy: Annotated[Optional[float], typer.Option(help="Per-module energy target τ (default 0.9 unless a budget, "
                                                         "--rank or --knee decides).", parser=_typed_float)] = None,
    noise: Annotated[bool, typer.Option(help="Cap ranks at the noise floor.")] = True,
    knee: Annotated[bool, typer.Option(help="Also target the elbow of the energy curve.")] = False,
    uniform: Annotated[bool, typer.Option(help="One power-of-two rank meeting the energy target on --uniform-share "
                                               "of modules.")] = False,
    uniform_share: Annotated[Optional[float], typer.Option(help="Share of modules the uniform rank must satisfy "
                                                                "(with --uniform; default 0.9).",
                                                           parser=_typed_float)] = None,
    rank: Annotated[Optional[int], typer.Option(help="One fixed rank for every module.", parser=_typed_int)] = None,
    budget: Annotated[Optional[str], typer.Option(help="Parameters (20M) or bytes of trainable state (2GB).")] = None,
    min_rank: Annotated[int, typer.Option(help="Smallest rank of a targeted module.", parser=_typed_int)] = 1,
    max_rank: Annotated[Optional[int], typer.Option(help="Largest rank of any module.", parser=_typed_int)] = None,
    power_of_two: Annotated[bool, typer.Option(help="Round ranks up to powers of two.")] = False,
    roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles to target, e.g. q,k,v,o (q also takes cross-attention's xq; xq only it).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help=_STACKS_HELP)] = None,
    include: Annotated[Optional[str], typer.Option(help="Target only names matching this glob (or re:REGEX).")] = None,
    rslora: Annotated[bool, typer.Option(help="Scale by α/√r (rsLoRA).")] = False,
    dora: Annotated[bool, typer.Option(help="Plan DoRA (adds magnitude vectors).")] = False,
    alpha_rule: Annotated[str, typer.Option(help="scale (α = --scale·r: one update scale for every module) or "
                                                 "constant (one α, --alpha, for every module).")] = "scale",
    scale: Annotated[Optional[float], typer.Option(help="The update scale α/r under --alpha-rule scale (default 2).",
                                                   parser=_typed_float)] = None,
    alpha: Annotated[Optional[float], typer.Option(help="The one α under --alpha-rule constant (default 16).",
                                                   parser=_typed_float)] = None,
    functional: Annotated[Optional[float], typer.Option(
        help="ε in the sweep metric's units: each module gets the smallest swept rank whose truncated model stays "
             "within ε of the full fine-tune (per role when the sweep has role curves). Needs --sweep; replaces "
             "--energy/--knee.", parser=_typed_float)] = None,
    sweep: Annotated[Optional[Path], typer.Option(help="Truncation sweep of the same pair (the directory or "
                                                       "sweep.json of `spectra sweep`), for --functional.")] = None,
    config: Annotated[Optional[str], typer.Option(help="Model config (file, dir or hub id) for the memory estimate, "
                                                       "the module names of the plan's peft_config and the ranks and "
                                                       "costs of fused MoE experts (one rank per fused parameter); "
                                                       "default: the analysed base, if local.")] = None,
    method: Annotated[Optional[str], typer.Option(help="Method for the memory estimate: lora, qlora or dora "
                                                       "(default lora; dora with --dora).")] = None,
    # min=1: refused as the command's input, where the library's refusal would read as "memory: no estimate"
    batch: Annotated[int, typer.Option(min=1, help="Batch size for the memory estimate.", parser=_typed_int)] = 1,
    seq_len: Annotated[Optional[int], typer.Option(min=1, help="Sequence length for the memory estimate (default "
                                                               "2048, or the model's position limit when "
                                                               "shorter).", parser=_typed_int)] = None,
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
    from spectra.ranks import RankPolicy, plan_document, recommend_ranks
    from spectra.ranks.plan import MetaModels, base_config, write_plan

    budget_kw = _budget(budget) if budget is not None else {}
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
    if uniform_share is not None and not uniform:
        raise ConfigError("--uniform-share sets the share of modules --uniform's one rank must satisfy; without "
                          "--uniform it would be ignored: add --uniform, or drop it.")
    if rank is not None and max_rank is not None and rank > max_rank:
        raise ConfigError(f"--rank {rank} is above --max-rank {max_rank}, which would cap every module at "
                          f"{max_rank}: drop one of them.")
    if rank is not None and 1 <= rank < min_rank:  # --rank 0 is refused as no rank at all, below
        raise ConfigError(f"--rank {rank} is below --min-rank {min_rank}, which would raise every module to "
                          f"{min_rank}: drop one of them.")
    uniform_share = 0.9 if uniform_share is None else uniform_share
    if method is not None and method not in ("lora", "qlora", "dora"):
        raise ConfigError(f"--method {method!r}: the memory estimate takes lora, qlora or dora.")
    if dora and method not in (None, "dora"):  # the estimate follows the plan's DoRA (QDoRA is not modelled)
        raise ConfigError(f"--dora plans DoRA, whose memory the estimate then takes, so --method {method} would be "
                          "ignored; drop one of them.")
    method = "dora" if dora else method or "lora"
    policy = RankPolicy(energy=energy, noise=noise, knee=knee, uniform=uniform, uniform_share=uniform_share,
                        rank=rank, min_rank=min_rank, max_rank=max_rank, power_of_two=power_of_two,
                        roles=_split(roles), stacks=_stacks(stacks), include=include, rslora=rslora, use_dora=dora,
                        alpha_rule=alpha_rule,
                        scale=2.0 if scale is None else scale, alpha=16.0 if alpha is None else alpha,
                        functional=functional, **budget_kw)
    model_config = load_config(config) if config else None  # its fused expert parameters set what ranks cost
    models = MetaModels()  # the model on the meta device, built once for the plan, its peft_config and memory
    plan = recommend_ranks(_analysis_or_pair(analysis), policy, sweep=sweep, model_config=model_config,
                           models=models)
    source = config or base_config(plan.base)  # the config.json beside the analysed base (a folder or a file)
    est, memory_skipped = None, None
    if source:
        try:
            est = estimate_memory(source, method=method, rank_plan_or_rank=plan, batch=batch,
                                  seq_len=seq_len, models=models)
        except ConfigError as exc:  # the estimate is an extra: a model the memory model lacks still gets its plan
            memory_skipped = _memory_words(str(exc))
    memory = {"memory": est.to_dict() | {"notes": [_memory_words(n) for n in est.notes]} if est else None}
    if memory_skipped:
        memory["memory_skipped"] = memory_skipped
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PeftConfigWarning)  # printed below from the plan, with the report
        document = plan_document(plan, model_config=model_config, models=models)
    notes = document.get("peft_config_notes") or []
    if output is not None:  # what --json prints: the plan, its peft_config and the memory estimate
        write_plan(document | memory, output)
    if as_json:
        typer.echo(json.dumps(document | memory, indent=2))
        return
    console = Console()
    rows = [(_fmt(m.role), "×".join(map(str, m.shape)), _fmt(m.rank), f"{m.alpha:g}",
             f"{m.energy:.1%}" + ("" if m.energy == m.energy_upper else f"–{m.energy_upper:.1%}"), f"{m.params:,}",
             m.reason) for m in plan.modules]
    head = (f" ({plan.total_params - plan.saved_params:,} LoRA + {plan.saved_params:,} of the head)"
            if plan.modules_to_save else "")
    # of the targeted modules' ΔW, then of the whole update's: a changed module left out (an embedding) is in that one
    energy = (f"{plan.total_energy:.1%} of their ΔW energy captured, {plan.whole_energy:.1%} of the whole update's "
              f"(they hold {plan.coverage:.1%} of its ‖ΔW‖_F²)")
    table = _module_table(f"LoRA plan: {len(plan.modules)} modules, {plan.total_params:,} parameters{head}, {energy}",
                          [m.name for m in plan.modules], rows,
                          ("role", "shape", "rank", "alpha", "energy", "params", "reason"), fold=("reason",))
    console.print(table)
    if plan.left_out:
        console.print(escape(f"left out ({len(plan.left_out)}): " + ", ".join(
            f"{m.name} [{m.reason}; rank {_fmt(m.rank)}]" for m in plan.left_out)))
    padded = [f for f in plan.fused if f.padding]
    if padded:  # in the title's total, in no row: PEFT trains every expert of a fused parameter at its one rank
        console.print(escape(f"fused experts: PEFT also trains {sum(f.padding for f in padded):,} parameters for "
                             "experts the plan leaves out, at their parameter's rank (in the total): "
                             + ", ".join(f"{f.name} {f.padding:,}" for f in padded[:3])
                             + (" …" if len(padded) > 3 else "")))
    if plan.modules_to_save:  # in the title's total, in no row: get_peft_model adds the task's head to modules_to_save
        task = plan.modules_to_save[0].task_type
        console.print(escape(f"+ {plan.saved_params:,} parameters of the head ("
                             + ", ".join(f"{m.name} {m.params:,}" for m in plan.modules_to_save)
                             + f"), trained in full by PEFT for {task}: it adds the head to modules_to_save "
                             "(in the total" + (" and the budget)" if plan.policy.has_budget else ")")))
    if plan.budget_gap:
        console.print(f"budget allocation within {plan.budget_gap:.2%} of ΔW energy of the optimum")
    if est is not None:
        console.print(f"memory ({est.method}, batch {_fmt(batch)} × {_fmt(est.seq_len)} tokens, {est.precision}): "
                      + ", ".join(f"{name} {format_bytes(n)}" for name, n in est.rows() if n))
        for note in est.notes:
            console.print(escape(f"memory note: {_memory_words(note)}"), style="yellow")
    elif memory_skipped:
        console.print(escape(f"memory: no estimate ({memory_skipped})"), style="yellow")
    else:
        console.print("memory: pass --config (config.json, its folder or a hub id) for an estimate")
    for note in notes:
        console.print(escape(f"peft_config: {note}"), style="yellow")
    if output is not None:
        console.print(escape(f"plan written to {output}"))


# the memory estimate's way of naming its argument with `spectra memory`'s option: "attention='eager' (--attention
# eager)", "seq_len (--seq-len)"
_FIELD_AND_OPTION = re.compile(r"\b([a-z][a-z0-9_]*)(?:=\S+)? \((--([\w-]+)(?: [^\s()]+)?)\)")


def _memory_words(text: str) -> str:
    """A refusal or note of the memory estimate in recommend's words: its arguments as recommend's options
    (``seq_len (--seq-len) 99999`` → ``--seq-len 99999``), and one recommend has no option for, which it leaves at
    `spectra memory`'s default, as that command's (``attention='eager' (--attention eager) is estimated`` →
    ``--attention eager (of `spectra memory`) is estimated``), so that --json's memory_skipped and notes, and the
    table's memory lines, name what a user can type."""
    text = _cli_words(text, ["recommend"])
    own = {flag for flag, _, _ in _command_options(["recommend"]).values()}

    def other(match: re.Match) -> str:
        field, option, name = match.groups()
        if name != field.replace("_", "-") or f"--{name}" in own:
            return match.group(0)
        return f"{option} (of `spectra memory`)"

    return _FIELD_AND_OPTION.sub(other, text)


def _budget(text: str) -> dict[str, int]:
    """--budget as RankPolicy's budget_params or budget_bytes, refused as typed: ``--budget 0.5`` said
    "RankPolicy.budget_params must be a positive integer, got 0" (the count rounded), ``--budget 1B`` "Cannot read
    budget '1B'" (no option named)."""
    from spectra.errors import ConfigError
    from spectra.ranks import parse_budget

    try:
        budget = parse_budget(text)
    except OverflowError:  # 1e400, 1e25: past any model's count (BudgetOverflow)
        raise ConfigError(f"--budget {text!r} is too large to count; give a budget like 20M or 2GB.") from None
    except ConfigError:
        bare_b = text.strip()[-1:] in ("b", "B")  # refused as ambiguous (only here: 2GB is read)
        raise ConfigError(f"--budget {text!r}: expected parameters like 20M or 1.5e6, or bytes like 2GB or 512MiB"
                          + (" (a bare B is refused: billions or bytes?)." if bare_b else ".")) from None
    (value,) = budget.values()
    if value < 1:
        unit = "parameter" if "budget_params" in budget else "byte"
        raise ConfigError(f"--budget {text!r} is less than one {unit}; give a positive budget like 20M or 2GB.")
    return budget


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


def extract(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint (directory, file, index JSON or hub id).")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same forms), or a PEFT adapter directory (its "
                                              "merge onto BASE, re-extracted at --rank or --plan).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Adapter directory to write (refused if it exists, unless --overwrite).")],
    plan: Annotated[Optional[Path], typer.Option(help="Plan JSON from `spectra recommend` (per-module ranks and alphas; the modules PEFT trains in full for a classifier's task type, its modules_to_save, are saved whole from TUNED).")] = None,
    rank: Annotated[Optional[str], typer.Option(help="One rank for every targeted module, or 'full': each at rank min(d_in, d_out), lossless for what the adapter holds (a note names the changed tensors it leaves out).")] = None,
    roles: Annotated[Optional[str], typer.Option(help="With --rank: roles to target (default q, k, v, o, gate, up, down; q also takes cross-attention's xq, k xk, v xv, o xo, and DeepSeek's q_a and q_b; k and v its kv_a and kv_b).")] = None,
    stacks: Annotated[Optional[str], typer.Option(help="With --rank: c" + _STACKS_HELP.removeprefix("C"))] = None,
    alpha: Annotated[Optional[float], typer.Option(help="With --rank: LoRA α, the adapter's lora_alpha (default scale 2: 2·rank, 2·√rank with --rslora).", parser=_typed_float)] = None,
    rslora: Annotated[bool, typer.Option("--rslora", help="With --rank: rsLoRA scaling α/√r.")] = False,
    modules_to_save: Annotated[Optional[str], typer.Option(help="Comma-separated modules copied whole from TUNED, e.g. classifier (matched at a dot; a module PEFT would also wrap, its name ending with one as a string, is saved too, with a note).")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration data (.txt, or .jsonl/.csv/.tsv with a text field): each module's data-optimal rank-r update, best on the base's inputs for these texts (SVD-LLM), instead of the plain truncated SVD.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=_OVERWRITE_HELP)] = False,
    device: Annotated[str, typer.Option(help="Torch device for ΔW and its SVD: cpu, cuda, cuda:1.")] = "cpu",
    workers: Annotated[Optional[int], typer.Option(help="Modules decomposed at once, each on its own thread with (torch threads ÷ workers) threads. Default: one per torch thread up to 4 on the CPU, 1 on a GPU.", parser=_typed_int)] = None,
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
    if rank is not None and rank != "full":  # an int option's text, as typed in a refusal ("²" was a traceback)
        try:
            number = _typed_int(rank)
        except ValueError:
            raise ConfigError(f"--rank {rank!r}: expected a positive integer or 'full'.") from None
        if number < 1:
            raise ConfigError(f"--rank must be ≥ 1, got {number}.")
        rank = int(number)  # the number: the table's ranks and the adapter's r are 3 for --rank +3, not "+3"
    target = plan if plan is not None else rank
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
        on_data = any(m.method.startswith("data-optimal") for m in result.modules)
        Console().print(_module_table(f"adapter {output}: {_counted(result)}",
                                      [m.name for m in result.modules], rows,
                                      ("rank", "alpha", "‖ΔW‖_F" + ("*" if on_data else ""),
                                       "error ‖ΔW − s·BA‖_F" + ("*" if on_data else ""), "energy kept")))
        if on_data:
            typer.echo("* on the calibration data (data-optimal rows): RMS over its tokens of ΔW·x and (ΔW − s·BA)·x, "
                       "analyze's rms_output_change; the other rows (no calibration moments) in Frobenius norm")
    for note in result.notes:
        typer.secho(f"note: {_cli_words(note, ['extract'])}", fg="yellow", err=True)
    if target == "full" and result.complete:  # said only where true: every changed tensor is in the adapter
        typer.echo("lossless: every tensor TUNED changed is in the adapter, each module at full rank, so PEFT's "
                   "merge gives TUNED back" + (" (to within TUNED's storage rounding of the tensors a note names)"
                                               if result.storage_rounded else ""))
    onto = f"a {result.model_class}" if result.model_class else "the model"
    if result.num_labels is not None:  # a head saved whole with TUNED's classes, another count than BASE's config's
        onto += (f" built with the fine-tune's classes, {result.model_class}.from_pretrained({base!r}, "
                 f"num_labels={result.num_labels}, ignore_mismatched_sizes=True),")  # BASE's own head of other classes
    if result.vocab_size is not None:  # whole embedding/head rows of TUNED's resized vocabulary: resize first
        onto += f" resized to the fine-tune's vocabulary, model.resize_token_embeddings({result.vocab_size}),"
    typer.echo(f"adapter: {output}  (load onto {onto} with peft.PeftModel.from_pretrained(model, '{output}'))")


def _counted(result) -> str:
    """What an extract's table counts, so it can be checked against PEFT: its rows, and where experts held in fused
    parameters make them more than the LoRA modules PEFT creates (``result.peft_modules``: all experts of Qwen2-MoE's
    ``mlp.experts.gate_up_proj`` are one), how many rows are expert slices and in how many PEFT modules those lie."""
    rows = len(result.modules)
    if result.peft_modules is None or result.peft_modules == rows:
        return f"{rows} modules"
    experts = sum(bool(re.search(r"\.experts\.\d+\.", m.name)) for m in result.modules)
    return (f"{rows} matrices in {result.peft_modules} PEFT LoRA modules ({experts} expert slices in "
            f"{result.peft_modules - (rows - experts)} of them)")
