"""Worker threads: how the torch threads are split, and a pool that gives them back."""

from __future__ import annotations

import pytest
import torch

from spectra.errors import ConfigError
from spectra.workers import split_workers, thread_pool


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
