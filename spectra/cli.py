"""The ``spectra`` command line: parse, make one library call, print or write.

Heavy imports (torch, transformers, matplotlib) happen inside commands so that
``spectra --help`` answers at once. All math lives in the library.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

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


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False) -> None:
    _state["debug"] = debug


# ---------------------------------------------------------------------------- checkpoints


@app.command()
def pairs(
    base: Annotated[str, typer.Argument(help="Pretrained checkpoint: directory, .safetensors/.bin file, index JSON or hub id.")],
    tuned: Annotated[str, typer.Argument(help="Fine-tuned checkpoint (same forms), or a PEFT adapter directory.")],
    roles: Annotated[Optional[str], typer.Option(help="Comma-separated roles to keep, e.g. q,k,v,o.")] = None,
    include: Annotated[Optional[str], typer.Option(help="Keep only names matching this glob (or re:REGEX).")] = None,
) -> None:
    """List the ΔW pairs spectra finds in BASE × TUNED (names, roles, layers, shapes), without any math."""
    from rich.console import Console
    from rich.table import Table

    from spectra.checkpoints.pairing import PairingOptions, iter_deltas

    options = PairingOptions(roles=_split(roles), include=include, load=False)
    table = Table("name", "role", "layer", "expert", "shape", "dtypes", "kind")
    for d in iter_deltas(base, tuned, options):
        table.add_row(d.name, d.role, _fmt(d.layer), _fmt(d.expert), "×".join(map(str, d.shape)),
                      f"{d.base_dtype}→{d.tuned_dtype}", d.kind)
    Console().print(table)


# ---------------------------------------------------------------------------- helpers


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _fmt(value) -> str:
    return "" if value is None else str(value)


def main() -> None:
    """Console entry point: turn spectra's own errors into one paragraph and exit code 2."""
    from spectra.errors import SpectraError

    try:
        app()
    except SpectraError as err:
        if _state["debug"]:
            raise
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        typer.echo("(run with --debug for the full traceback)", err=True)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
