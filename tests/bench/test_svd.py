"""The SVD benchmark runs end to end in quick mode (a smoke test, not a timing test)."""

from __future__ import annotations

import json

from spectra.bench import run_svd_bench


def test_quick_bench_writes_report(tmp_path):
    md = run_svd_bench(tmp_path, quick=True, kinds=("power_law",))
    data = json.loads((tmp_path / "bench_svd.json").read_text())
    assert md.exists() and (tmp_path / "bench_svd.png").stat().st_size > 1000
    row = data["rows"][0]
    assert row["adaptive"]["rank"] == row["adaptive"]["exact_rank"]
    assert row["topk"]["8"]["spectra randomized"]["err"] < 1e-3
    assert "svd_lowrank" in md.read_text()


def test_the_bf16_sketch_row_is_skipped_where_bf16_is_slower_and_measured_where_faster(tmp_path, monkeypatch):
    """An emulated bf16 GEMM (AVX2-only CPUs) would take minutes per matrix: the row says why it is missing."""
    from spectra.bench import svd as bench_svd

    for speedup, skipped in ((0.02, True), (4.0, False)):
        monkeypatch.setattr(bench_svd, "bfloat16_speedup", lambda device, s=speedup: s)
        md = run_svd_bench(tmp_path / str(speedup), quick=True, kinds=("power_law",))
        row = json.loads((tmp_path / str(speedup) / "bench_svd.json").read_text())["rows"][0]["topk"]["8"]
        bf16 = row["spectra randomized bf16 sketch"]
        assert ("skipped" in bf16) == skipped and ("s" in bf16) != skipped
        assert ("skipped: bf16 GEMMs 50× slower than float32 on this device" in md.read_text()) == skipped


def test_cli_bench_svd_quick(tmp_path):
    from typer.testing import CliRunner

    from spectra.cli import app

    result = CliRunner().invoke(app, ["bench", "svd", "--quick", "--kinds", "bf16", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "bench_svd.md").exists()


def test_short_runs_are_repeated_and_the_best_kept(monkeypatch):
    import time

    from spectra.bench import svd as bench_svd

    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002 if len(calls) > 1 else 0.02)  # the first call pays a one-off cost
        return len(calls)

    monkeypatch.setattr(bench_svd, "_QUICK_S", 0.05)  # a 0.02 s first run: repeated to fill 0.05 s
    best, out, _ = bench_svd._run(fn, repeats=1)
    assert len(calls) == 3 and out == 3 and best < 0.015  # best of three, not the warm-up
    calls.clear()
    monkeypatch.setattr(bench_svd, "_QUICK_S", 1.0)  # 50 would fill a second: capped at 20
    bench_svd._run(fn, repeats=1)
    assert len(calls) == 20
    calls.clear()
    monkeypatch.setattr(bench_svd, "_QUICK_S", 0.0)  # every run counts as long: no extra repeats
    bench_svd._run(fn, repeats=1)
    assert len(calls) == 1


def test_a_top_k_row_that_fell_back_to_a_full_decomposition_is_reported_without_a_gemm_bound(tmp_path, monkeypatch):
    """randomized_svd decomposes fully where no Krylov space fits beyond the answer (768×2304, k = 256 in a real
    run): no Krylov flops, so no GEMM bound to divide by; the report wrote a ZeroDivisionError after 19 minutes."""
    from spectra.linalg import svd
    from spectra.linalg.svd import _full_top

    monkeypatch.setattr(svd, "randomized_svd", lambda M, k, compute_vectors=False, **kw: _full_top(
        M, k, compute_vectors=compute_vectors, energy=float((M.double() ** 2).sum())))
    md = run_svd_bench(tmp_path, quick=True, kinds=("power_law",)).read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 160×256 | power_law | 8 |"))
    assert "full-gesdd" in row and row.endswith("| — (fell back to full) |")
