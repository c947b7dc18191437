"""The ``spectra`` command line: parse, make one library call, print or write.

Heavy imports (torch, transformers, matplotlib) happen inside commands so that
``spectra --help`` answers at once. All math lives in the library. One module per
command group; this one makes the app, registers the commands in the order
``spectra --help`` lists them, and runs them (:func:`main`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from spectra.cli import analysis, bench, demo, memory, plans, sweep, training
from spectra.cli.messages import _cli_message, _cli_words, _quiet_third_party
from spectra.cli.switches import SpectraCommand

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


# the commands, in the order `spectra --help` lists them (their --help never cuts a switch's name: switches.py)
app.command(cls=SpectraCommand)(analysis.pairs)
app.command(cls=SpectraCommand)(demo.demo)
app.command(cls=SpectraCommand)(analysis.analyze)
app.command(cls=SpectraCommand)(analysis.show)
app.command(cls=SpectraCommand)(plans.recommend)
app.command(cls=SpectraCommand)(plans.extract)
app.command(cls=SpectraCommand)(memory.memory)
app.command(cls=SpectraCommand)(training.train)
app.command(cls=SpectraCommand)(training.verify)
app.command(cls=SpectraCommand)(sweep.sweep)
bench_app.command("svd", cls=SpectraCommand)(bench.bench_svd)
bench_app.command("train", cls=SpectraCommand)(bench.bench_train)
bench_app.command("verify", cls=SpectraCommand)(bench.bench_verify)
bench_app.command("make-pair", cls=SpectraCommand)(bench.bench_make_pair)
bench_app.command("e2e", cls=SpectraCommand)(bench.bench_e2e)


def _stop_on_ctrl_c(command):
    """Wrap a command so Ctrl-C ends it with one line and exit code 130 (whatever Typer/Click's own handling)."""
    import functools

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Exception as err:
            if not _from_ctrl_c(err):
                raise
            stopped = err  # Ctrl-C inside an import, re-raised by Python as its own error (matplotlib's
        except KeyboardInterrupt as err:  # lazy import: "RuntimeError: Error calling __set_name__")
            stopped = err
        _close_progress_bars()
        if _state["debug"]:
            raise stopped
        typer.echo("stopped (Ctrl-C).", err=True)
        raise typer.Exit(130) from None

    return run


def _from_ctrl_c(err: BaseException) -> bool:
    """Whether a KeyboardInterrupt is behind `err` (its cause or context, at any depth)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, KeyboardInterrupt):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def _close_progress_bars() -> None:
    """Close every tqdm bar still open, each left at its last state on a line of its own.

    A bar ends its line without a newline ("\ranalyze:  35%|…"), so a message printed while one is open landed on
    the bar's line, and the bar, closed when collected at exit, was drawn again after it: in a log, the error was
    glued to the bar and hidden by its redraw. Closed here, the bar says where the command stopped, and the message
    that follows (an error, "stopped (Ctrl-C).", a traceback) starts a line. No bar was made where tqdm was never
    imported (``spectra --help``, a usage error)."""
    std = sys.modules.get("tqdm.std")
    if std is None:
        return
    for bar in sorted(list(std.tqdm._instances), key=lambda bar: abs(getattr(bar, "pos", 0))):
        bar.leave = True  # train's bar clears itself (leave=False): on an error, its last state tells where
        bar.close()  # a disabled bar (-q, not rank 0) does nothing


def _interruptible(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        info.callback = _stop_on_ctrl_c(info.callback)
    for group in typer_app.registered_groups:
        _interruptible(group.typer_instance)


_interruptible(app)  # every command above, bench's included


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
        _close_progress_bars()
        if _state["debug"]:
            raise
        message = _cli_message(err, sys.argv[1:]) if isinstance(err, SpectraError) else str(err)
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        typer.echo("(run with --debug for the full traceback)", err=True)
        sys.exit(2)
    except BaseException as err:  # a bug's traceback, --debug's, Ctrl-C under --debug: on a line of its own too
        if not (isinstance(err, SystemExit) and err.code in (0, None)):  # Click ends every run with SystemExit
            _close_progress_bars()
        raise
    finally:
        warnings.showwarning = default_show  # main() called in-process (tests) leaves the caller's display
