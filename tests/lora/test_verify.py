"""verify_adapter against independent numpy references and PEFT's own merge; QLoRA on CPU; the CLI."""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spectra.cli import app
from spectra.errors import ConfigError
from spectra.lora.train import TrainConfig, quiet_peft, train_adapter
from spectra.lora.verify import nf4_round_trip, verify_adapter
from tests.lora.conftest import random_text
from tests.models import build_model, random_adapter, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TARGETS = ["q_proj", "v_proj", "down_proj"]


def perturbed(model, seed: int, scale: float = 0.3):
    """A stand-in full fine-tune: every block linear moved by a random full-rank update."""
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if name.endswith("proj.weight"):
                p += scale * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape, generator=g)
    return tuned


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    """base, tuned, a random (untrained) PEFT adapter and PEFT's merged weights."""
    folder = tmp_path_factory.mktemp("trio")
    base_model = build_model("llama")
    base = save(base_model, folder / "base", "safetensors")
    tuned = save(perturbed(base_model, 3), folder / "tuned", "safetensors")
    with quiet_peft():
        peft_model = random_adapter(base_model, folder / "adapter", seed=5, r=3, lora_alpha=6, target_modules=TARGETS)
    lora = {n: p.detach().double().numpy() for n, p in peft_model.named_parameters() if "lora_" in n}
    merged = {k: v.double().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    data = random_text(folder / "eval.txt", chars=16 * 12, seed=9)
    return base_model, base, tuned, folder / "adapter", lora, merged, data


def _numpy_reference(W, Wt, Wm, B, r, k=10):
    D, Dad = Wt - W, Wm - W  # (out, in)
    Q, _ = np.linalg.qr(B)
    Uf, sf, Vf = np.linalg.svd(D)
    Ua, sa, Va = np.linalg.svd(Dad)
    P = Ua[:, :r].T @ W @ Va[:r].T  # (r, r)
    Ub, Ut = np.linalg.svd(W)[0], np.linalg.svd(Wm)[0][:, :k]
    return {"captured_energy": np.sum((Q.T @ D) ** 2) / np.sum(D**2),
            "optimal_energy": np.sum(sf[:r] ** 2) / np.sum(sf**2),
            "phi": np.sum((Ua[:, :r].T @ Uf[:, :r]) ** 2) / r,
            "relative_error": np.linalg.norm(Dad - D) / np.linalg.norm(D),
            "amplification_adapter": np.linalg.norm(Dad) / np.linalg.norm(P),
            "intruders_adapter": int(np.sum(np.abs(Ub.T @ Ut).max(0) < 0.5))}


def test_verify_reproduces_numpy(trio):
    base_model, base, tuned, adapter, lora, merged, _ = trio
    result = verify_adapter(base, tuned, adapter, progress=False)
    rows = {r["name"]: r for r in result.modules}
    assert len(rows) == 6 and {r["role"] for r in rows.values()} == {"q", "v", "down"}
    base_state = {k: v.double().numpy() for k, v in base_model.state_dict().items()}
    tuned_state = {k: v.double().numpy() for k, v in perturbed(base_model, 3).state_dict().items()}
    for name, row in rows.items():
        B = lora[f"base_model.model.{name}.lora_B.default.weight"]
        ref = _numpy_reference(base_state[name + ".weight"], tuned_state[name + ".weight"],
                               merged[name + ".weight"], B, 3)
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, rel=2e-4, abs=1e-6), (name, key)
        assert row["captured_energy"] <= row["optimal_energy"] + 1e-9



def test_verify_against_a_fine_tune_given_as_an_adapter(trio, tmp_path):
    """TUNED a PEFT adapter (ΔW_full its merged update): verify stopped on an AttributeError looking for TUNED's
    tensor names; it measures as against a model, the measures those of numpy on PEFT's own merges."""
    base_model, base, _, adapter, lora, merged, _ = trio
    with quiet_peft():
        other = random_adapter(base_model, tmp_path / "tuned_adapter", seed=11, r=4, lora_alpha=8,
                               target_modules=["q_proj", "v_proj"])
    full = {k: v.double().numpy() for k, v in other.merge_and_unload().state_dict().items()}
    result = verify_adapter(base, tmp_path / "tuned_adapter", adapter, progress=False)
    rows = {r["name"]: r for r in result.modules}
    assert {r["role"] for r in rows.values()} == {"q", "v"}  # down_proj: no ΔW_full in TUNED
    base_state = {k: v.double().numpy() for k, v in base_model.state_dict().items()}
    for name, row in rows.items():
        B = lora[f"base_model.model.{name}.lora_B.default.weight"]
        ref = _numpy_reference(base_state[name + ".weight"], full[name + ".weight"], merged[name + ".weight"], B, 3)
        for key in ("captured_energy", "optimal_energy", "phi", "relative_error"):
            assert row[key] == pytest.approx(ref[key], rel=2e-4, abs=1e-6), (name, key)


def test_against_an_adapter_of_lower_rank_the_measures_read_only_its_rank(trio, tmp_path):
    """TUNED a rank-2 adapter whose factors are the first two of the rank-3 adapter checked: ΔW_full has rank 2, and
    φ(3, r = 3), the angles and the amplification read its 3rd singular vectors, which belong to zero σ (float32
    rounding of s·B A): φ_row 0.52 where the rank-2 row space lies inside the adapter's. They read the top 2 now."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    base_model, base, _, adapter, _, _, _ = trio
    low = tmp_path / "rank2"
    shutil.copytree(adapter, low)
    weights = load_file(low / "adapter_model.safetensors")
    save_file({k: (v[:2] if "lora_A" in k else v[:, :2]).contiguous() for k, v in weights.items()},
              low / "adapter_model.safetensors")
    config = json.loads((low / "adapter_config.json").read_text())
    (low / "adapter_config.json").write_text(json.dumps(config | {"r": 2, "lora_alpha": 4}))  # s = 2 as before
    result = verify_adapter(base, low, adapter, progress=False)
    W = {k: v.double() for k, v in base_model.state_dict().items()}
    for row in result.modules:
        A, B = (weights[f"base_model.model.{row['name']}.lora_{x}.weight"].double() for x in "AB")
        D = 2.0 * B[:, :2] @ A[:2]  # ΔW_full, rank 2, in float64
        u, s, vt = np.linalg.svd(D.numpy())
        assert s[2] < 1e-12 * s[0]
        assert row["phi"] == pytest.approx(1.0, abs=1e-6) and row["phi_row"] == pytest.approx(1.0, abs=1e-6)
        assert len(row["principal_angles_deg"]) == 2 and max(row["principal_angles_deg"]) < 1e-2
        want = np.linalg.norm(D.numpy()) / np.linalg.norm(u[:, :2].T @ W[row["name"] + ".weight"].numpy() @ vt[:2].T)
        assert row["amplification_full"] == pytest.approx(want, rel=1e-5), row["name"]
    same = verify_adapter(base, adapter, adapter, progress=False)  # negative control: ranks equal, all 3 read
    assert all(len(r["principal_angles_deg"]) == 3 for r in same.modules)


def _wider_adapter(small, wider, scale: float):
    """The rank-2 adapter `small` with a third random factor pair of size `scale`: rank 3, the same s = 2."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(small, wider)
    weights = load_file(wider / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(3)
    save_file({k: torch.cat([v, scale * torch.randn(1, v.shape[1], generator=g)]) if "lora_A" in k
               else torch.cat([v, scale * torch.randn(v.shape[0], 1, generator=g)], 1) for k, v in weights.items()},
              wider / "adapter_model.safetensors")
    config = json.loads((wider / "adapter_config.json").read_text())
    (wider / "adapter_config.json").write_text(json.dumps(config | {"r": 3, "lora_alpha": 6}))
    return wider


def test_against_a_merged_float32_checkpoint_its_rounding_is_no_rank(trio, tmp_path):
    """TUNED a rank-2 LoRA merged into a float32 checkpoint, its update ~1/800 of the weights: ΔW_full = TUNED − BASE
    carries the rounding of W + ΔW (~1e-7·|W|), full rank above ΔW's own noise edge. Judged at the weights' rounding
    (a checkpoint's ΔW is a difference), its rank is 2: the rank-3 adapter holding those factors reads φ_row = 1."""
    base_model, base, _, _, _, _, _ = trio
    with quiet_peft():
        small = random_adapter(base_model, tmp_path / "small", seed=7, scale=3e-3, r=2, lora_alpha=4,
                               target_modules=["q_proj"])
    merged = save(copy.deepcopy(small).merge_and_unload(), tmp_path / "merged", "safetensors")  # float32
    wider = _wider_adapter(tmp_path / "small", tmp_path / "wider", 3e-3)
    result = verify_adapter(base, merged, wider, progress=False)
    assert result.modules
    for row in result.modules:
        assert len(row["principal_angles_deg"]) == 2, row["name"]
        assert row["phi_row"] == pytest.approx(1.0, abs=1e-4), row["name"]


def test_against_a_merged_bf16_checkpoint_its_rounding_is_no_rank(tmp_path):
    """The bf16 case of the test above: TUNED a rank-2 LoRA merged into a bf16 checkpoint, whose rounding (~1e-3·σ₁
    of ΔW_full here) is far above float32's. Judged at float32's precision the rounding directions had counted as
    ΔW_full's rank (3 angles, φ_row 0.67); at the storage dtypes' noise floor (analyze's) the rank is 2: φ_row = 1.
    The float32 pair, whose floor is float32's, keeps its own test above (no storage rank is taken for it)."""
    from safetensors.torch import load_file

    from spectra.lora.verify_measures import storage_noise_rank

    base_model = build_model("llama").to(torch.bfloat16)
    base = save(base_model, tmp_path / "base", "safetensors")
    with quiet_peft():
        small = random_adapter(base_model.float(), tmp_path / "small", seed=7, scale=0.1, r=2, lora_alpha=4,
                               target_modules=["q_proj"])
    merged = save(copy.deepcopy(small).merge_and_unload().to(torch.bfloat16), tmp_path / "merged", "safetensors")
    wider = _wider_adapter(tmp_path / "small", tmp_path / "wider", 0.1)
    result = verify_adapter(base, merged, wider, progress=False)
    assert result.modules
    for row in result.modules:
        assert len(row["principal_angles_deg"]) == 2, row["name"]
        assert row["phi_row"] == pytest.approx(1.0, abs=1e-3), row["name"]
    # the ΔW_full really holds the rounding above float32's floor: its σ₃ is far from 0 (the negative control)
    W = base_model.model.layers[0].self_attn.q_proj.weight.detach().double()
    delta = load_file(merged / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].double() - W
    s = torch.linalg.svdvals(delta)
    assert float(s[2] / s[0]) > 1e-4
    assert storage_noise_rank(W, W, torch.float32, torch.float32) is None  # a float32 pair: float32's own cut


def test_an_adapter_of_the_opposite_update_is_called_worse_than_none(trio, tmp_path):
    """The captured shares measure spaces: an adapter of −ΔW_full captured 'all Eckart–Young allows' and the
    headline said no more. Against itself as TUNED the adapter's relative error is 0; negated, exactly 2."""
    import shutil

    from safetensors.torch import load_file, save_file

    from spectra.report.verify import headline

    _, base, _, adapter, _, _, _ = trio
    negated = tmp_path / "negated"
    shutil.copytree(adapter, negated)
    weights = load_file(negated / "adapter_model.safetensors")
    save_file({k: -v if "lora_B" in k else v for k, v in weights.items()}, negated / "adapter_model.safetensors")
    same = verify_adapter(base, adapter, adapter, progress=False).summary
    assert same["relative_error"] == pytest.approx(0.0, abs=1e-6) and same["worse_than_none"] == 0
    assert "farther" not in headline(same)
    flipped = verify_adapter(base, adapter, negated, progress=False).summary
    assert flipped["relative_error"] == pytest.approx(2.0, rel=1e-6)
    assert flipped["captured_energy"] == pytest.approx(flipped["optimal_energy"], rel=1e-9)  # blind to the sign
    assert flipped["worse_than_none"] == flipped["modules"] == 6
    assert "But in 6 of 6 modules its update is farther" in headline(flipped) and "2.00 overall" in headline(flipped)

@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_update_equals_peft_merge(llama_base, text_data, tmp_path, method):
    """Verify's ΔW_adapter is PEFT's merge: against the merged model as 'tuned', the error is zero."""
    from peft import PeftModel

    from spectra.lora.train import load_model

    config = TrainConfig(method=method, rank=2, max_length=16, batch_size=8, max_steps=3, lr=1e-2,
                         eval_fraction=0.0)
    adapter = train_adapter(llama_base, text_data, config, tmp_path / "ad", progress=False).out_dir
    with quiet_peft():
        merged = PeftModel.from_pretrained(load_model(llama_base, task="causal_lm"), str(adapter)).merge_and_unload()
    save(merged, tmp_path / "merged", "safetensors")
    result = verify_adapter(llama_base, tmp_path / "merged", adapter, progress=False)
    assert len(result.modules) == 14
    for row in result.modules:
        assert row["relative_error"] < 1e-4 and row["cosine"] == pytest.approx(1.0, abs=1e-6)
        assert row["dora"] == (method == "dora")
        assert (row["outside_lowrank"] > 1e-6) == (method == "dora")  # DoRA's magnitude leaves span(B)


def test_qlora_and_qdora_train_on_cpu(tmp_path):
    """bitsandbytes needs in_features ≥ its 64-wide blocks: a hidden-64 Llama."""
    import bitsandbytes.functional as bnbf
    import transformers as tf

    from spectra.lora.train import load_model

    torch.manual_seed(0)
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    base = save(model, tmp_path / "base", "safetensors")
    tuned = save(perturbed(model, 4), tmp_path / "tuned", "safetensors")
    data = random_text(tmp_path / "d.txt", chars=32 * 4 * 3, seed=1)
    for method in ("qlora", "qdora"):
        config = TrainConfig(method=method, rank=2, roles=("q", "v"), max_length=32, batch_size=4, max_steps=2,
                             eval_fraction=0.0)
        result = train_adapter(base, data, config, tmp_path / method, progress=False)
        assert result.steps == 2 and all(np.isfinite(result.losses))
        report = verify_adapter(base, tuned, result.out_dir, progress=False)
        assert report.sources["adapter"]["quantized"] and report.summary["quant_error"] > 0
    # the W₀ verify measures against is what from_pretrained stores in 4 bits, dequantised
    quantized = load_model(base, task="causal_lm", quantize=True)
    layer = quantized.model.layers[0].self_attn.q_proj
    W = model.model.layers[0].self_attn.q_proj.weight.detach()
    deq = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(nf4_round_trip(W), deq)
    row = next(r for r in report.modules if r["name"] == "model.layers.0.self_attn.q_proj")
    assert row["quant_error"] == pytest.approx(float((deq - W).norm() / W.norm()), rel=1e-5)
    # narrower layers are refused before training (they failed in the first eval with a bare reshape error)
    narrow = save(build_model("llama"), tmp_path / "narrow", "safetensors")  # hidden 32
    with pytest.raises(ConfigError, match="32 input features; 4-bit .* need at least 64"):
        train_adapter(narrow, data, TrainConfig(method="qlora", rank=2, max_length=32, batch_size=4, max_steps=1),
                      tmp_path / "narrow_ad", progress=False)
    assert not (tmp_path / "narrow_ad").exists()


def test_qlora_w0_of_a_conv1d_model_is_what_transformers_stores(tmp_path):
    """GPT-2's Conv1D weights are stored (in, out) but quantised as a 4-bit Linear, (out, in)."""
    import bitsandbytes.functional as bnbf
    import transformers as tf

    from spectra.lora.train import load_model

    torch.manual_seed(0)
    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=64, n_positions=32))
    base = save(model, tmp_path / "base", "safetensors")
    tuned = save(perturbed(model, 4), tmp_path / "tuned", "safetensors")  # moves the c_proj weights
    quantized = load_model(base, task="causal_lm", quantize=True)
    for name in ("attn.c_attn", "mlp.c_fc", "mlp.c_proj"):
        stored = model.transformer.h[0].get_submodule(name).weight.detach()  # (in, out)
        layer = quantized.transformer.h[0].get_submodule(name)
        deq = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)  # (out, in)
        assert torch.equal(nf4_round_trip(stored.T), deq), name
        blocks_of_the_stored_layout = nf4_round_trip(stored.contiguous()).T  # negative control
        assert float((blocks_of_the_stored_layout - deq).norm() / deq.norm()) > 1e-2, name
    data = random_text(tmp_path / "d.txt", chars=32 * 4 * 3, seed=1)
    config = TrainConfig(method="qlora", rank=2, roles=("qkv",), max_length=32, batch_size=4, max_steps=2,
                         eval_fraction=0.0)
    adapter = train_adapter(base, data, config, tmp_path / "qlora", progress=False).out_dir
    report = verify_adapter(base, tuned, adapter, progress=False)
    row = next(r for r in report.modules if r["name"] == "transformer.h.0.attn.c_attn")
    layer = quantized.transformer.h[0].attn.c_attn
    deq = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    W = model.transformer.h[0].attn.c_attn.weight.detach().T
    assert row["quant_error"] == pytest.approx(float((deq - W).norm() / W.norm()), rel=1e-5)


def test_cli_verify_writes_the_report(trio, tmp_path):
    _, base, tuned, adapter, _, _, data = trio
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["verify", str(base), str(tuned), "--adapter", str(adapter), "-o", str(out),
                                      "--eval-data", str(data), "-q"])
    assert result.exit_code == 0, result.output
    verify = json.loads((out / "verify.json").read_text())
    assert {"name", "rank", "captured_energy", "optimal_energy", "phi"} <= set(verify["modules"][0])
    assert verify["modules"][0]["name"].startswith("model.layers.")
    assert set(verify["evals"]) == {"base", "tuned", "adapter", "svd"}
    assert (out / "report.html").is_file() and (out / "figures" / "energy.png").is_file()
    assert "could capture" in result.output
    again = CliRunner().invoke(app, ["verify", str(base), str(tuned), "--adapter", str(adapter), "-o", str(out)])
    assert again.exit_code != 0  # refuses to overwrite
    ignored = CliRunner().invoke(app, ["verify", str(base), str(tuned), "--adapter", str(adapter), "-o",
                                       str(tmp_path / "other"), "--recommended", "4"])
    assert ignored.exit_code != 0 and "only apply to --sweep" in str(ignored.exception)  # not silently ignored


def test_cli_verify_notes_an_adapter_of_another_base(trio, tmp_path):
    """--adapter's adapter_config.json recording another model than BASE: noted in verify.json, report.md and as a
    warning line (verify said nothing, where pairs and extract note it); nothing when it records BASE."""
    import shutil

    _, base, tuned, adapter, _, _, _ = trio
    moved = tmp_path / "moved"
    shutil.copytree(adapter, moved)
    config = json.loads((moved / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(tuned)}))
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["verify", str(base), str(tuned), "--adapter", str(moved), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert f"warning: --adapter {moved} may not be of BASE" in result.output and str(tuned) in result.output
    assert "may not be of BASE" in json.loads((out / "verify.json").read_text())["notes"][0]
    assert "may not be of BASE" in (out / "report.md").read_text()
    (moved / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(base)}))
    same = CliRunner().invoke(app, ["verify", str(base), str(tuned), "--adapter", str(moved), "-o",
                                    str(tmp_path / "same"), "-q"])
    assert same.exit_code == 0 and "may not be of BASE" not in same.output

def test_sweep_step_time_leaves_out_the_first_step(monkeypatch, tmp_path):
    """With two steps, the median of all steps had been the warm-up step (2036 ms against 23 ms)."""
    import types

    import spectra.lora.train
    import spectra.lora.verify
    from spectra.lora.train import TrainResult
    from spectra.lora.verify import rank_sweep

    times = {1: [2.036, 0.023], 2: [2.036, 0.030, 0.020], 4: [1.5]}

    def trained(base, data, config, folder, **kwargs):
        return TrainResult(out_dir=folder, task="causal_lm", method=config.method, steps=len(times[config.rank]),
                           trainable_params=config.rank, losses=[1.0], step_times=times[config.rank])

    summary = dict.fromkeys(("captured_energy", "captured_energy_row", "optimal_energy", "phi", "relative_error",
                             "intruders_adapter", "intruders_full"), 0.5)
    monkeypatch.setattr(spectra.lora.train, "train_adapter", trained)
    monkeypatch.setattr(spectra.lora.verify, "_refuse_failing_runs", lambda base, planned: None)  # no base to check
    monkeypatch.setattr(spectra.lora.verify, "verify_adapter", lambda *a, **k: types.SimpleNamespace(
        summary=summary, evals=None, right_vectors={}, notes=[]))
    result = rank_sweep("base", "tuned", "data", ranks=[1, 2, 4], adapters_dir=tmp_path)
    assert [run["step_median_s"] for run in result.runs] == pytest.approx([0.023, 0.025, 1.5])  # one step: that one
    assert all("eval_unmerged" not in run for run in result.runs) and result.sources["notes"] == []
    # a LoRA + QLoRA sweep from one QLoRA config: its compute dtype is the k-bit layers' alone (it was refused whole)
    from spectra.lora.train import TrainConfig

    mixed = rank_sweep("base", "tuned", "data", ranks=[1], methods=("lora", "qlora"), adapters_dir=tmp_path / "m",
                       train_config=TrainConfig(method="qlora", compute_dtype="bfloat16"))
    assert [run["method"] for run in mixed.runs] == ["lora", "qlora"]


def test_cli_train_and_sweep(llama_base, text_data, tmp_path):
    runner = CliRunner()
    common = ["--data", str(text_data), "--max-steps", "2", "--max-length", "16", "--batch-size", "8", "-q"]
    full = runner.invoke(app, ["train", str(llama_base), "--full", "-o", str(tmp_path / "tuned"), *common])
    assert full.exit_code == 0, full.output
    dora = runner.invoke(app, ["train", str(llama_base), "--rank", "2", "--method", "dora", "--group-by-length",
                               "-o", str(tmp_path / "ad"), *common])
    assert dora.exit_code == 0 and json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["use_dora"]
    assert json.loads((tmp_path / "ad" / "spectra_train.json").read_text())["config"]["group_by_length"]
    one = tmp_path / "one.jsonl"  # one example: nothing to hold out unless evaluation is turned off
    one.write_text(json.dumps({"text": "a single example"}) + "\n")
    refused = runner.invoke(app, ["train", str(llama_base), "--data", str(one), "-o", str(tmp_path / "one"), "-q"])
    message = str(refused.exception)
    assert refused.exit_code != 0 and str(one) in message and "--eval-fraction 0" in message
    alone = runner.invoke(app, ["train", str(llama_base), "--data", str(one), "--eval-fraction", "0", "--rank", "2",
                                "--max-length", "16", "-o", str(tmp_path / "one"), "-q"])
    assert alone.exit_code == 0, alone.output
    assert json.loads((tmp_path / "one" / "spectra_train.json").read_text())["config"]["eval_fraction"] == 0.0
    plan = tmp_path / "plan.json"
    plan.write_text("{}")  # refused before it is read: --rank beside --plan was ignored silently
    both = runner.invoke(app, ["train", str(llama_base), "--plan", str(plan), "--rank", "4", "--roles", "q",
                               "-o", str(tmp_path / "both"), *common])
    assert both.exit_code != 0 and "--rank, --roles would be ignored" in str(both.exception)
    sweep = runner.invoke(app, ["verify", str(llama_base), str(tmp_path / "tuned"), "--sweep", "1,2",
                                "--method", "lora,dora", "--data", str(text_data), "--eval-data", str(text_data),
                                "--max-steps", "2", "--recommended", "2", "--group-by-length", "-o", str(tmp_path / "sweep"),
                                "-q"])
    assert sweep.exit_code == 0, sweep.output
    data = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert data["train_config"]["group_by_length"]
    assert [(r["method"], r["rank"]) for r in data["runs"]] == [("lora", 1), ("lora", 2), ("dora", 1), ("dora", 2)]
    assert all(r["captured_energy"] <= r["optimal_energy"] + 1e-9 for r in data["runs"])
    # one training example: a sweep needs --eval-fraction 0 too (each run would hold it out otherwise)
    sweep_args = ["verify", str(llama_base), str(tmp_path / "tuned"), "--sweep", "1", "--data", str(one),
                  "--max-steps", "1", "-q"]
    refused = runner.invoke(app, [*sweep_args, "-o", str(tmp_path / "s1")])
    assert refused.exit_code != 0 and "--eval-fraction 0" in str(refused.exception)
    alone = runner.invoke(app, [*sweep_args, "--eval-fraction", "0", "-o", str(tmp_path / "s1")])
    assert alone.exit_code == 0, alone.output
    assert json.loads((tmp_path / "s1" / "sweep.json").read_text())["train_config"]["eval_fraction"] == 0.0
    assert data["phi_between_ranks"] and set(data["reference_evals"]) == {"base", "tuned"}
    assert {p.name for p in (tmp_path / "sweep" / "figures").glob("*.png")} == {
        "sweep_energy.png", "sweep_eval.png", "sweep_phi.png"}
    assert (tmp_path / "sweep-adapters" / "dora-r2" / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------- certified partial decompositions


def _synthetic_module(m=640, n=960, r=8, seed=0):
    """float32 W_base (a bulk and four strong directions), a decaying ΔW_full, and LoRA factors near its top.

    The adapter's σ reach above W_base's, so its tuned weight has intruders; ΔW_full's
    power-law spectrum (σᵢ ∝ i^−0.8) has gaps of ~2.5 % around j = 32, where φ stops here.
    """
    g = torch.Generator().manual_seed(seed)
    orth = lambda a, b: torch.linalg.qr(torch.randn(a, b, generator=g, dtype=torch.float64))[0]  # noqa: E731
    W = torch.randn(m, n, generator=g, dtype=torch.float64) / n**0.5 + (orth(m, 4) * torch.tensor(
        [6.0, 5.0, 4.0, 3.0], dtype=torch.float64)) @ orth(n, 4).T
    Uf, Vf = orth(m, m), orth(n, m)
    delta = (Uf * 8.0 * torch.arange(1, m + 1, dtype=torch.float64) ** -0.8) @ Vf.T
    B = Uf[:, :r] * 2.0 + 0.5 * torch.randn(m, r, generator=g, dtype=torch.float64) / m**0.5
    A = (Vf[:, :r] + 0.5 * torch.randn(n, r, generator=g, dtype=torch.float64) / n**0.5).T
    return W.float(), delta.float(), B.float(), A.float()


def _reference_measures(D, Dad, W0, W, B, A, r, J, k=10):
    """Every measure of module_measures from numpy's full float64 SVDs."""
    import scipy.linalg

    Uf, sf, Vf = np.linalg.svd(D)
    Ua, _, Va = np.linalg.svd(Dad)
    C2 = (Ua[:, :r].T @ Uf[:, :J]) ** 2
    phi = C2.cumsum(0).cumsum(1) / np.minimum(np.arange(1, r + 1)[:, None], np.arange(1, J + 1)[None, :])

    def intruders(base, tuned):
        return int(np.sum(np.abs(np.linalg.svd(base)[0].T @ np.linalg.svd(tuned)[0][:, :k]).max(0) < 0.5))

    angles = np.sort(scipy.linalg.subspace_angles(B, Uf[:, :r]))
    return {
        "captured_energy": np.sum((np.linalg.qr(B)[0].T @ D) ** 2) / np.sum(D**2),
        "captured_energy_row": np.sum((D @ np.linalg.qr(A.T)[0]) ** 2) / np.sum(D**2),
        "optimal_energy": np.sum(sf[:r] ** 2) / np.sum(sf**2),
        "phi_matrix": phi, "phi": phi[r - 1, r - 1],
        "phi_row": np.sum((Va[:r] @ Vf[:r].T) ** 2) / r,
        "principal_angles_deg": np.degrees(angles),
        "amplification_adapter": np.linalg.norm(Dad) / np.linalg.norm(Ua[:, :r].T @ W0 @ Va[:r].T),
        "amplification_full": np.linalg.norm(D) / np.linalg.norm(Uf[:, :r].T @ W @ Vf[:r].T),
        "relative_error": np.linalg.norm(Dad + (W0 - W) - D) / np.linalg.norm(D),
        "cosine": np.sum(Dad * D) / (np.linalg.norm(Dad) * np.linalg.norm(D)),
        "intruders_adapter": intruders(W0, W0 + Dad), "intruders_full": intruders(W, W + D),
    }


@pytest.mark.parametrize("case", ["lora", "dense", "quantized", "factored"])
def test_module_measures_fast_paths_match_the_full_decompositions(case):
    """Certified partial decompositions (forced by exact_below=0) against numpy's full SVDs, every measure.

    Tolerances: φ entries 2e-6 (4e-6 with a Krylov ΔW_adapter: ANGLE_TOL on each side),
    angles 1e-6 rad (+ the 5e-5° rounding), amplification 1e-5 relative, energies 1e-9;
    intruder counts equal. ``dense`` is DoRA's route (no factors: a Krylov top r of ΔW_adapter);
    ``quantized`` has W0 ≠ W_base; ``factored`` passes ΔW_adapter as its factors' SVD, never
    formed (verify's route for a plain LoRA).
    """
    from spectra.linalg.partial import lowrank_svd
    from spectra.lora.verify import delta_decomposition, module_measures

    W, delta, B, A = _synthetic_module()
    r, J, s = 8, 32, 1.5
    W0 = W + 1e-3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(9)) if case == "quantized" else W
    delta_ad = s * (B.double() @ A.double())
    adapter_svd = lowrank_svd(B, A.T, scale=s) if case != "dense" else None
    assert delta_decomposition(delta, r, phi_max=J, exact_below=0).method == "krylov"  # the fast path is tested
    common = dict(col_basis=B.double(), row_basis=A.T.double(), rank=r, W_base=W, adapter_svd=adapter_svd, phi_max=J)
    given = adapter_svd if case == "factored" else delta_ad
    row, phi, _ = module_measures(delta, given, W0, exact_below=0, **common)
    exact, exact_phi, _ = module_measures(delta, given, W0, exact_below=10**6, **common)
    ref = _reference_measures(delta.double().numpy(), delta_ad.numpy(), W0.double().numpy(), W.double().numpy(),
                              B.double().numpy(), A.double().numpy(), r, J)
    assert ref["intruders_adapter"] > 0  # the adapter's strong directions intrude: the count is tested
    phi_tol = 2e-6 if case != "dense" else 4e-6
    for got, got_phi, tol in ((row, phi, phi_tol), (exact, exact_phi, 1e-9)):
        np.testing.assert_allclose(np.array(got_phi), ref["phi_matrix"], atol=tol, rtol=0)
        for key in ("phi", "phi_row"):
            assert got[key] == pytest.approx(ref[key], abs=tol), key
        for key in ("captured_energy", "captured_energy_row", "optimal_energy", "relative_error", "cosine"):
            assert got[key] == pytest.approx(ref[key], rel=1e-9), key
        for key in ("amplification_adapter", "amplification_full"):
            assert got[key] == pytest.approx(ref[key], rel=1e-5), key
        np.testing.assert_allclose(got["principal_angles_deg"], ref["principal_angles_deg"], atol=1e-4)
        assert got["intruders_adapter"] == ref["intruders_adapter"] and got["intruders_full"] == ref["intruders_full"]


@pytest.mark.parametrize("quantized", [False, True])
def test_a_factored_adapter_update_gives_the_formed_updates_measures(quantized):
    """A plain LoRA's ΔW_adapter as its factors' exact SVD (verify's route: never formed) against the formed
    float64 update verify took before: every measure equal to float64 rounding, intruders and φ alike."""
    from spectra.linalg.partial import lowrank_svd
    from spectra.linalg.subspace import factor_svd
    from spectra.lora.verify import module_measures

    W, delta, B, A = _synthetic_module()
    s = 1.5
    W0 = W + 1e-3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(9)) if quantized else W
    low = factor_svd(B, A.T, scale=s)
    formed = (W0.double() + s * (B.double() @ A.double())).sub_(W0)  # merged − W0, as verify formed it
    common = dict(col_basis=low.U, row_basis=low.Vh.T, rank=8, W_base=W, adapter_svd=low, phi_max=32, exact_below=0)
    row, phi, vectors = module_measures(delta, lowrank_svd(B, A.T, scale=s), W0, **common)
    ref, ref_phi, ref_vectors = module_measures(delta, formed, W0, **common)
    assert set(row) == set(ref) and ref["intruders_adapter"] > 0
    for key, value in ref.items():
        if key in ("outside_lowrank", "energy_gap"):  # differences of nearly equal numbers
            assert row[key] == pytest.approx(value, abs=1e-12), key
        else:
            assert row[key] == pytest.approx(value, rel=1e-12), key
    np.testing.assert_allclose(phi, ref_phi, rtol=0, atol=1e-14)
    assert torch.equal(vectors, ref_vectors)
    with pytest.raises(ConfigError, match="needs `adapter_svd`"):
        module_measures(delta, low, W0, **(common | {"adapter_svd": None}))


def test_one_modules_measures_hold_no_float64_copy_of_it(tmp_path):
    """Peak of the tensors torch allocates while one module (1024×3072, rank 8, certified paths) is measured,
    from torch's profiler (every CPU allocation and free: deterministic, whatever else the machine runs).

    Bound: 3× the float32 ΔW (measured 2.5×: the float32 W0 + ΔW_adapter and the Krylov bases of its
    intruder check). Every float64 (out, in) is gone: ΔW_full's, W0's and W_base's up-casts, ΔW_adapter
    itself (6.8× at peak before). Negative control: the profile sees a float64 copy of ΔW as one 2× block.
    """
    import json

    from torch.profiler import ProfilerActivity, profile

    from spectra.linalg.partial import lowrank_svd
    from spectra.linalg.subspace import factor_svd
    from spectra.lora.verify import delta_decomposition, module_measures

    W, delta, B, A = _synthetic_module(1024, 3072)
    unit = delta.numel() * 4

    def allocations(call) -> tuple[float, float]:
        """(peak of the bytes allocated, largest single allocation) during `call`, in units of the float32 ΔW."""
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            call()
        prof.export_chrome_trace(str(tmp_path / "trace.json"))
        events = [e["args"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
                  if e.get("name") == "[memory]"]
        return max(e["Total Allocated"] for e in events) / unit, max(e["Bytes"] for e in events) / unit

    def measure():
        low = factor_svd(B, A.T, scale=1.5)
        Ff = delta_decomposition(delta, 8, phi_max=32, exact_below=0)
        module_measures(delta, lowrank_svd(B, A.T, scale=1.5), W, col_basis=low.U, row_basis=low.Vh.T, rank=8,
                        delta_svd=Ff, adapter_svd=low, phi_max=32, exact_below=0)

    assert allocations(lambda: delta.double()) == (2.0, 2.0)  # negative control: the profile sees a copy
    peak, largest = allocations(measure)
    assert largest < 1.5 and peak < 3.0, (peak, largest)


def test_a_dora_modules_measures_peak_under_five_times_its_delta(tmp_path):
    """DoRA's update is dense, formed in float64 (2× the float32 ΔW) on the float32 W0 in one allocation: the
    module's peak, measured 4.4× on 1024×3072, is that update, W0 + ΔW_adapter (1×) and the intruder check's
    Krylov bases. The update is the same bit for bit as merged − W0 formed from a float64 copy of W0."""
    import json

    from torch.profiler import ProfilerActivity, profile

    from spectra.checkpoints.adapter import AdapterDelta
    from spectra.linalg.subspace import factor_svd
    from spectra.lora.verify import VerifyConfig, measure_module

    W, delta, B, A = _synthetic_module(1024, 3072)
    magnitude = (W + 1.5 * B @ A).norm(dim=1) * 1.1
    tensors = {"A": A, "B": B, "m": magnitude}
    weights = type("Weights", (), {"read": staticmethod(lambda key: tensors[key])})()
    p = AdapterDelta(module="m", base_tensor="m.weight", shape=tuple(W.shape), dtype=torch.float32, conv1d=False,
                     keys={"A": "A", "B": "B", "magnitude": "m"}, scaling=1.5, embedding=False)
    assert torch.equal(p.merged(W, weights, torch.float64).sub_(W), p.merged(W.double(), weights, torch.float64).sub_(W))
    config = VerifyConfig(phi_max=32, exact_below=0)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        low = factor_svd(B, A.T, scale=1.5)
        row, phi, _, _ = measure_module(delta, W, p, weights, low, 8, config)
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    events = [e["args"] for e in json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
              if e.get("name") == "[memory]"]
    peak = max(e["Total Allocated"] for e in events) / (delta.numel() * 4)
    assert peak < 5.0, peak
    assert row["outside_lowrank"] > 1e-3 and phi is not None  # a DoRA update, measured: not plain LoRA's


def _tiny_trio(out, family: str, **lora_kwargs):
    """A tiny base of `family`, a full fine-tune (its block linears and input embedding moved) and a PEFT
    adapter with random factors."""
    base = build_model(family)
    save(base, out / "base", "safetensors")
    tuned = perturbed(base, 1)
    with torch.no_grad():
        embed = tuned.get_input_embeddings().weight  # the tied head's weight too, where there is one
        embed += 0.3 * embed.norm() / embed.numel() ** 0.5 * torch.randn(embed.shape, generator=torch.Generator().manual_seed(3))
    save(tuned, out / "tuned", "safetensors")
    with quiet_peft(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT's note on a tied layer in the adapter
        peft_model = random_adapter(base, out / "adapter", seed=2, scale=0.3, **lora_kwargs)
    return base, tuned, peft_model


def _captured(D, Dad, r):
    """‖P_U D‖²/‖D‖², U the top-r left singular vectors of Dad (rank r; PEFT forms it in float32), in float64 numpy."""
    U = np.linalg.svd(Dad, full_matrices=False)[0][:, :r]
    return float(np.sum((U.T @ D) ** 2) / np.sum(D**2))


def test_an_adapter_rank_above_the_short_side_is_measured_at_that_side(tmp_path):
    # r = 24 on the 16×32 k_proj (GQA): legal in PEFT; verify stopped with "`k` must be an int in [1, 16]"
    base, tuned, peft_model = _tiny_trio(tmp_path, "llama", r=24, lora_alpha=8, target_modules=["k_proj"])
    result = verify_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", progress=False)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
              if hasattr(m, "get_delta_weight")}
    assert [r["rank"] for r in result.modules] == [16, 16]
    assert any("exceeds the module's short side 16" in note for note in result.notes)
    for row in result.modules:
        D = (tuned.state_dict()[row["name"] + ".weight"] - base.state_dict()[row["name"] + ".weight"]).double().numpy()
        Dad = layers[row["name"]].get_delta_weight("default").detach().double().numpy()
        assert row["captured_energy"] == pytest.approx(_captured(D, Dad, 16), rel=1e-6)
        assert row["captured_energy_row"] == pytest.approx(_captured(D.T, Dad.T, 16), rel=1e-6)
        assert row["captured_energy"] == pytest.approx(1.0) and row["captured_energy_row"] < 0.99  # R^16 / 16 of 32


def test_a_tied_heads_lora_is_measured_on_the_shared_weight(tmp_path):
    # tie_word_embeddings: the checkpoint has no lm_head tensor; the head's LoRA was left out of verify
    base, tuned, peft_model = _tiny_trio(tmp_path, "qwen2", r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"])
    result = verify_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", progress=False)
    rows = {r["name"]: r for r in result.modules}
    assert set(rows) == {"model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}
    row = rows["model.embed_tokens"]
    assert row["adapter_module"] == "lm_head" and row["rank"] == 4
    D = (tuned.model.embed_tokens.weight - base.model.embed_tokens.weight).double().detach().numpy()
    Dad = dict(peft_model.named_modules())["base_model.model.lm_head"].get_delta_weight("default").detach().double().numpy()
    assert row["captured_energy"] == pytest.approx(_captured(D, Dad, 4), rel=1e-6)
    assert row["captured_energy_row"] == pytest.approx(_captured(D.T, Dad.T, 4), rel=1e-6)
    assert result.summary["modules"] == 3


def test_summary_averages_each_measure_over_the_rows_that_have_it():
    from spectra.lora.verify import summarize

    rows = [{"rank": 4, "fro_norm_full": 1.0, "relative_error": 1.0, "captured_energy": None, "optimal_energy": None,
             "phi": None, "intruders_adapter": 0, "intruders_full": 0},  # an untrained adapter's module
            {"rank": 4, "fro_norm_full": 2.0, "relative_error": 0.5, "captured_energy": 0.8, "optimal_energy": 0.9,
             "phi": 0.7, "captured_energy_row": 0.6, "intruders_adapter": 1, "intruders_full": 2}]
    s = summarize(rows, (5.0, 10.0))
    # the whole model's ‖E‖/‖ΔW_full‖: √((1²·1 + 2²·0.5²) / (1 + 4)), not the energy-weighted mean of the ratios
    assert s["relative_error"] == pytest.approx(math.sqrt((1.0 * 1.0 + 4.0 * 0.25) / 5.0))
    assert s["relative_error"] != pytest.approx((1 * 1.0 + 4 * 0.5) / 5)  # the mean of ratios it had reported
    assert s["captured_energy"] == pytest.approx(0.8) and s["phi"] == pytest.approx(0.7)
    assert s["coverage"] == 0.5 and s["intruders_full"] == 2
    untrained = summarize(rows[:1], (1.0, 2.0))
    assert untrained["relative_error"] == 1.0 and untrained["captured_energy"] is None
    # an untrained module as module_measures now writes it: captured 0, optimum its own; both count in the totals
    rows[0] |= {"captured_energy": 0.0, "optimal_energy": 0.5}
    s = summarize(rows, (5.0, 10.0))
    assert s["captured_energy"] == pytest.approx((1 * 0.0 + 4 * 0.8) / 5)
    assert s["optimal_energy"] == pytest.approx((1 * 0.5 + 4 * 0.9) / 5) and s["phi"] == pytest.approx(0.7)


def test_the_summary_relative_error_is_the_whole_models(tmp_path):
    """One big module matched exactly and a small one 10× off: the whole update's error is ‖E‖/‖ΔW‖ ≈ 1, which the
    energy-weighted mean of the per-module ratios (0.10) had hidden."""
    from spectra.lora.verify import summarize

    rows = [{"rank": 2, "fro_norm_full": 10.0, "relative_error": 0.0, "intruders_adapter": 0, "intruders_full": 0},
            {"rank": 2, "fro_norm_full": 1.0, "relative_error": 10.0, "intruders_adapter": 0, "intruders_full": 0}]
    errors = np.array([0.0, 10.0]) * np.array([10.0, 1.0])  # ‖E_i‖
    whole = float(np.sqrt((errors ** 2).sum() / (np.array([10.0, 1.0]) ** 2).sum()))
    assert summarize(rows, (1.0, 1.0))["relative_error"] == pytest.approx(whole) == pytest.approx(0.995, abs=1e-3)


def test_an_adapter_with_untrained_components_reports_its_effective_rank(tmp_path):
    """q_proj of layer 0 keeps two zero B columns (PEFT's zero init, never trained): rank 4, 2 directions used.

    Its update s·B A then has rank 2, column space span(b₁, b₂) and row space span(a₁, a₂)
    — not span(Aᵀ), though A has full rank. Every measure is checked against numpy on those
    known spaces; the plain QR of B and span(Aᵀ) (what verify took) overstate them.
    """
    import scipy.linalg

    base, tuned, peft_model = _tiny_trio(tmp_path, "llama", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    name = "model.layers.0.self_attn.q_proj"
    layer = dict(peft_model.named_modules())["base_model.model." + name]
    with torch.no_grad():
        layer.lora_B["default"].weight[:, 2:] = 0.0
    peft_model.save_pretrained(tmp_path / "adapter")
    result = verify_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", progress=False)
    rows = {r["name"]: r for r in result.modules}
    assert {n: r["effective_adapter_rank"] for n, r in rows.items() if r["effective_adapter_rank"] != 4} == {name: 2}
    assert result.summary["rank_deficient"] == 1
    assert any("rank-deficient adapter factors" in n and f"{name} (2 of 4)" in n for n in result.notes)
    row = rows[name]
    B = layer.lora_B["default"].weight.detach().double().numpy()[:, :2]  # (out, 2)
    A = layer.lora_A["default"].weight.detach().double().numpy()  # (4, in), full rank
    D = (tuned.state_dict()[name + ".weight"] - base.state_dict()[name + ".weight"]).double().numpy()
    W = base.state_dict()[name + ".weight"].double().numpy()
    energy = lambda M, basis: float(np.sum((np.linalg.qr(basis)[0].T @ M) ** 2) / np.sum(M**2))  # noqa: E731
    assert row["captured_energy"] == pytest.approx(energy(D, B), rel=1e-9)
    assert row["captured_energy_row"] == pytest.approx(energy(D.T, A[:2].T), rel=1e-9)
    assert energy(D.T, A.T) > row["captured_energy_row"] + 0.05  # span(Aᵀ): two rows the update never uses
    B4 = layer.lora_B["default"].weight.detach().double().numpy()
    assert energy(D, B4) > row["captured_energy"] + 0.05  # a plain QR of B: two arbitrary directions
    Dad = layer.scaling["default"] * B4 @ A  # s·B A in float64 (PEFT's merge rounds it to float32)
    assert np.linalg.matrix_rank(Dad) == 2
    Uf, _, Vfh = np.linalg.svd(D)
    Ua, _, Vah = np.linalg.svd(Dad)
    assert row["phi"] == pytest.approx(np.sum((Ua[:, :2].T @ Uf[:, :4]) ** 2) / 2, abs=1e-9)  # φ(2, 4)
    assert row["phi_row"] == pytest.approx(np.sum((Vah[:2] @ Vfh[:4].T) ** 2) / 2, abs=1e-9)
    ref_angles = np.degrees(np.sort(scipy.linalg.subspace_angles(B, Uf[:, :4])))
    np.testing.assert_allclose(row["principal_angles_deg"], ref_angles, atol=1e-4)  # two angles, not four
    amplification = np.linalg.norm(Dad) / np.linalg.norm(Ua[:, :2].T @ W @ Vah[:2].T)
    assert row["amplification_adapter"] == pytest.approx(amplification, rel=1e-6)
    assert len(result.phi_matrices.get(name, [[0]] * 2)) == 2  # φ(i, j) for the two directions it has
    assert row["captured_energy"] <= row["optimal_energy"] + 1e-9
    from spectra.report.verify import write_verify_report

    report = (write_verify_report(result.to_dict(), tmp_path / "report") / "report.md").read_text()
    assert f"| {name} | 4 (2) |" in report and "| model.layers.0.self_attn.v_proj | 4 |" in report


def test_float64_inputs_are_left_unchanged():
    """.double() of a float64 tensor is the tensor itself: the row-block pass subtracted ΔW_ad from the caller's
    ΔW_full and added it to W0 in place (then every later measure read W0 + ΔW_ad as the base). And a factored
    update in float32 triplets is summed in float64 rather than refused by torch.dot."""
    from spectra.linalg.partial import lowrank_svd
    from spectra.linalg.subspace import factor_svd
    from spectra.lora.verify import module_measures

    W, delta, B, A = _synthetic_module()
    W, delta = W.double(), delta.double()
    W0 = W + 1e-3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    kept = [t.clone() for t in (delta, W0, W)]
    low = factor_svd(B, A.T, scale=1.5)
    common = dict(col_basis=low.U, row_basis=low.Vh.T, rank=8, W_base=W, adapter_svd=low, phi_max=32, exact_below=0)
    formed = 1.5 * (B.double() @ A.double())
    row, _, _ = module_measures(delta, formed.clone(), W0, **common)
    assert all(torch.equal(t, k) for t, k in zip((delta, W0, W), kept))
    err = torch.linalg.matrix_norm(W0 + formed - (W + delta)) / torch.linalg.matrix_norm(delta)
    assert row["relative_error"] == pytest.approx(float(err), rel=1e-10)
    factored = lowrank_svd(B, A.T, scale=1.5)
    as32 = type(factored)(factored.values.float(), factored.total_energy, factored.shape, factored.method,
                          U=factored.U.float(), Vh=factored.Vh.float())
    row32, _, _ = module_measures(delta, as32, W0, **common)
    assert row32["relative_error"] == pytest.approx(row["relative_error"], rel=1e-5)


def test_an_update_that_cancels_to_zero_captures_nothing():
    """B = [b, b], A = [a; −a]: s·B A = 0 exactly though neither factor is zero, so it has no directions (rank 0)
    and no φ (verify had crashed on such an update). Its spaces are {0}: it captures 0 of ΔW_full, and the
    Eckart–Young optimum is ΔW_full's alone (it had been None, and the module dropped out of the totals)."""
    from spectra.linalg.subspace import factor_svd
    from spectra.lora.verify import module_measures

    g = torch.Generator().manual_seed(4)
    b, a = torch.randn(24, 1, generator=g), torch.randn(1, 16, generator=g)
    B, A = torch.cat([b, b], 1), torch.cat([a, -a], 0)
    low = factor_svd(B, A.T, scale=2.0)
    delta_ad = 2.0 * B.double() @ A.double()
    assert low.values.numel() == 0 and float(delta_ad.norm()) == 0 and float(B.norm() * A.norm()) > 0
    W = torch.randn(24, 16, generator=g)
    full = torch.randn(24, 16, generator=g)
    row, phi, vectors = module_measures(full, delta_ad, W, col_basis=low.U, row_basis=low.Vh.T, rank=2,
                                        adapter_svd=low)
    assert row["phi"] is None and phi is None and vectors is None
    assert row["captured_energy"] == row["captured_energy_row"] == row["captured_energy_both"] == 0.0
    s = np.linalg.svd(full.double().numpy(), compute_uv=False)
    assert row["optimal_energy"] == pytest.approx(float((s[:2] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
    assert row["energy_gap"] == row["optimal_energy"]
    assert row["relative_error"] == pytest.approx(1.0, abs=1e-3)  # still measured


def _moe_trio(tmp_path):
    """A Mixtral base, a fine-tune of its experts, and a rank-2 LoRA on its fused experts (target_parameters)."""
    base = build_model("mixtral")
    save(base, tmp_path / "base", "safetensors")
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".experts." in name:
                p += 0.3 * p.norm() / p.numel() ** 0.5 * torch.randn(p.shape, generator=g)
    save(tuned, tmp_path / "tuned", "safetensors")
    with quiet_peft():
        peft_model = random_adapter(base, tmp_path / "adapter", seed=2, scale=0.3, r=2, lora_alpha=4,
                                    target_modules=[], target_parameters=["mlp.experts.gate_up_proj",
                                                                          "mlp.experts.down_proj"])
    return base, tuned, peft_model


def test_a_lora_on_fused_experts_is_measured_per_expert(tmp_path):
    # PEFT's target_parameters on transformers-5 Mixtral: A (r·E, in), B (out, r·E) per fused parameter. verify read
    # them whole as one rank-6 LoRA ("`U` has 96 rows but `delta` has out=48"); each expert's w1/w3/w2 has rank 2
    base, tuned, peft_model = _moe_trio(tmp_path)
    adapted = {n.removeprefix("base_model.model.").replace(".base_layer", "") + "." + m.parameter_name: m
               for n, m in peft_model.named_modules() if type(m).__name__ == "ParamWrapper"}
    result = verify_adapter(tmp_path / "base", tmp_path / "tuned", tmp_path / "adapter", progress=False)
    assert len(result.modules) == 2 * 3 * 3 and {r["rank"] for r in result.modules} == {2}
    fused = {"w1": ("gate_up_proj", slice(0, 48)), "w3": ("gate_up_proj", slice(48, 96)),
             "w2": ("down_proj", slice(None))}
    for row in result.modules:  # model.layers.L.block_sparse_moe.experts.E.w1
        layer, expert, proj = int(row["name"].split(".")[2]), int(row["name"].split(".")[-2]), row["name"][-2:]
        parameter, rows = fused[proj]
        name = f"model.layers.{layer}.mlp.experts.{parameter}"
        D = (tuned.get_parameter(name) - base.get_parameter(name))[expert][rows].double().detach().numpy()
        Dad = adapted[name].get_delta_weight("default")[expert][rows].detach().double().numpy()
        assert row["captured_energy"] == pytest.approx(_captured(D, Dad, 2), rel=1e-6), row["name"]
        assert row["captured_energy_row"] == pytest.approx(_captured(D.T, Dad.T, 2), rel=1e-6), row["name"]


def test_eval_of_a_lora_on_fused_experts_writes_the_svd_model_per_expert(tmp_path, monkeypatch):
    """The truncated-SVD model writes each expert's W_base + rank-r truncation into its slice of the parameter
    transformers fuses the checkpoint's per-expert matrices into (Mixtral: w1, w3 → rows of gate_up_proj[e], w2 →
    down_proj[e]). It was left out with a note (and had failed with a KeyError on ...experts.0.w1.weight)."""
    import spectra.lora.train as train
    from safetensors.torch import load_file

    from tests.models import EXPERT_RANKS, planted_mixtral_pair

    base_model, base, tuned = planted_mixtral_pair(tmp_path)  # per-expert ranks 0…3, q_proj/v_proj changed too
    with quiet_peft():
        random_adapter(base_model, tmp_path / "adapter", seed=2, scale=0.3, r=2, lora_alpha=4, target_modules=[],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    data = random_text(tmp_path / "eval.txt", chars=16 * 10, seed=5)
    evaluated, evaluate = [], train.evaluate

    def kept(model, *args, **kwargs):  # the models in the order verify evaluates them: base, tuned, adapter, svd
        evaluated.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return evaluate(model, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", kept)
    out = tmp_path / "report"
    result = CliRunner().invoke(app, ["verify", str(base), str(tuned), "--adapter", str(tmp_path / "adapter"),
                                      "-o", str(out), "--eval-data", str(data), "-q"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "verify.json").read_text())
    assert set(report["evals"]) == {"base", "tuned", "adapter", "svd"} and len(evaluated) == 4
    assert not any("left out" in n for n in report["notes"])
    svd = evaluated[3]
    base_state, tuned_state = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    for (layer, expert), ranks in EXPERT_RANKS.items():
        stored = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        fused = f"model.layers.{layer}.mlp.experts"
        for proj, planted, written in (("w1", ranks[0], svd[f"{fused}.gate_up_proj"][expert][:48]),
                                       ("w3", ranks[1], svd[f"{fused}.gate_up_proj"][expert][48:]),
                                       ("w2", ranks[2], svd[f"{fused}.down_proj"][expert])):
            W, Wt = base_state[f"{stored}.{proj}.weight"].double(), tuned_state[f"{stored}.{proj}.weight"].double()
            U, S, Vh = np.linalg.svd((Wt - W).numpy())
            expected = W.numpy() + (U[:, :2] * S[:2]) @ Vh[:2]  # the per-expert matrix's rank-2 Eckart–Young part
            np.testing.assert_allclose(written.double().numpy(), expected, rtol=0, atol=1e-6, err_msg=stored + proj)
            # a negative control: truncated below the planted rank (layer 1, expert 1's w1 has rank 3), not the tuned
            assert np.allclose(written.double().numpy(), Wt.numpy(), atol=1e-6) == (planted <= 2), (stored, proj)
            assert torch.equal(written, W.float()) == (planted == 0)
    q_proj = "model.layers.0.self_attn.q_proj.weight"  # fine-tuned, not adapted: the base's
    assert torch.equal(svd[q_proj], base_state[q_proj]) and not torch.equal(svd[q_proj], evaluated[1][q_proj])
    assert report["evals"]["svd"]["loss"] != report["evals"]["base"]["loss"]


def test_a_module_with_no_place_in_the_loaded_model_is_named(tmp_path):
    """What the SVD model still cannot be written into, and is left out for: a checkpoint name that is no parameter
    of the model and not placed by a LoRA on parameters (here Mixtral's experts.0.w1 without its ExpertUpdate), or
    a place of another shape."""
    from spectra.checkpoints.adapter import ExpertUpdate
    from spectra.lora.verify import _places

    params = dict(build_model("mixtral").named_parameters())
    w1 = ExpertUpdate("model.layers.0.mlp.experts.gate_up_proj", 1, 3, False, (48, 96))  # expert 1's w3
    weights = {"model.layers.0.self_attn.q_proj": (torch.zeros(32, 32), False, None),
               "model.layers.0.block_sparse_moe.experts.1.w3": (torch.zeros(48, 32), False, w1),
               "model.layers.0.block_sparse_moe.experts.0.w1": (torch.zeros(48, 32), False, None),
               "model.layers.1.block_sparse_moe.experts.0.w2": (torch.zeros(48, 32), False,
                                                                ExpertUpdate("model.layers.1.mlp.experts.down_proj",
                                                                             0, 3, False))}  # down_proj[0] is 32×48
    places, unplaced = _places(weights, params)
    assert unplaced == ["model.layers.0.block_sparse_moe.experts.0.w1", "model.layers.1.block_sparse_moe.experts.0.w2"]
    assert places["model.layers.0.self_attn.q_proj"] is params["model.layers.0.self_attn.q_proj.weight"]
    gate_up = params["model.layers.0.mlp.experts.gate_up_proj"]
    assert places["model.layers.0.block_sparse_moe.experts.1.w3"].data_ptr() == gate_up[1, 48].data_ptr()


def test_experts_stored_fused_and_transposed_are_written_in_their_layout(tmp_path):
    """gpt-oss stores its experts as the model holds them, (E, in, out): each expert's (out, in) weight goes into
    parameter[e] transposed (gate_up_proj[e] is square: only the plan's layout tells), the router's whole."""
    from spectra.checkpoints.pairing import Pairing, PairingOptions
    from spectra.lora.verify import _places, _set_weights
    from tests.checkpoints.test_adapter_pairing import tiny_gpt_oss

    base = tiny_gpt_oss()
    save(base, tmp_path / "base", "safetensors")
    with quiet_peft():
        random_adapter(base, tmp_path / "adapter", r=2, lora_alpha=6, target_modules=[],
                       target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.router.weight"])
    pairing = Pairing(tmp_path / "base", tmp_path / "adapter", PairingOptions(vectors=False, split_fused=False))
    g = torch.Generator().manual_seed(0)
    weights = {e.name: (torch.randn(e.shape, generator=g), e.conv1d, e.adapter.parameter) for e in pairing.entries}
    model = copy.deepcopy(base)
    places, unplaced = _places(weights, dict(model.named_parameters()))
    assert unplaced == [] and len(places) == 2 * 3 + 1
    _set_weights(model, weights, places, tmp_path / "base", None)
    for e in range(3):
        for proj in ("gate_up_proj", "down_proj"):
            W = weights[f"model.layers.0.mlp.experts.{e}.{proj}"][0]  # (out, in)
            assert torch.equal(model.get_parameter(f"model.layers.0.mlp.experts.{proj}")[e], W.T)
    assert torch.equal(model.model.layers[0].mlp.router.weight, weights["model.layers.0.mlp.router"][0])



def test_sweep_keeps_a_tied_lora_s_unmerged_eval_and_its_note(monkeypatch, tmp_path):
    """verify evaluates a LoRA on a tied weight merged ('adapter') with PEFT's unmerged model beside it
    ('adapter_unmerged') and a note (tests/lora/test_verify_tied_embedding.py checks those numbers against PEFT in
    float64); the rank sweep had kept only 'adapter' as each run's eval and dropped the note. Each run now carries
    'eval_unmerged', and the note is said once for the sweep."""
    import types

    import spectra.lora.train
    import spectra.lora.verify
    from spectra.lora.train import TrainResult
    from spectra.lora.verify import _tied_eval_note, rank_sweep

    note = _tied_eval_note({("model.embed_tokens", ("lm_head",)): None})
    evals = {rank: {"base": {"loss": 5.0}, "tuned": {"loss": 4.0}, "adapter": {"loss": 4.5 - rank / 10},
                    "svd": {"loss": 4.4}, "adapter_unmerged": {"loss": 4.6 - rank / 10}} for rank in (1, 2)}
    monkeypatch.setattr(spectra.lora.train, "train_adapter", lambda base, data, config, folder, **k: TrainResult(
        out_dir=folder, task="causal_lm", method=config.method, steps=1, trainable_params=config.rank, losses=[1.0],
        step_times=[0.1]))
    monkeypatch.setattr(spectra.lora.verify, "_refuse_failing_runs", lambda base, planned: None)  # no base to check
    summary = dict.fromkeys(("captured_energy", "captured_energy_row", "optimal_energy", "phi", "relative_error",
                             "intruders_adapter", "intruders_full"), 0.5)
    monkeypatch.setattr(spectra.lora.verify, "verify_adapter", lambda base, tuned, folder, **k: types.SimpleNamespace(
        summary=summary, evals=evals[int(str(folder).rsplit("-r", 1)[1])], right_vectors={}, notes=[note]))
    result = rank_sweep("base", "tuned", "data", ranks=[1, 2], adapters_dir=tmp_path)
    assert [run["eval"] for run in result.runs] == [evals[1]["adapter"], evals[2]["adapter"]]
    assert [run["eval_unmerged"] for run in result.runs] == [evals[1]["adapter_unmerged"],
                                                             evals[2]["adapter_unmerged"]]
    assert len(result.sources["notes"]) == 1 and result.sources["notes"][0].startswith(note)
    assert "'eval_unmerged' the 'adapter_unmerged' one" in result.sources["notes"][0]

