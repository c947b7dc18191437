"""Worker threads: how the torch threads are split, and a pool that gives them back."""

from __future__ import annotations

import gc

import pytest
import torch

from spectra.errors import ConfigError
from spectra.workers import frozen_gc, split_workers, thread_pool


def test_split_workers(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    assert split_workers(None, "cpu") == (4, 2)  # one per thread, at most 4
    assert split_workers(None, "cuda:0") == (1, 8)  # one drives the GPU
    assert split_workers(3, "cpu") == (3, 2)
    assert split_workers(16, "cpu") == (16, 1)  # never below one thread each
    with pytest.raises(ConfigError, match="workers=0"):
        split_workers(0, "cpu")


def test_thread_pool_sets_worker_threads_and_restores_the_process_count():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with thread_pool(2, 1, "test") as pool:
            assert pool.submit(torch.get_num_threads).result() == 1  # the worker's own count
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="shutdown"):  # the pool was shut down on the way out
        pool.submit(torch.get_num_threads)


def test_workers_read_an_adapters_expert_factors_once_with_the_same_results(tmp_path, monkeypatch):
    """An adapter on Mixtral's fused experts (target_parameters), analysed by 3 workers: a module's experts go to
    different workers, which each read the module's LoRA factors again where another had taken them (8 factor
    tensors read 8–16 times, at random). Every factor tensor is read once now, and the rows are those of a run that
    reads the factors afresh for every expert."""
    from spectra.analysis import analyze
    from spectra.checkpoints.adapter import _HeldFactors
    from spectra.checkpoints.source import CheckpointSource
    from tests.checkpoints.test_adapter_pairing import _mixtral_adapter_on_experts

    base_dir, adapter_dir = _mixtral_adapter_on_experts(tmp_path)
    reads: dict[str, int] = {}
    read = CheckpointSource.read

    def counted(self, name):
        reads[name] = reads.get(name, 0) + 1
        return read(self, name)

    def rows(**kwargs):
        result = analyze(base_dir, adapter_dir, cache_dir=False, progress=False, workers=3, **kwargs)
        return {r["name"]: {k: v for k, v in r.items() if k != "seconds"} for r in result.modules}

    monkeypatch.setattr(CheckpointSource, "read", counted)
    held = rows()
    factors = {k: n for k, n in reads.items() if "experts" in k and "lora_" in k}
    assert len(factors) == 8 and set(factors.values()) == {1}  # A, B of gate_up_proj and down_proj; two layers
    monkeypatch.setattr(_HeldFactors, "read", lambda self, weights, holder, key, device, dtype:
                        weights.read(key).to(device=device, dtype=dtype))  # every expert reads its own
    assert rows() == held
    assert len(held) == 2 * (1 + 1 + 3 * 3)  # per layer: q_proj, the router, 3 experts × w1, w3, w2


def test_frozen_gc_freezes_what_exists_for_the_run_and_restores_it():
    """Inside the run the objects alive before it are frozen (collections skip them); after it, returned or raised,
    nothing is; a caller's own freeze is left as it was. Negative control: analyze is decorated (its collections
    had taken ~0.08 s of full traversals a run)."""
    from spectra.analysis import analyze

    assert gc.get_freeze_count() == 0
    before = object()  # noqa: F841 (alive before the run)
    seen = []
    run = frozen_gc(lambda: seen.append(gc.get_freeze_count()) or "done")
    assert run() == "done" and seen[0] > 1000 and gc.get_freeze_count() == 0

    def fails():
        seen.append(gc.get_freeze_count())
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        frozen_gc(fails)()
    assert seen[1] > 1000 and gc.get_freeze_count() == 0
    gc.freeze()  # the caller's own
    try:
        frozen = gc.get_freeze_count()
        run()
        # left as it was: a frozen object may die meanwhile (CI saw 2 of 1,350,701 go: another test's thread), but a
        # freeze of the run's own would add every object made since, and an unfreeze would leave 0
        assert frozen - 100 < seen[2] <= frozen and frozen - 100 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
    assert analyze.__wrapped__ is not None
