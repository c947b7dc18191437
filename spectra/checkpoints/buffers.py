"""Reusable memory for ΔW while a model is streamed through the analysis.

A fresh float32 ΔW per module costs more than its subtraction: the kernel maps and zeroes
every 4 KiB page of a new large allocation on first touch (on a TinyLlama-shaped pair,
1.1 M page faults; 0.45 s instead of 1.05 s of CPU for 30 MLP modules when the buffer
is reused). :class:`BufferPool` keeps the buffers of finished modules and hands them to
the next ones.

Reuse needs a known end of use, so it is explicit: a consumer takes a :class:`Lease`,
reads one entry's ΔW into it (``Pairing.load(entry, lease=…)``), and closes the lease
once it holds no view of those tensors any more. Nothing else ever sees pooled memory.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["BufferPool", "Lease"]


class BufferPool:
    """Byte buffers handed out by :class:`Lease` and taken back when it closes (thread-safe).

    Parameters
    ----------
    max_free : int, default 4
        Most idle buffers kept; beyond it the smallest are dropped. With W workers each
        holding a lease of two buffers, ``2·W`` keeps every worker's pair warm.
    """

    def __init__(self, max_free: int = 4):
        self.max_free = max_free
        self._free: list[torch.Tensor] = []  # idle uint8 buffers
        self._lock = threading.Lock()

    def lease(self) -> Lease:
        return Lease(self)

    def _take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:  # the smallest that fits leaves the big ones for big modules
                return self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
        return torch.empty(nbytes, dtype=torch.uint8)

    def _give_back(self, buffers: list[torch.Tensor]) -> None:
        with self._lock:
            self._free.extend(buffers)
            self._free.sort(key=torch.Tensor.numel, reverse=True)
            del self._free[self.max_free:]

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._free)


class Lease:
    """The buffers one entry's ΔW lives in, from :meth:`BufferPool.lease`.

    :meth:`take` gives a flat tensor of any dtype; :meth:`close` returns every buffer
    taken to the pool. The holder must drop every view of them first (it is also a
    context manager that closes on exit).
    """

    def __init__(self, pool: BufferPool):
        self._pool = pool
        self._held: list[torch.Tensor] = []

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat, uninitialised tensor of `numel` elements of `dtype` (CPU)."""
        nbytes = numel * dtype.itemsize
        buffer = self._pool._take(nbytes)
        self._held.append(buffer)
        return buffer[:nbytes].view(dtype)

    def close(self) -> None:
        held, self._held = self._held, []
        self._pool._give_back(held)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
