"""Whole-model analysis across processes and machines, under ``torchrun``.

``spectra analyze`` launched by ``torchrun --nproc-per-node N [--nnodes M …]`` runs
the same code in every process. The entries still to compute are handed out one at a
time, largest estimated cost first, to whichever rank asks next (:class:`Claims`: a
counter in the job's rendezvous store), so a rank that drew cheaper modules than the
estimate said takes more of them; each rank reads only the tensors of the entries it
claimed, and the finished rows are all-gathered so that rank 0 can write the report.
Where torchrun's store is not available to every rank, each rank takes a fixed share
instead, balanced by estimated cost (:func:`shard`). Every rank looks modules up in the
cache, and each cached one is read by one rank that holds it (:func:`cached_owners`), so a
resumed job on nodes with caches of their own computes none twice, and a shared cache is
parsed once in all. Every module's numbers depend only on that module and the config, so the
result equals a single-process run's.

torchrun is detected from its environment (``RANK``, ``WORLD_SIZE``); the process group
uses gloo on CPU and NCCL when the analysis runs on CUDA.
"""

from __future__ import annotations

import atexit
import heapq
import os
import uuid
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from spectra.errors import ConfigError

__all__ = ["World", "world", "entry_cost", "shard", "Claims", "claims", "cached_owners", "all_gather_rows"]


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    size: int = 1
    device: str = "cpu"  # where this rank computes: under torchrun with "cuda", the GPU of its LOCAL_RANK

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value` on every rank (`value` itself outside torchrun): one choice for a whole job."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def world(device: str = "cpu") -> World:
    """Join the torchrun process group if this process was launched by torchrun.

    Parameters
    ----------
    device : str
        The analysis device; ``"cuda…"`` selects the NCCL backend, anything else gloo.

    Returns
    -------
    World
        ``World(0, 1, device)`` outside torchrun (``WORLD_SIZE`` unset or 1); under torchrun on CUDA
        the device is this rank's ``cuda:LOCAL_RANK`` (a fixed ``cuda:N`` is refused).
    """
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World(device=device)
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        raise ConfigError("WORLD_SIZE is set but RANK/MASTER_ADDR are not: launch distributed runs with "
                          "`torchrun --nproc-per-node N spectra …` (or unset WORLD_SIZE for one process).")
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        if device != "cuda":
            raise ConfigError(f"device: {device!r} under torchrun would put every rank on that one GPU; "
                              "pass --device cuda, and each rank takes the GPU of its LOCAL_RANK.")
        # named explicitly: reader and worker threads start on GPU 0, whatever set_device chose here
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        # Tear the group down before the interpreter exits: a gloo/NCCL group left to static
        # destructors can abort the process ("terminate called without an active exception").
        atexit.register(_shutdown)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()  # nobody leaves while a peer still talks to it
        dist.destroy_process_group()


# One thread's cost model, in ns (an AVX-512 BF16 AMD EPYC, TinyLlama-1.1B-shaped bf16 pair, analyze's default):
_READ_NS = 1.2  # reading, up-casting and subtracting, an element (1.36 s for 1.1G)
_SKETCH_NS = 6.0  # the energy sketch and the metrics, an element (4.7–6.3 ns on 2048² … 5632×2048)
_GRAM_NS = 0.045  # the full path's float64 Gram, per m·n·min(m, n) (2 flops each at ~45 GFLOP/s)
_EIGEN_NS = 0.07  # its eigen-solve, per min(m, n)³ (~0.6 s at 2048)
_MATRIX_NS = 4e6  # what every matrix costs beside (noise floor, metrics, the row): ~4 ms


def entry_cost(shape: Sequence[int], sketched_above: int | None = None) -> float:
    """Estimated cost of one entry, in nanoseconds of one thread (only the ratios matter).

    A matrix (m, n) whose short side is above `sketched_above` goes to the energy sketch, whose
    passes cost ∝ m·n; any other one (all of them when `sketched_above` is None: method full,
    randomized or adaptive) to a full spectrum, ∝ m·n·min(m, n) for its float64 Gram plus
    min(m, n)³ for the eigen-solve. Every matrix pays reading and a fixed ~4 ms beside; a vector
    only its reading. The constants are one host's (bf16 power steps): with float32 steps the
    sketch's share is larger, and a module whose noise floor needs a float64 residual
    (:func:`spectra.linalg.noise.residual_error`: an fp32 fine-tune of a bf16 base under a large
    update; 13 ns an element on a 32000×2048 embedding) costs more than estimated. The full-spectrum-flops model this replaced weighed a 256×2048 k_proj (full
    path, 10 ms) at 1/176 of a 5632×2048 MLP (sketched, 57 ms), not 1/6.
    """
    dims = [int(x) for x in shape]
    if len(dims) < 2:
        return _READ_NS * (dims[0] if dims else 1)
    m, n = dims[0], 1
    for x in dims[1:]:
        n *= x
    short, size = min(m, n), float(m) * n
    if sketched_above is not None and short > sketched_above:
        work = _SKETCH_NS * size
    else:
        work = _GRAM_NS * size * short + _EIGEN_NS * float(short) ** 3
    return _READ_NS * size + work + _MATRIX_NS


def shard(costs: Sequence[float], size: int) -> list[list[int]]:
    """Split entry indices into `size` shares of nearly equal total cost.

    Longest processing time first (Graham 1969): entries in decreasing cost, each to the
    currently cheapest share; ties by index, so every rank computes the same split.
    Within a share, indices keep their original order (reads stay sequential on disk).

    Parameters
    ----------
    costs : sequence of float
        Cost of each entry.
    size : int
        Number of shares (ranks).

    Returns
    -------
    list of list of int
        ``size`` lists of entry indices; their union is every index once.

    References
    ----------
    .. [1] R. L. Graham, "Bounds on multiprocessing timing anomalies", SIAM J. Appl.
       Math. 17(2), 1969 (LPT is within 4/3 of the optimal makespan).
    """
    if size < 1:
        raise ConfigError(f"cannot shard over {size} ranks; need ≥ 1.")
    heap = [(0.0, r) for r in range(size)]
    shares: list[list[int]] = [[] for _ in range(size)]
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + costs[i], r))
    return [sorted(s) for s in shares]


class Claims:
    """`entries` handed out one at a time to whichever rank asks first, in their order.

    Each ``next`` atomically increments one counter in the job's store (``Store.add``, one
    round trip to rank 0's host) and takes the entry at the old value; past the last entry
    the iteration ends. Every rank must hold the same `entries` in the same order. With
    the largest entries first, a rank finishes at most the few small entries it read ahead
    after the others: fixed shares (:func:`shard`) lean on the cost model, whose errors stay
    (on the TinyLlama-shaped pair one rank computed 0.2 s longer of ~4 s; 0.05 s on claims).
    """

    def __init__(self, entries: Sequence, store: Any, key: str):
        self.entries, self.store, self.key = list(entries), store, key

    def __iter__(self) -> Iterator:
        while True:
            i = int(self.store.add(self.key, 1)) - 1
            if i >= len(self.entries):
                return
            yield self.entries[i]

    def finish(self) -> None:
        """Count one entry this rank has finished (in the store, for the job's progress)."""
        self.store.add(self.key + "/done", 1)

    def finished(self) -> int:
        """Entries finished so far by all ranks together."""
        return int(self.store.add(self.key + "/done", 0))


def claims(entries: Sequence, me: World, *, wanted: bool = True) -> Claims | None:
    """A :class:`Claims` over `entries` shared by every rank of the job, or None when not under torchrun,
    where some rank cannot reach the job's store, or where some rank does not want claims (`wanted` False:
    every rank then gets None, and they all shard alike). Collective: every rank calls it, with the same
    `entries`, whatever its `wanted`."""
    if not me.distributed:
        return None
    import torch.distributed as dist

    store = None
    if wanted:
        try:  # torchrun's rendezvous store, asked once: one that cannot count is no use
            from torch.distributed.distributed_c10d import _get_default_store

            store = _get_default_store()
            store.add("spectra/claims/probe", 0)
        except Exception:  # noqa: BLE001  a private API gone, or a store that does not answer: fixed shares
            store = None
    flags: list[Any] = [None] * me.size
    dist.all_gather_object(flags, store is not None)
    if not all(flags):
        return None
    return Claims(entries, store, me.broadcast(f"spectra/claims/{uuid.uuid4().hex}"))


def cached_owners(found: list[str], me: World) -> dict[str, int]:
    """{module name: the rank that reads and reports it} over every rank's `found` (collective).

    Every rank looks in its cache: on several nodes whose cache directories are their own,
    each holds the modules it computed, and a resumed job must not compute them again. Each
    cached module is read by one of the ranks that hold it, taken in turn (the i-th name of
    the job's sorted list by the i-th of its holders, modulo their count), so that a cache
    shared by every rank is parsed once in all, a 1/N share by each rank, instead of whole by
    every rank; its rows then travel in the final gather.
    """
    import torch.distributed as dist

    parts: list[Any] = [None] * me.size
    dist.all_gather_object(parts, found)
    holders: dict[str, list[int]] = {}
    for rank, names in enumerate(parts):  # in rank order: each holder list ascends
        for name in names:
            holders.setdefault(name, []).append(rank)
    return {name: holders[name][i % len(holders[name])] for i, name in enumerate(sorted(holders))}


def all_gather_rows(local: dict[str, Any], me: World) -> dict[str, Any]:
    """Union of every rank's ``{entry name: rows}`` (all ranks get all rows; rank 0 writes)."""
    if not me.distributed:
        return dict(local)
    import torch.distributed as dist

    parts: list[Any] = [None] * me.size
    dist.all_gather_object(parts, local)
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part)
    return merged
