"""`spectra bench …`: benchmarks of this machine, side by side with peers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from spectra.cli.options import _NumberList, _split, _typed_float, _typed_int, _typed_seed, _writable


def bench_svd(
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for bench_svd.{md,json,png}.")] = Path("reports/bench"),
    shapes: Annotated[Optional[str], typer.Option(help="Comma-separated OUTxIN shapes (default: issue 3's four, 1024x1024, 768x2304, 4096x4096, 4096x11008; with --quick tiny ones).",
                                                  parser=_NumberList(int, "OUTxIN shapes like 1024x1024,768x2304, each "
                                                                          "size a positive integer", least=1,
                                                                     form="OUTxIN"))] = None,
    kinds: Annotated[str, typer.Option(help="Spectrum types: planted,power_law,bf16.")] = "planted,power_law,bf16",
    ks: Annotated[str, typer.Option(help="Comma-separated top-k sizes (singular values computed).",
                                    parser=_NumberList(int, "top-k sizes like 64,256, each a positive integer",
                                                       least=1))] = "64,256",
    quick: Annotated[bool, typer.Option(help="Tiny shapes, seconds (a smoke test).")] = False,
    repeats: Annotated[int, typer.Option(min=1, help="Runs per measurement; the best is kept (runs under 1 s are repeated for about a second, 3–20 times).", parser=_typed_int)] = 1,
    # 0 … 2³²−1: scikit-learn's randomized_svd, a peer, takes no other seed
    seed: Annotated[int, typer.Option(min=0, max=2**32 - 1, help="Seed of the test matrices and sketches.", parser=_typed_int)] = 0,
) -> None:
    """Time spectra's full, randomized and adaptive SVD side by side with torch, scikit-learn and SciPy."""
    from spectra.bench.svd import DEFAULT_SHAPES, run_svd_bench

    shape_list = DEFAULT_SHAPES if shapes is None else tuple(tuple(map(int, s)) for s in shapes)
    # the numbers, not their text: the bench names its shapes and sizes in its tables and files (--ks 064: 64)
    path = run_svd_bench(out, shapes=shape_list, kinds=_split(kinds), ks=tuple(map(int, ks)), quick=quick,
                         repeats=repeats, seed=seed)
    typer.echo(f"wrote {path}")


def bench_train(
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for train.{md,json}.")] = Path("reports/bench"),
    steps: Annotated[int, typer.Option(min=1, help="Timed steps per loop (after warm-up).", parser=_typed_int)] = 20,
    quick: Annotated[bool, typer.Option(help="A tiny model and few steps (a smoke test).")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the model and batch.", parser=_typed_seed)] = 0,
) -> None:
    """Time the trainer's step against a plain PEFT loop on the same model and batch."""
    from spectra.bench.train import run_train_bench

    # the number (checked ≥ 1 as typed above): train.md says "20 timed steps" for --steps 020, not "020"
    path = run_train_bench(out, steps=int(steps), quick=quick, seed=seed)
    typer.echo(f"wrote {path}")


def bench_verify(
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for verify.{md,json}.")] = Path("reports/bench"),
    quick: Annotated[bool, typer.Option(help="One tiny module, both paths forced (a smoke test).")] = False,
) -> None:
    """Time verify's per-module measures with full SVDs and with certified partial decompositions, side by side."""
    from spectra.bench.verify import run_verify_bench

    path = run_verify_bench(out, quick=quick)
    typer.echo(f"wrote {path}")


def bench_make_pair(
    out: Annotated[Path, typer.Argument(help="Directory to create: OUT/base, OUT/tuned, OUT/ground_truth.json.")],
    shape: Annotated[str, typer.Option(help="Model shapes: tinyllama-1.1b, llama-2-7b, llama-110m, llama-tiny.")] = "tinyllama-1.1b",
    seed: Annotated[int, typer.Option(help="Seed of every tensor.", parser=_typed_seed)] = 0,
    relative_size: Annotated[float, typer.Option(help="‖ΔW‖/‖W‖ per module.", parser=_typed_float)] = 1e-2,
    tail: Annotated[float, typer.Option(help="Share of ‖ΔW‖² in the broad Gaussian tail.", parser=_typed_float)] = 0.03,
    rank_scale: Annotated[float, typer.Option(help="Multiplies every role's planted effective rank.", parser=_typed_float)] = 1.0,
    # min=1: refused as typed, in MB, before it becomes PairConfig.shard_bytes (-3 MB read "got -3145728")
    shard_mb: Annotated[int, typer.Option(min=1, help="Largest safetensors shard, MB.", parser=_typed_int)] = 2048,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing OUT that make-pair wrote (base/, tuned/, ground_truth.json; swapped in when complete); a folder holding any other file is refused.")] = False,
) -> None:
    """Write a realistic bf16 base × tuned pair with a real model's names, shapes and sharding (tensor by tensor)."""
    _writable(out, command="bench make-pair", overwrite=overwrite or (out.is_dir() and not any(out.iterdir())))
    from spectra.bench.make_pair import PairConfig, make_pair

    config = PairConfig(shape=shape, seed=seed, relative_size=relative_size, tail=tail, rank_scale=rank_scale,
                        shard_bytes=shard_mb << 20)
    path = make_pair(out, config, overwrite=overwrite, progress=True)
    typer.echo(f"wrote {path}/base, {path}/tuned and {path}/ground_truth.json")


def bench_e2e(
    pair: Annotated[Optional[Path], typer.Option(help="A pair written by `spectra bench make-pair` (default: make one under --work).")] = None,
    out: Annotated[Path, typer.Option("-o", "--output", "--out", help="Output directory for e2e.{md,json}.")] = Path("reports/bench"),
    work: Annotated[Path, typer.Option(help="Scratch directory for the generated pair, caches and peer outputs.")] = Path("/tmp/spectra-e2e"),
    shape: Annotated[str, typer.Option(help="Shapes of the generated pair when --pair is not given.")] = "tinyllama-1.1b",
    quick: Annotated[bool, typer.Option(help="Tiny pair, no peers, no SIGKILL run: a smoke test in seconds.")] = False,
    skip: Annotated[Optional[str], typer.Option(help="Comma-separated parts to skip: full, peers, kill, torchrun.")] = None,
    peer_timeout: Annotated[float, typer.Option(help="Seconds a peer may run before it is stopped (reported as a lower bound).", parser=_typed_float)] = 900,
) -> None:
    """End-to-end: spectra (default and forced full SVD), I/O and GEMM floors, peers, resume after SIGKILL, torchrun."""
    from spectra.bench.e2e import run_e2e_bench

    path = run_e2e_bench(out, pair=pair, work=work, shape="llama-tiny" if quick else shape, quick=quick,
                         skip=_split(skip) or (), peer_timeout=peer_timeout)
    typer.echo(f"wrote {path}")
