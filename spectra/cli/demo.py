"""`spectra demo`: the whole story on a real pretrained model, offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from spectra.cli.options import _writable


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

    from transformers.utils import logging as hf_logging

    from spectra.demo.run import DemoConfig, run_demo

    start = time.perf_counter()
    # transformers' load reports ("classifier.weight | MISSING … newly initialized", 11 of them) tell of the heads
    # the demo starts fresh by design; its own errors still print
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        result = run_demo(DemoConfig(base=base), out_dir=output, cache_dir=cache_dir, progress=not quiet)
    finally:
        hf_logging.set_verbosity(verbosity)
    from spectra.demo.report import headline

    typer.echo("\n" + headline(result.summary))
    typer.echo("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.timings.items()))
    typer.echo(f"report: {result.out_dir / 'report.html'}  (also report.md, demo.json, figures/) — "
               f"{time.perf_counter() - start:.0f} s in all")
