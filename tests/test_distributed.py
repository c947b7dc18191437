"""torchrun sharding: cost-balanced shares, and 2 gloo ranks give the single-process rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import contextlib

import pytest

from spectra.bench.make_pair import PairConfig, make_pair
from spectra.distributed import World, entry_cost, shard, world
from spectra.errors import ConfigError


def test_shard_balances_cost_not_count():
    costs = [100.0, 50, 50, 1, 1, 1, 1, 1, 1, 1, 1, 1]  # one big entry, two medium, many small
    shares = shard(costs, 2)
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))  # every entry once
    loads = [sum(costs[i] for i in s) for s in shares]
    assert max(loads) - min(loads) <= 1  # by cost: 104 vs 105
    assert [0] == [i for i in shares[0] if costs[i] == 100] or [0] == [i for i in shares[1] if costs[i] == 100]
    by_count = [list(range(0, 6)), list(range(6, 12))]  # negative control: splitting by count is lopsided
    assert max(sum(costs[i] for i in s) for s in by_count) > 1.3 * max(loads)
    assert shard(costs, 2) == shares and all(s == sorted(s) for s in shares)  # deterministic, disk order kept
    assert shard(costs, 1) == [list(range(len(costs)))]


def test_entry_cost_and_bad_input(monkeypatch):
    assert entry_cost((2048, 5632)) > entry_cost((2048, 2048)) > entry_cost((256, 2048)) > entry_cost((2048,))
    # analyze's auto (sketched above 1024): a 256×2048 k_proj takes the full path, a 5632×2048 MLP the sketch;
    # measured at one thread (read + analysis) 11 ms against 71 ms, 0.155 — the full-flops model gave 0.0057
    ratio = entry_cost((256, 2048), 1024) / entry_cost((5632, 2048), 1024)
    assert 0.08 < ratio < 0.3 and entry_cost((256, 2048)) / entry_cost((5632, 2048)) < 0.01
    assert entry_cost((2048, 5632), 1024) > entry_cost((2048, 2048), 1024) > entry_cost((2048,), 1024)
    with pytest.raises(ConfigError):
        shard([1.0], 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert world() == World(0, 1) and not world().distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ConfigError, match="torchrun"):
        world()
    # under torchrun a fixed GPU would take every rank: refused before any process group starts
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ConfigError, match="every rank on that one GPU"):
        world("cuda:1")


_JOB = textwrap.dedent("""
    import json, os, sys, torch
    torch.set_num_threads(1)
    import spectra.linalg.hardware as hardware
    from spectra.analysis import AnalysisConfig, analyze
    # rank 1 measures another sketch dtype than rank 0: every rank must still take rank 0's
    hardware.fast_sketch_dtype = lambda device="cpu": "float32" if os.environ.get("RANK") == "1" else "bfloat16"
    pair, out = sys.argv[1], sys.argv[2]
    rank = os.environ.get("RANK", "0")
    r = analyze(pair + "/base", pair + "/tuned", AnalysisConfig(full_below=32, on_nonfinite="skip"),
                cache_dir=(os.environ.get("TEST_CACHE", "") + os.environ.get("TEST_CACHE_" + rank, "")) or False,
                progress=False, workers=int(os.environ.get("TEST_WORKERS_" + rank, os.environ.get("TEST_WORKERS", "1"))))
    json.dump({"timings": r.timings}, open(out + ".rank" + rank, "w"))
    if rank == "0":
        json.dump({"modules": r.modules, "timings": r.timings, "skipped": r.pairing["skipped"]}, open(out, "w"))
""")


def _plant_nan(pair, every: str) -> int:
    """NaN into the tuned side's tensors whose names end in `every` ("": all; each is then a skipped entry)."""
    from safetensors.torch import load_file, save_file

    planted = 0
    for path in (pair / "tuned").glob("*.safetensors"):
        tensors = load_file(path)
        for name, t in tensors.items():
            if name.endswith(every):
                t.view(-1)[3] = float("nan")
                planted += 1
        save_file(tensors, path, metadata={"format": "pt"})
    return planted


def _free_port() -> int:
    """A loopback port nobody listens on now (a fixed one can collide with another run)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(job, pair, out, env, **extra) -> list[dict]:
    """Run `job` on 2 gloo ranks; each rank's timings."""
    env = {**env, **extra}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(job), str(pair),
                           str(out)], env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return [json.loads(Path(f"{out}.rank{r}").read_text())["timings"] for r in "01"]


def test_two_gloo_ranks_match_single_process(tmp_path):
    pair = make_pair(tmp_path / "pair", PairConfig(shape="llama-tiny"))
    planted = _plant_nan(pair, "o_proj.weight")  # skipped entries beside computed ones
    job = tmp_path / "job.py"
    job.write_text(_JOB)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    single, multi = tmp_path / "single.json", tmp_path / "multi.json"
    subprocess.run([sys.executable, str(job), str(pair), str(single)], check=True, env=env, timeout=300)
    _torchrun(job, pair, multi, env)
    a, b = json.loads(single.read_text()), json.loads(multi.read_text())
    assert b["timings"]["world_size"] == 2 and a["timings"]["world_size"] == 1
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(a["modules"]) == strip(b["modules"])  # same rows, same order, bit for bit
    assert any(m.get("method") == "adaptive-bf16" for m in a["modules"])  # the sketch path ran on both,
    assert not any(m.get("method", "").startswith("adaptive-fp32") for m in b["modules"])  # in rank 0's dtype
    assert len(a["skipped"]) == planted > 1 and b["skipped"] == a["skipped"]
    # the entries were handed out one at a time: both ranks computed, none twice, none left out
    ranks = [json.loads((tmp_path / f"multi.json.rank{r}").read_text())["timings"] for r in "01"]
    assert [t["shared_by"] for t in ranks] == ["claims"] * 2
    assert min(t["modules_computed"] for t in ranks) > 0
    assert sum(t["modules_computed"] for t in ranks) == a["timings"]["modules_computed"]
    # resumed from a cache: each rank looks modules up, the lowest reports them, only the missing are computed
    cache = tmp_path / "cache"
    _torchrun(job, pair, multi, env, TEST_CACHE=str(cache))
    for lost in sorted(cache.rglob("*.json"))[:3]:
        lost.unlink()
    ranks = _torchrun(job, pair, multi, env, TEST_CACHE=str(cache))
    assert sum(t["modules_computed"] for t in ranks) == 3
    # the shared cache is read once in all, in turns: each rank parses and reports about half of it
    cached = [t["modules_cached"] for t in ranks]
    assert sum(cached) == a["timings"]["modules_computed"] - 3 and abs(cached[0] - cached[1]) <= 1
    assert strip(json.loads(multi.read_text())["modules"]) == strip(a["modules"])
    # an unreadable cache file (a torn or foreign one) is computed again, by whichever rank claims it
    files = sorted(cache.rglob("*-*.json"))
    files[0].write_text("{not json")
    files[1].write_text(json.dumps({"rows": []}))
    ranks = _torchrun(job, pair, multi, env, TEST_CACHE=str(cache))
    assert sum(t["modules_computed"] for t in ranks) == 2
    assert sum(t["modules_cached"] for t in ranks) == a["timings"]["modules_computed"] - 2
    assert strip(json.loads(multi.read_text())["modules"]) == strip(a["modules"])
    # caches of each node's own (a directory per rank): each finds what it computed, none is computed again
    own = dict(TEST_CACHE=str(tmp_path / "own"), TEST_CACHE_0="/r0", TEST_CACHE_1="/r1")
    first = _torchrun(job, pair, multi, env, **own)
    again = _torchrun(job, pair, multi, env, **own)
    assert sum(t["modules_computed"] for t in again) == 0 and min(t["modules_computed"] for t in first) > 0
    assert sum(t["modules_cached"] for t in again) == a["timings"]["modules_computed"]
    assert strip(json.loads(multi.read_text())["modules"]) == strip(a["modules"])
    # several workers a rank keep fixed shares (their scheduler picks from the whole share); so does every rank
    # when one has several (claims is collective: a rank with 2 workers left the other waiting in it)
    for workers in (dict(TEST_WORKERS="2"), dict(TEST_WORKERS_0="2")):
        ranks = _torchrun(job, pair, multi, env, **workers)
        assert [t["shared_by"] for t in ranks] == ["fixed shares"] * 2
        assert strip(json.loads(multi.read_text())["modules"]) == strip(a["modules"])
    # every tensor NaN: every entry either rank computes is skipped, and rank 0 lists rank 1's too (it did not)
    _plant_nan(pair, "")
    _torchrun(job, pair, multi, env)
    assert len(json.loads(multi.read_text())["skipped"]) == len(a["modules"]) + planted  # one per entry


def test_claims_hand_every_entry_out_once_whoever_asks():
    import torch.distributed as dist

    from spectra.distributed import Claims

    store = dist.HashStore()
    entries = list("abcdefg")
    first, second = Claims(entries, store, "k"), Claims(entries, store, "k")  # two ranks on one counter
    a, b = iter(first), iter(second)
    got = [next(a), next(b), next(b), next(a)]
    assert got == list("abcd")
    rest, none = list(a), list(b)  # one rank takes the rest; the other finds nothing left
    assert got + rest == entries and none == []
    first.finish(), second.finish()
    assert first.finished() == second.finished() == 2  # the job's count, whoever finished
    assert list(Claims(entries, store, "other")) == entries  # another run's counter starts afresh


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    pair = make_pair(tmp_path_factory.mktemp("claims") / "pair", PairConfig(shape="llama-tiny"))
    return pair / "base", pair / "tuned"


def test_read_ahead_takes_claimed_entries_as_slots_free(tiny_pair):
    """Under torchrun (one worker a rank) an entry is claimed from the other ranks when taken: the read-ahead takes
    the next one when a read-ahead slot is free (depth 2: three by the first yield), and yields them in order."""
    from spectra.analysis import AnalysisConfig, _read_ahead
    from spectra.checkpoints.pairing import Pairing

    pairing = Pairing(*tiny_pair, AnalysisConfig().pairing_options())
    entries = pairing.entries
    taken = []

    def claimed():
        for entry in entries:
            taken.append(entry.name)
            yield entry

    stream = _read_ahead(pairing, claimed(), 2, 1 << 30, known=entries)
    with contextlib.closing(stream):
        _, _, _, lease = next(stream)
        lease.close()
        assert len(taken) == 3  # the one handed out and two read ahead
        rest = [entry.name for entry, _, _, lease in stream if not lease.close()]
    assert rest == [e.name for e in entries[1:]] and taken == [e.name for e in entries]
    # without `known`, a claiming source is not read for the budget (it would claim every entry at once)
    from spectra.distributed import Claims
    import torch.distributed as dist

    store = dist.HashStore()
    stream = _read_ahead(pairing, Claims(entries, store, "k"), 2, 1 << 30)
    with contextlib.closing(stream):
        next(stream)[3].close()
        assert store.add("k", 0) == 3  # claimed: the one handed out and two read ahead
