"""Worker threads for per-module work (``spectra analyze``, ``spectra extract``).

On the CPU, several modules are worked on at once, each on its own thread running torch
with (torch threads ÷ workers) threads of its own: the serial work around one module's
GEMMs (QR, small eigen-solves, norms, Python) then overlaps another module's, which
keeps every core busy where one module with all threads would leave them idle between
its GEMMs. On a GPU one worker drives the device.
"""

from __future__ import annotations

import contextlib
import functools
import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from spectra.errors import ConfigError

__all__ = ["frozen_gc", "split_workers", "thread_pool"]


def split_workers(workers: int | None, device: str) -> tuple[int, int]:
    """(workers, torch threads per worker) from the request and this process's torch threads.

    ``None`` asks for one worker per torch thread, up to 4, on the CPU and 1 elsewhere.
    """
    available = torch.get_num_threads()
    if workers is None:
        workers = 1 if not device.startswith("cpu") else max(1, min(available, 4))
    if workers < 1:
        raise ConfigError(f"workers={workers} must be ≥ 1 (or None for one per torch thread, up to 4).")
    return workers, max(1, available // workers)


@contextlib.contextmanager
def thread_pool(workers: int, threads: int, name: str) -> Iterator[ThreadPoolExecutor]:
    """A pool of `workers` threads that each run torch with `threads` threads.

    On exit (an error or Ctrl-C included) work not yet started is cancelled, running work
    is waited for, and this process's torch thread count is put back: a worker's
    ``torch.set_num_threads`` also sets the default that every later thread starts with.
    """
    restore = torch.get_num_threads()
    pool = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads, initargs=(threads,),
                              thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(restore)


def frozen_gc(fn):
    """Decorate a long run so that Python's cyclic garbage collector skips the objects that exist before it.

    The objects alive at the call (torch's and transformers' modules, the caller's) are moved
    to the permanent generation for the run (:func:`gc.freeze`) and back after it
    (:func:`gc.unfreeze`), so the collections that the run's own allocations trigger traverse
    only what the run made. A full collection of the ~170k objects an ``analyze`` process
    tracks took ~0.08 s, holding the GIL, once or twice a TinyLlama-shaped run (the one under
    torchrun came at the rows' gather, which it made take 0.1 s instead of 0.02). A caller that
    froze objects itself keeps its own freeze untouched: nothing is frozen or unfrozen then.
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return run
