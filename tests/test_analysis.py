"""Whole-model analysis on tiny built models with planted per-module ranks."""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import math
import re
import warnings

import numpy as np
import pytest
import torch

import spectra.analysis as analysis_mod
from spectra.analysis import AnalysisConfig, AnalysisResult, analyze
from spectra.report.tables import summary_rows
from tests.models import build_model, flat_update, nonfinite_pair, planted_models, save

# planted rank per module (equal singular values, so the energy-90% rank is exactly the rank)
PLANTED = {
    "model.layers.0.self_attn.q_proj": 3, "model.layers.1.self_attn.q_proj": 5,
    "model.layers.0.self_attn.v_proj": 2, "model.layers.1.self_attn.v_proj": 4,
    "model.layers.0.mlp.down_proj": 6, "model.layers.1.mlp.up_proj": 1,
}


@pytest.fixture(scope="module")
def planted_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("planted")
    base, tuned = planted_models("llama", {name + ".weight": rank for name, rank in PLANTED.items()})
    return save(base, root / "base", "safetensors"), save(tuned, root / "tuned", "safetensors")


def strip_timing(modules):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in modules]


def test_energy_rank_equals_planted_rank(planted_pair):
    result = analyze(*planted_pair, cache_dir=False, progress=False)
    for name, rank in PLANTED.items():
        row = result.module(name)
        assert row["energy_rank"]["0.9"] == rank, name
        assert row["energy_rank"]["0.5"] == (rank + 1) // 2, name  # equal σ: half the energy at ⌈r/2⌉
        assert row["gd_rank"] == rank and row["noise"]["rank_above"] == rank, name  # float32 pair: floor negligible
        assert row["effective_rank"] == pytest.approx(rank, rel=1e-4)  # equal σ → entropy rank = rank
        assert row["stable_rank"] == pytest.approx(rank, rel=1e-4)
        s = np.asarray(row["singular_values"])
        assert s[:rank] == pytest.approx(0.05, rel=1e-4) and np.all(s[rank:] < 1e-5)
        assert row["method"].startswith("full") and row["complete"]
    untouched = result.module("model.layers.0.self_attn.k_proj")
    assert untouched["fro_norm"] == 0 and untouched["energy_rank"]["0.9"] == 0
    vectors = [m for m in result.modules if m["kind"] == "vector"]
    assert vectors and all(m["fro_norm"] == 0 for m in vectors)


def test_per_role_table_aggregates(planted_pair):
    result = analyze(*planted_pair, cache_dir=False, progress=False)
    rows = {r["role"]: r for r in summary_rows(result.to_dict())}
    q_ranks = [result.module(f"model.layers.{i}.self_attn.q_proj")["energy_rank"]["0.9"] for i in (0, 1)]
    assert rows["q"]["modules"] == 2
    assert rows["q"]["energy_rank_0.9"]["median"] == pytest.approx(np.median(q_ranks))
    assert rows["q"]["energy_rank_0.9"]["min"] == min(q_ranks) and rows["q"]["energy_rank_0.9"]["max"] == max(q_ranks)


def test_report_files_html_and_json_round_trip(planted_pair, tmp_path):
    result = analyze(*planted_pair, cache_dir=False, progress=False)
    out = result.write_report(tmp_path / "report")
    for name in ("analysis.json", "report.md", "report.html"):
        assert (out / name).is_file()
    assert len(list((out / "figures").glob("*.png"))) >= 4
    html = (out / "report.html").read_text()
    images = re.findall(r'<img[^>]+src="([^"]+)"', html)
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    assert base64.b64decode(images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    loaded = AnalysisResult.load(out)
    assert loaded.to_dict() == json.loads(json.dumps(result.to_dict()))
    assert loaded.config["thresholds"] == [0.5, 0.9, 0.95, 0.99]
    assert loaded.base["fingerprint"] == result.base["fingerprint"]


def test_interrupted_run_resumes_and_matches(planted_pair, tmp_path, monkeypatch):
    reference = analyze(*planted_pair, cache_dir=False, progress=False)
    calls = []
    real = analysis_mod.analyze_delta

    def counting(d, config):
        calls.append(d.name)
        return real(d, config)

    monkeypatch.setattr(analysis_mod, "analyze_delta", counting)

    class Crash(Exception):
        pass

    def crash_after(n):
        done = []

        def hook(name, rows):
            done.append(name)
            if len(done) == n:
                raise Crash

        return hook

    finished = []
    hook = crash_after(5)

    def record(name, rows):
        finished.extend(r["name"] for r in rows)
        hook(name, rows)

    with pytest.raises(Crash):
        analyze(*planted_pair, cache_dir=tmp_path, progress=False, on_module=record)
    calls.clear()
    resumed = analyze(*planted_pair, cache_dir=tmp_path, progress=False)
    assert finished and not set(finished) & set(calls), "modules finished before the crash were recomputed"
    assert resumed.timings["modules_cached"] == 5
    assert strip_timing(resumed.modules) == strip_timing(reference.modules)
    calls.clear()
    again = analyze(*planted_pair, cache_dir=tmp_path, progress=False)
    assert calls == [] and again.timings["modules_computed"] == 0  # a re-run is instant
    analyze(*planted_pair, AnalysisConfig(thresholds=(0.8,)), cache_dir=tmp_path, progress=False)
    assert calls, "a changed config must invalidate the cache"


def test_bf16_noise_floor_sits_at_planted_rank(tmp_path):
    """A small rank-4 update on bf16 weights: energy ranks swell with rounding noise, the floor does not."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=128, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=32)
    base = tf.LlamaForCausalLM(cfg).to(torch.bfloat16)
    tuned = copy.deepcopy(base)
    w = tuned.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        update = flat_update((128, 128), 4, seed=0, scale=1.0)
        w.copy_((w.double() + update * 0.005 * float(w.double().norm()) / float(update.norm())).to(torch.bfloat16))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    row = analyze(b, t, AnalysisConfig(roles=("q",)), cache_dir=False, progress=False).module("model.layers.0.self_attn.q_proj")
    assert row["noise"]["rank_above"] == 4
    assert row["gd_rank"] == 4
    assert row["energy_rank"]["0.99"] > 4  # the rounding noise holds more than 1% of the energy
    assert row["base_dtype"] == "bfloat16" and row["noise"]["sigma"] > 0


def test_adaptive_path_matches_full(planted_pair):
    full = analyze(*planted_pair, AnalysisConfig(roles=("q", "down")), cache_dir=False, progress=False)
    adaptive = analyze(*planted_pair, AnalysisConfig(roles=("q", "down"), full_below=8), cache_dir=False, progress=False)
    for a, f in zip(adaptive.matrices(), full.matrices()):
        assert a["name"] == f["name"]
        if f["fro_norm"]:
            assert a["method"].startswith("adaptive")
            assert a["energy_rank"] == f["energy_rank"]
            k = len(a["singular_values"])
            np.testing.assert_allclose(a["singular_values"][: f["energy_rank"]["0.99"]],
                                       f["singular_values"][: f["energy_rank"]["0.99"]], rtol=1e-4)
            assert k < len(f["singular_values"]) or a["complete"]


def test_method_adaptive_keeps_every_value_of_a_full_fall_back(planted_pair):
    """`--method adaptive` on matrices too small for Krylov steps decomposes them fully: the row is then
    complete, with the full path's noise-floor and Gavish–Donoho ranks (it had kept only the energy rank's
    values: complete false, noise rank null)."""
    full = analyze(*planted_pair, AnalysisConfig(roles=("q", "down")), cache_dir=False, progress=False)
    adaptive = analyze(*planted_pair, AnalysisConfig(roles=("q", "down"), method="adaptive"), cache_dir=False,
                       progress=False)
    fell_back = [(a, f) for a, f in zip(adaptive.matrices(), full.matrices()) if a["method"] == "adaptive->full"]
    assert fell_back
    for a, f in fell_back:
        assert a["complete"] and len(a["singular_values"]) == len(f["singular_values"])
        assert a["noise"] == f["noise"] and a["gd"] == f["gd"] and a["gd_rank"] == f["gd_rank"]
        assert a["noise"]["rank_above"] is not None
        assert a["energy_rank"] == f["energy_rank"]
        assert a["effective_rank"] == pytest.approx(f["effective_rank"], rel=1e-5)


def test_base_top_singular_values_match_numpy(planted_pair):
    default = analyze(*planted_pair, AnalysisConfig(roles=("o",)), cache_dir=False, progress=False)
    assert default.module("model.layers.0.self_attn.o_proj")["base_top_singular_values"] == []  # asked for, not default
    result = analyze(*planted_pair, AnalysisConfig(roles=("o",), base_top_k=16), cache_dir=False, progress=False)
    from spectra.checkpoints.source import open_checkpoint

    w = open_checkpoint(planted_pair[0]).read("model.layers.0.self_attn.o_proj.weight").double().numpy()
    expected = np.linalg.svd(w, compute_uv=False)[:16]
    np.testing.assert_allclose(result.module("model.layers.0.self_attn.o_proj")["base_top_singular_values"], expected,
                               rtol=1e-5)
    assert result.module("model.layers.0.self_attn.o_proj")["relative_size"] == 0.0


def test_resume_after_sigkill_of_a_real_process(tmp_path):
    """A separate `analyze` process killed with SIGKILL midway leaves a cache the next run resumes from."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from spectra.bench.make_pair import PairConfig, make_pair

    pair = make_pair(tmp_path / "pair", PairConfig(shape="llama-tiny"))
    cache = tmp_path / "cache"
    # on_module sleeps so the kill lands while modules remain; the cache is all the next run sees
    script = ("import sys, time; from spectra.analysis import analyze, AnalysisConfig; "
              "analyze(sys.argv[1] + '/base', sys.argv[1] + '/tuned', AnalysisConfig(full_below=32), "
              "cache_dir=sys.argv[2], progress=False, on_module=lambda n, r: time.sleep(0.3))")
    proc = subprocess.Popen([sys.executable, "-c", script, str(pair), str(cache)])
    deadline = time.time() + 120
    while time.time() < deadline and len(list(cache.rglob("*.json"))) < 5:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = len(list(cache.rglob("*.json")))
    assert done >= 5
    resumed = analyze(pair / "base", pair / "tuned", AnalysisConfig(full_below=32), cache_dir=cache, progress=False)
    fresh = analyze(pair / "base", pair / "tuned", AnalysisConfig(full_below=32), cache_dir=False, progress=False)
    assert resumed.timings["modules_cached"] == done < len(fresh.modules)
    assert strip_timing(resumed.modules) == strip_timing(fresh.modules)


@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_workers_give_the_serial_result(planted_pair, workers):
    """Modules analysed on several threads at once: same rows, same order as one worker."""
    serial = analyze(*planted_pair, cache_dir=False, progress=False, workers=1)
    parallel = analyze(*planted_pair, cache_dir=False, progress=False, workers=workers)
    assert parallel.timings["workers"] == workers and serial.timings["workers"] == 1
    assert [m["name"] for m in parallel.modules] == [m["name"] for m in serial.modules]
    for a, b in zip(serial.matrices(), parallel.matrices()):
        assert a["energy_rank"] == b["energy_rank"] and a["method"] == b["method"], a["name"]
        np.testing.assert_allclose(b["singular_values"], a["singular_values"], rtol=1e-5,
                                   atol=1e-7 * a["singular_values"][0])


def test_first_fitting_lets_a_smaller_entry_run_beside_one_that_fills_the_budget():
    from spectra.analysis import _first_fitting

    sizes = [400, 400, 100, 50]  # largest first, as the queue is
    assert _first_fitting(sizes, None, 512) == 0  # nothing running: the largest, whatever its size
    assert _first_fitting([900], None, 512) == 0
    assert _first_fitting(sizes, 400, 512) == 2  # the second 400 waits; 100 fits
    assert _first_fitting(sizes, 450, 512) == 3
    assert _first_fitting(sizes, 500, 512) is None
    assert _first_fitting([], None, 512) is None


def test_workers_do_not_idle_behind_an_entry_that_waits_for_memory(planted_pair, monkeypatch):
    """With a budget that holds one of the two largest entries, the second worker starts a
    smaller entry at once instead of waiting for the first to finish (both are inside
    the analysis together, which a barrier for two threads proves)."""
    import threading

    analysis = analysis_mod
    monkeypatch.setattr(analysis, "_entry_bytes", lambda entry, options: math.prod(entry.shape) * 550)
    sizes = sorted((math.prod(e.shape) * 550 for e in analysis.Pairing(*planted_pair).entries), reverse=True)
    assert sizes[0] + sizes[1] > (1 << 20) * 2 > sizes[0] + sizes[2]  # the two largest do not fit in 2 MB together
    barrier, original = threading.Barrier(2, timeout=20), analysis._analyze_entry
    calls = []

    def analyze_entry(deltas, config, calibration):
        calls.append(deltas[0].name)
        if len(calls) <= 2:
            barrier.wait()  # raises BrokenBarrierError if the second entry never starts alongside
        return original(deltas, config, calibration)

    monkeypatch.setattr(analysis, "_analyze_entry", analyze_entry)
    result = analyze(*planted_pair, cache_dir=False, progress=False, workers=2, read_ahead_mb=2)
    assert len(calls) == len(analysis.Pairing(*planted_pair).entries) and result.modules


def test_worker_errors_reach_the_caller(tmp_path):
    """A broken tensor read by a worker thread raises in the caller, naming the tensor."""
    from spectra.errors import NonFiniteWeightError

    b, t = nonfinite_pair(tmp_path, "layers.1.mlp.up_proj", float("nan"))
    with pytest.raises(NonFiniteWeightError, match="layers.1.mlp.up_proj"):
        analyze(b, t, cache_dir=False, progress=False, workers=2)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_skipped_tensor_is_listed_again_when_served_from_the_cache(tmp_path, workers):
    """--skip-nonfinite: a rerun from the cache reported `skipped: []` (the cache held no row for it)."""
    b, t = nonfinite_pair(tmp_path, "layers.1.mlp.up_proj", float("nan"))
    first = analyze(b, t, AnalysisConfig(on_nonfinite="skip"), cache_dir=tmp_path / "cache", progress=False,
                    workers=workers)
    (message,) = first.pairing["skipped"]
    assert "layers.1.mlp.up_proj" in message
    again = analyze(b, t, AnalysisConfig(on_nonfinite="skip"), cache_dir=tmp_path / "cache", progress=False,
                    workers=workers)
    assert again.timings["modules_computed"] == 0 and again.pairing["skipped"] == [message]
    assert [m["name"] for m in again.modules] == [m["name"] for m in first.modules]
    assert all("skipped" not in m for m in again.modules)


def test_workers_must_be_positive(planted_pair):
    from spectra.errors import ConfigError

    with pytest.raises(ConfigError, match="workers"):
        analyze(*planted_pair, cache_dir=False, progress=False, workers=0)


def test_parallel_run_leaves_the_thread_count_of_later_threads_alone(planted_pair):
    """Workers set their own torch threads; threads started afterwards get the process's count back."""
    import threading

    before = torch.get_num_threads()
    analyze(*planted_pair, cache_dir=False, progress=False, workers=2)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and seen == [before]


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_says_what_is_kept_and_the_rerun_resumes(planted_pair, tmp_path, capsys, workers):
    def interrupt_after_three():
        done = []

        def hook(name, rows):
            done.append(name)
            if len(done) == 3:
                raise KeyboardInterrupt

        return hook

    with pytest.raises(KeyboardInterrupt):
        analyze(*planted_pair, cache_dir=tmp_path, progress=False, workers=workers, on_module=interrupt_after_three())
    message = capsys.readouterr().err
    assert "interrupted: 3 of " in message and str(tmp_path) in message and "resumes" in message
    assert ("modules in flight" in message) is (workers > 1)
    resumed = analyze(*planted_pair, cache_dir=tmp_path, progress=False, workers=workers)
    assert resumed.timings["modules_cached"] == 3
    with pytest.raises(KeyboardInterrupt):
        analyze(*planted_pair, cache_dir=False, progress=False, on_module=interrupt_after_three())
    assert "were not cached" in capsys.readouterr().err


def test_cli_ctrl_c_exits_130_with_one_line(planted_pair, monkeypatch, tmp_path):
    """Through the real command line (Typer and Click included): a message and exit code 130, no traceback."""
    from typer.testing import CliRunner

    import spectra.analysis
    from spectra.cli import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(spectra.analysis, "analyze", interrupted)
    result = CliRunner().invoke(app, ["analyze", *map(str, planted_pair), "-o", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 130
    assert "stopped (Ctrl-C)" in result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()

    def in_an_import(*args, **kwargs):  # Ctrl-C in a lazy import: Python re-raises it as a RuntimeError
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            raise RuntimeError("Error calling __set_name__ on '_AxesBase'") from err

    monkeypatch.setattr(spectra.analysis, "analyze", in_an_import)
    result = CliRunner().invoke(app, ["analyze", *map(str, planted_pair), "-o", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 130 and "Traceback" not in result.output  # it was a RuntimeError traceback, exit 1
    assert "stopped (Ctrl-C)" in result.output + (result.stderr if result.stderr_bytes is not None else "")

    def a_bug(*args, **kwargs):  # negative control: an error with no Ctrl-C behind it stays that error
        raise RuntimeError("a bug")

    monkeypatch.setattr(spectra.analysis, "analyze", a_bug)
    result = CliRunner().invoke(app, ["analyze", *map(str, planted_pair), "-o", str(tmp_path / "r"), "-q"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


@pytest.mark.parametrize("sketch_dtype", ["bfloat16", "float32"])
def test_sketch_rows_leave_out_what_needs_the_whole_spectrum(tmp_path, sketch_dtype):
    """Above full_below only the top of the spectrum is known: entropy rank and ‖·‖_*/‖·‖_F are null, not
    computed from the top values, and a Gavish–Donoho count that every held value passes is a lower bound."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(400, 600, generator=g) * 0.02
    U = torch.linalg.qr(torch.randn(400, 300, generator=g))[0]
    V = torch.linalg.qr(torch.randn(600, 300, generator=g))[0]
    D = (U * torch.exp(-torch.arange(300) / 40.0)) @ V.T
    sketched, full = _sketched_and_full(tmp_path, W, W + 0.05 * W.norm() / D.norm() * D, sketch_dtype)
    assert sketched["method"] == _SKETCH_METHOD[sketch_dtype] and not sketched["complete"] and full["complete"]
    assert sketched["effective_rank"] is None and sketched["nuclear_fro_ratio"] is None
    ref = np.linalg.svd((W + 0.05 * W.norm() / D.norm() * D - W).double().numpy(), compute_uv=False)
    p = ref / ref.sum()
    assert full["effective_rank"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert sketched["gd_rank"] is None and full["gd_rank"] > len(sketched["singular_values"])  # fp32: no floor
    assert abs(sketched["energy_rank"]["0.9"] - full["energy_rank"]["0.9"]) <= 1


@pytest.mark.parametrize("sketch_dtype", ["bfloat16", "float32"])
def test_a_sketch_row_gives_an_energy_level_it_cannot_settle_as_an_interval(tmp_path, sketch_dtype):
    """A noise tail (1 % of ‖ΔW‖², and bf16 rounding) leaves the sketch's 95 % rank unsettled: null in
    energy_rank, and an interval around the exact rank in energy_rank_bounds (the row carried the Ritz
    values' rank as a number)."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(400, 1100, generator=g) * 0.02
    U = torch.linalg.qr(torch.randn(400, 24, generator=g))[0]
    V = torch.linalg.qr(torch.randn(1100, 24, generator=g))[0]
    D = (U * torch.exp(-torch.arange(24) / 4.0)) @ V.T
    D = D / D.norm() * 0.99**0.5 + torch.randn(400, 1100, generator=g) * (0.01 / (400 * 1100)) ** 0.5
    # bf16: its rounding is the noise
    sketched, full = _sketched_and_full(tmp_path, W.bfloat16(), (W + 0.01 * W.norm() / D.norm() * D).bfloat16(),
                                        sketch_dtype)
    assert sketched["energy_rank"]["0.95"] is None and "energy_rank_bounds" not in full
    lo, hi = sketched["energy_rank_bounds"]["0.95"]
    assert lo <= full["energy_rank"]["0.95"] <= hi and len(sketched["singular_values"]) < hi
    assert abs(sketched["energy_rank"]["0.9"] - full["energy_rank"]["0.9"]) <= 1


def test_no_power_law_is_fitted_below_the_noise_floor_and_unchanged_zeros_have_size_0(tmp_path):
    values = torch.logspace(0, -2, 50, dtype=torch.float64)
    assert analysis_mod._decay(values, 0) is None  # nothing above the floor: nothing to fit
    assert analysis_mod._decay(values, None)["n_points"] == 50  # no floor known: the whole spectrum
    assert analysis_mod._decay(values, 10)["n_points"] == 10
    base = build_model("gpt2")  # its biases start at zero
    rows = analyze(save(base, tmp_path / "b", "safetensors"), save(base, tmp_path / "t", "safetensors"),
                   cache_dir=False, progress=False).modules
    zero = [r for r in rows if r["base_fro_norm"] == 0.0]
    assert zero and all(r["relative_size"] == 0.0 for r in zero)



def test_the_cache_never_returns_rows_of_other_inputs_or_code(tmp_path, monkeypatch):
    """Rewritten weights, an edited adapter config and changed spectra code each miss the cache."""
    import shutil
    import time as clock

    from peft import LoraConfig, get_peft_model

    base_model = build_model("llama")
    base = save(base_model, tmp_path / "base", "safetensors")
    tuned_model = copy.deepcopy(base_model)
    with torch.no_grad():
        tuned_model.model.layers[0].self_attn.q_proj.weight.add_(0.1)
    tuned = save(tuned_model, tmp_path / "tuned", "safetensors")
    cache = tmp_path / "cache"

    def q_norm(t):
        rows = analyze(base, t, cache_dir=cache, progress=False).modules
        return next(r["fro_norm"] for r in rows if r["name"] == "model.layers.0.self_attn.q_proj")

    import spectra.checkpoints.source as source_mod

    monkeypatch.setattr(source_mod, "_SAMPLE", 16)  # content samples far smaller than the file, as on a real model
    first = q_norm(tuned)
    clock.sleep(0.01)
    with torch.no_grad():  # the same file rewritten in place: same size, new content between the samples
        tuned_model.model.layers[0].self_attn.q_proj.weight.add_(0.2)
    save(tuned_model, tuned, "safetensors")
    assert q_norm(tuned) == pytest.approx(3 * first, rel=1e-5)

    peft_model = get_peft_model(copy.deepcopy(base_model), LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"],
                                                                    init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    before = q_norm(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["lora_alpha"] = 8  # scale ×4, weights untouched
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    assert q_norm(tmp_path / "adapter") == pytest.approx(4 * before, rel=1e-5)

    keys = {p.name for p in cache.iterdir()}
    monkeypatch.setattr(analysis_mod, "_code_digest", lambda: "other code")
    analyze(base, tuned, cache_dir=cache, progress=False)
    assert len({p.name for p in cache.iterdir()} - keys) == 1  # a new key: rows from other code are not reused
    shutil.rmtree(cache)


def test_an_unwritable_cache_is_given_up_with_a_warning(planted_pair, tmp_path):
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory would go")
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        result = analyze(*planted_pair, cache_dir=blocked, progress=False)
    assert len(result.modules) == len(analyze(*planted_pair, cache_dir=False, progress=False).modules)


def test_a_cache_entry_that_is_not_rows_is_recomputed(planted_pair, tmp_path):
    first = analyze(*planted_pair, cache_dir=tmp_path, progress=False).modules
    (entry,) = [p for p in next(tmp_path.iterdir()).iterdir() if "q_proj" in p.name][:1]
    entry.write_text("[1, 2]")  # valid JSON, not rows
    again = analyze(*planted_pair, cache_dir=tmp_path, progress=False).modules
    assert len(again) == len(first) and strip_timing(again) == strip_timing(first)


_SKETCH_METHOD = {"bfloat16": "adaptive-bf16", "float32": "adaptive-fp32"}


def _sketched_and_full(folder, base, tuned, sketch_dtype="bfloat16"):
    """The one q_proj row of a base/tuned pair saved under `folder`, analysed by the sketch (its power steps in
    `sketch_dtype`) and by a full SVD."""
    from safetensors.torch import save_file

    for side, weight in (("b", base), ("t", tuned)):
        (folder / side).mkdir()
        save_file({"model.layers.0.self_attn.q_proj.weight": weight.contiguous()}, folder / side / "model.safetensors")
    (sketched,) = analyze(folder / "b", folder / "t", AnalysisConfig(full_below=0, sketch_dtype=sketch_dtype),
                          cache_dir=False, progress=False).modules
    (full,) = analyze(folder / "b", folder / "t", AnalysisConfig(method="full"), cache_dir=False,
                      progress=False).modules
    return sketched, full


def _experts_adapter(tmp_path):
    """A tiny Mixtral adapter on fused experts, its expert entries, one expert entry's bytes and one module's held
    factors (the largest entries are experts, all the same size; a module's factors are under a third of one)."""
    from spectra.analysis import _entry_bytes, _held_factors
    from spectra.checkpoints.pairing import Pairing
    from tests.checkpoints.test_adapter_pairing import _mixtral_adapter_on_experts

    pairing = Pairing(*_mixtral_adapter_on_experts(tmp_path), AnalysisConfig().pairing_options())
    experts = [e for e in pairing.entries if ".experts." in e.name]
    expert = _entry_bytes(experts[0], pairing.options)
    assert {_entry_bytes(e, pairing.options) for e in experts} == {expert} and len(experts) == 18
    assert max(_entry_bytes(e, pairing.options) for e in pairing.entries) == expert
    module = _held_factors(pairing, experts, readers=1)  # one module's A and B (tests.checkpoints: exactly)
    assert 0 < 3 * module < expert and _held_factors(pairing, pairing.entries, readers=4) == 5 * module
    return pairing, experts, expert, module


def _read_ahead_leases(monkeypatch, pairing, experts, budget) -> int:
    """Entries the read-ahead has leased buffers for when it hands out the first: 2 when it read one ahead."""
    from spectra.analysis import _read_ahead
    from spectra.checkpoints.buffers import BufferPool

    leases = []

    class Counted(BufferPool):
        def lease(self):
            leases.append(1)
            return super().lease()

    monkeypatch.setattr(analysis_mod, "BufferPool", Counted)
    stream = _read_ahead(pairing, experts, 2, budget)
    with contextlib.closing(stream):
        _, _, _, lease = next(stream)
        lease.close()
    return len(leases)


def _started_beside(monkeypatch, pairing, workers, budget) -> list[tuple[int, int]]:
    """(bytes running, bytes of the entry started beside them) each time the workers start an entry beside others,
    over a whole parallel run of the pairing."""
    from spectra.analysis import _parallel

    together, first_fitting = [], analysis_mod._first_fitting

    def logged(sizes, busy, budget):
        i = first_fitting(sizes, busy, budget)
        if busy is not None and i is not None:
            together.append((busy, sizes[i]))
        return i

    monkeypatch.setattr(analysis_mod, "_first_fitting", logged)
    rows = [row for _, entry_rows, _, _ in _parallel(pairing, pairing.entries, AnalysisConfig(), None, workers, 1,
                                                     budget) for row in entry_rows]
    assert len(rows) == len(pairing.entries)
    return together


def test_read_ahead_and_workers_reserve_the_adapter_factors_they_hold(tmp_path, monkeypatch):
    """An adapter on fused experts: each reading thread holds a module's LoRA factors across its experts, which the
    memory budget did not count. With a budget of two expert entries, the read-ahead thread read two ahead beside the
    factors it held; with a budget of three experts and the five modules' factors four workers hold, less a byte,
    three experts ran at once beside them. The factors are reserved from the budget now: one entry read ahead, and
    never more than two experts at once (the entries started beside running ones fit in what the factors leave)."""
    pairing, experts, expert, module = _experts_adapter(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reservation leaves room enough: nothing to warn of
        assert _read_ahead_leases(monkeypatch, pairing, experts, 2 * expert) == 2  # one ahead: a second does not fit
        budget = 3 * expert + 5 * module - 1
        together = _started_beside(monkeypatch, pairing, 4, budget)
    assert together and max(busy + size for busy, size in together) + 5 * module <= budget
    assert any(size == expert and busy >= expert for busy, size in together)  # two experts did run at once


def test_held_factors_never_leave_the_analysis_serial(tmp_path, monkeypatch):
    """The factors held across fused experts were taken from the budget whatever they left: 4 workers on gpt-oss-120b
    at r = 16 keep 5 × 118 MB, over the default 512 MB, and the analysis ran one module at a time without a word.
    They come out of what the budget holds beyond room for the largest entry beside another now, and a warning names
    --read-ahead-mb when they do not fit there. Budget = the factors (the reviewer's case): entries start beside
    running ones (none did); budget = two experts: two experts run at once (never did); with one reader, a budget of
    one expert and the factors less a byte reads one ahead (none was)."""
    pairing, experts, expert, module = _experts_adapter(tmp_path)
    with pytest.warns(RuntimeWarning, match=r"--read-ahead-mb \d+ counts them in it; --workers 1 keeps fewer"):
        together = _started_beside(monkeypatch, pairing, 4, 5 * module)
    assert together  # none did: 0 of 22
    assert max(busy + size for busy, size in together) <= 5 * module  # the entries keep within the budget
    with pytest.warns(RuntimeWarning, match="the two largest modules at once"):
        together = _started_beside(monkeypatch, pairing, 4, 2 * expert)
    assert any(size == expert and busy >= expert for busy, size in together)  # an expert beside a running expert
    assert max(busy + size for busy, size in together) <= 2 * expert
    with pytest.warns(RuntimeWarning, match="the largest module read ahead"):
        assert _read_ahead_leases(monkeypatch, pairing, experts, expert + module - 1) == 2  # was 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _read_ahead_leases(monkeypatch, pairing, experts, 0) == 1  # no read-ahead asked for: none, no warning


def test_the_read_ahead_mb_the_warning_suggests_silences_it(monkeypatch):
    """The warning suggested the room it had left plus the factors, and that room grows with the budget: with two
    400 MB modules and 100 MB of held factors it suggested 512 → 612 → 712 → 812 → 900 MB, warning each time. It
    suggests the budget that holds the two largest modules and the factors now, under which the next run is silent."""
    import re
    import types

    import spectra.analysis as analysis_mod

    mb = 1 << 20
    sizes = {"a": 400 * mb, "b": 400 * mb, "c": 10 * mb}
    monkeypatch.setattr(analysis_mod, "_entry_bytes", lambda entry, options: sizes[entry])
    monkeypatch.setattr(analysis_mod, "_held_factors", lambda pairing, todo, readers: 100 * mb)
    pairing = types.SimpleNamespace(options=None)
    with pytest.warns(RuntimeWarning) as caught:
        analysis_mod._entry_budget(pairing, list(sizes), 512 * mb, readers=4)
    suggested = int(re.search(r"--read-ahead-mb (\d+) counts", str(caught[0].message)).group(1))
    assert suggested == 900
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the suggested budget is enough
        assert analysis_mod._entry_budget(pairing, list(sizes), suggested * mb, readers=4) == 800 * mb


def test_calibration_notes_and_length_are_in_the_result_also_when_served_from_the_cache(tmp_path, monkeypatch):
    """analyze --calibration on a GPT-2 with 32 positions cuts its texts at 32 tokens, which Calibration.notes says;
    the result dropped the note and the length. analysis.json now holds the calibration's description (data, length,
    notes) and the report names it; a rerun served from the cache, which collects no activations, still does."""
    from spectra.calibration import collect_calibration

    base = build_model("gpt2")  # n_positions = 32
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.01)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    text = tmp_path / "calibration.txt"
    text.write_text("words to cut into blocks " * 20)
    (note,) = collect_calibration(b, text).notes
    assert "cut at 32 tokens, not the default 128" in note
    config = AnalysisConfig(roles=("qkv",), calibration=str(text))
    result = analyze(b, t, config, cache_dir=tmp_path / "cache", progress=False)
    assert result.calibration["notes"] == [note] and result.calibration["max_length"] == 32
    assert result.calibration["data"] == str(text) and result.timings["modules_computed"] > 0
    loaded = AnalysisResult.load(result.save(tmp_path / "analysis.json"))
    assert loaded.calibration == result.calibration
    report = (result.write_report(tmp_path / "report") / "report.md").read_text()
    assert f"examples of at most 32 tokens); notes: {note}" in report

    def collect(*args, **kwargs):
        raise AssertionError("every module is cached: no activations to collect")

    monkeypatch.setattr(analysis_mod, "collect_calibration", collect)
    again = analyze(b, t, config, cache_dir=tmp_path / "cache", progress=False)
    assert again.timings["modules_computed"] == 0 and again.calibration == result.calibration
    plain = analyze(b, t, AnalysisConfig(roles=("qkv",)), cache_dir=False, progress=False).to_dict()
    assert "calibration" not in plain and list(plain)[-1] == "modules"  # analysis.json as before without data


def test_the_calibration_record_is_a_file_beside_the_rows_reused_by_a_rerun_and_not_by_other_data(tmp_path,
                                                                                                   monkeypatch):
    """A calibrated run keeps its calibration's description (data, examples, length, notes) as calibration.json beside
    the cached rows, written through a temporary file and a rename; it had been a fake module entry "<calibration>"
    (a 'name' added to pass the rows' check, then popped). A rerun served from the cache reads it rather than run the
    model again; other calibration data is another cache, with its own record; an unreadable record is collected
    again and rewritten."""
    base = build_model("gpt2")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.01)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    text = tmp_path / "calibration.txt"
    first_text = "words to cut into blocks\n" * 20
    text.write_text(first_text)
    config = AnalysisConfig(roles=("qkv",), calibration=str(text))
    collected, written = [], []
    collect, write = analysis_mod.collect_calibration, analysis_mod.write_text_atomic
    monkeypatch.setattr(analysis_mod, "collect_calibration", lambda *a, **k: collected.append(1) or collect(*a, **k))
    monkeypatch.setattr(analysis_mod, "write_text_atomic", lambda path, *a, **k: written.append(path.name)
                        or write(path, *a, **k))

    def run():
        return analyze(b, t, config, cache_dir=tmp_path / "cache", progress=False)

    first = run()
    (key,) = (tmp_path / "cache").iterdir()
    assert json.loads((key / "calibration.json").read_text()) == first.calibration
    assert len(collected) == 1 and written.count("calibration.json") == 1
    rows = [p for p in key.iterdir() if p.name != "calibration.json"]
    assert rows and all(isinstance(json.loads(p.read_text()), list) and "calibration" not in p.name for p in rows)
    again = run()
    assert len(collected) == 1 and again.timings["modules_computed"] == 0 and again.calibration == first.calibration
    text.write_text("other words\n" * 7)  # other data: another key, collected again, its own record
    other = run()
    assert len(collected) == 2 and other.timings["modules_computed"] > 0
    assert other.calibration["examples"] < first.calibration["examples"]  # fewer tokens, fewer blocks
    (other_key,) = set((tmp_path / "cache").iterdir()) - {key}
    assert json.loads((other_key / "calibration.json").read_text()) == other.calibration
    (key / "calibration.json").write_text("[]")  # not a record: collected again although every row is cached
    text.write_text(first_text)
    restored = run()
    assert len(collected) == 3 and restored.timings["modules_computed"] == 0
    assert restored.calibration == first.calibration == json.loads((key / "calibration.json").read_text())
