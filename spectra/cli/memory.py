"""`spectra memory`: the memory of fine-tuning a model, from its config.json alone."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape  # module names hold brackets ("c_attn[q]") that rich would read as markup

from spectra.cli.messages import _cli_words
from spectra.cli.options import _layers, _split, _stacks, _typed_int
from spectra.cli.tables import _fmt  # the run's numbers in its title: --batch 02 is "batch 2"


def memory(
    model: Annotated[str, typer.Argument(help="config.json, the model directory holding it, or a hub id.")],
    method: Annotated[Optional[str], typer.Option(help="full, lora, qlora or dora (default lora; dora for a plan "
                                                       "made with `recommend --dora`).")] = None,
    rank: Annotated[Optional[int], typer.Option(help="LoRA rank of every targeted module (default 16).",
                                                parser=_typed_int)] = None,
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
    batch: Annotated[int, typer.Option(help="Sequences per step.", parser=_typed_int)] = 1,
    seq_len: Annotated[Optional[int], typer.Option(help="Tokens per sequence (default 2048, or the model's position "
                                                        "limit when shorter; more than a learned position table, "
                                                        "GPT-2's or BERT's, is refused).", parser=_typed_int)] = None,
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
    # the library's refusal names its own argument, rank_plan_or_rank; refused here, not by min=1, whose range in
    # --help would widen the type column and cut the switches' names at 80 columns
    if rank is not None and rank < 1:
        raise ConfigError(f"--rank must be ≥ 1, got {rank}.")
    if plan is not None and method == "full":
        raise ConfigError("--method full trains every weight, so --plan would be ignored; drop one of them.")
    rank_or_plan = load_plan(plan) if plan else 16 if rank is None else rank  # 0 is refused, not read as 16
    if method is None:  # a DoRA plan (`recommend --dora`) is estimated as DoRA, as `spectra train` trains it
        method = "dora" if plan is not None and rank_or_plan.policy.use_dora else "lora"
    est = estimate_memory(model, method=method, rank_plan_or_rank=rank_or_plan,
                          batch=batch, seq_len=seq_len, precision=precision, optimizer=optimizer,
                          gradient_checkpointing=gradient_checkpointing, roles=_split(roles), stacks=_stacks(stacks),
                          attention=attention,
                          double_quant=double_quant, use_cache=use_cache, input_require_grads=input_require_grads,
                          layers_to_transform=_layers(layers))  # refused as typed: --layers 99-100
    if as_json:  # with what it was asked: the JSON describes its own run
        inputs = {"model": model, "method": method, "rank": None if plan else rank_or_plan, "plan": plan and str(plan),
                  "roles": _split(roles), **({"stacks": _stacks(stacks)} if stacks is not None else {}),
                  "layers": layers, "batch": batch, "seq_len": seq_len,
                  "gradient_checkpointing": gradient_checkpointing, "attention": attention,
                  "double_quant": double_quant, "use_cache": use_cache, "input_require_grads": input_require_grads}
        notes = [_cli_words(n, ["memory"]) for n in est.notes]  # "--seq-len: 64 tokens", not "seq_len (--seq-len)"
        typer.echo(json.dumps(est.to_dict() | {"notes": notes, "inputs": inputs}, indent=2))
        return
    table = Table("component", "bytes", "size",
                  title=f"{method} on {est.params:,} parameters ({est.trainable_params:,} trainable), "
                        f"batch {_fmt(batch)} × {_fmt(est.seq_len)} tokens, {est.precision}, {optimizer}")
    for name, n in est.rows():
        table.add_row(name, f"{n:,}", format_bytes(n))
    console = Console()
    console.print(table)
    for note in est.notes:  # what the estimate leaves out or adapts otherwise than asked (an MoE's experts), and why
        console.print(escape(f"note: {_cli_words(note, ['memory'])}"), style="yellow")
