"""BufferPool / Lease: reuse, sizes and limits."""

from __future__ import annotations

import threading

import torch

from spectra.checkpoints.buffers import BufferPool


def test_a_closed_lease_hands_its_buffers_to_the_next():
    pool = BufferPool(max_free=4)
    with pool.lease() as lease:
        a = lease.take(1000, torch.float32)
        b = lease.take(1000, torch.bfloat16)
        assert a.dtype == torch.float32 and a.shape == (1000,) and b.dtype == torch.bfloat16 and b.shape == (1000,)
        assert a.data_ptr() != b.data_ptr()
        a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
    assert pool.idle_bytes == 6000
    with pool.lease() as lease:
        small = lease.take(300, torch.float32)  # 1200 bytes: the smallest that fits is the bf16 one
        big = lease.take(1000, torch.float32)
        assert (small.data_ptr(), big.data_ptr()) == (b_ptr, a_ptr)
        fresh = lease.take(1000, torch.float32)  # none left: a new buffer
        assert fresh.data_ptr() not in (a_ptr, b_ptr)
    assert pool.idle_bytes == 10000


def test_idle_buffers_are_bounded_keeping_the_largest():
    pool = BufferPool(max_free=2)
    with pool.lease() as lease:
        for n in (10, 30, 20):
            lease.take(n, torch.uint8)
    assert pool.idle_bytes == 50
    with pool.lease() as lease:
        assert lease.take(25, torch.uint8).numel() == 25  # the 30-byte buffer, viewed to size
    assert pool.idle_bytes == 50


def test_leases_from_threads_never_share_a_buffer():
    pool = BufferPool(max_free=8)
    seen, lock = [], threading.Lock()

    def work():
        for _ in range(50):
            with pool.lease() as lease:
                t = lease.take(256, torch.float32)
                t.fill_(threading.get_ident() % 1000)
                with lock:
                    seen.append(bool((t == threading.get_ident() % 1000).all()))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 200 and all(seen)
