"""Adapter extraction with PEFT as the referee: load, merge, compare with the tuned model."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spectra.analysis import analyze
from spectra.errors import ConfigError
from spectra.lora.extract import extract_adapter
from spectra.ranks import RankPolicy, recommend_ranks, save_plan
from tests.models import build_model, on_grid, save, tiny_config


def perturbed(model, *, seed=0, scale=0.005, names=None, select=None):
    """A copy of `model` whose chosen parameters each moved by N(0, scale²) noise, drawn in parameter order: every
    matrix (2-D) whose name holds one of `names` (any, without), or those `select(name, parameter)` picks."""
    if select is None:
        def select(name, p):
            return p.ndim == 2 and (names is None or any(n in name for n in names))
    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if select(name, p):
                p += scale * torch.randn(p.shape, generator=g)
    return tuned


def merged_state(base_model, adapter_dir):
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(adapter_dir))
    return model.merge_and_unload().state_dict(), model


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-pair")
    base = build_model("llama")
    tuned = perturbed(base, names=("self_attn", "mlp"))
    return base, tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


def test_full_rank_adapter_reproduces_tuned_weights_and_logits(llama_pair, tmp_path):
    base, tuned, b, t = llama_pair
    result = extract_adapter(b, t, "full", tmp_path / "ad", progress=False)  # rank min(d_in, d_out) each
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["r"] == 32 and set(cfg["rank_pattern"].values()) == {16}  # k/v are 16×32 (GQA)
    assert cfg["task_type"] == "CAUSAL_LM"  # LlamaForCausalLM's, as the plan's peft_config says
    state, _ = merged_state(base, tmp_path / "ad")
    for name, value in tuned.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=2e-6, msg=name)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    from peft import PeftModel

    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))(ids).logits
        torch.testing.assert_close(peft_logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)
    assert all(m.error < 1e-5 * max(m.fro_norm, 1e-12) + 1e-6 for m in result.modules)


def test_adapter_files_get_the_umask_permissions_not_owner_only(llama_pair, tmp_path):
    """safetensors ≥ 0.8 writes 0600 files (its issue #782): another user or a server could not read the adapter."""
    import stat

    _, _, b, t = llama_pair
    extract_adapter(b, t, 4, tmp_path / "ad", progress=False)
    (tmp_path / "plain").write_text("")  # what an ordinary open() gives under this umask
    plain = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert stat.S_IMODE((tmp_path / "ad" / name).stat().st_mode) == plain, name


def test_workers_give_the_same_adapter_in_the_same_order(llama_pair, tmp_path):
    _, _, b, t = llama_pair
    one = extract_adapter(b, t, 4, tmp_path / "one", progress=False, workers=1, full_below=8)  # randomized path
    three = extract_adapter(b, t, 4, tmp_path / "three", progress=False, workers=3, full_below=8)
    assert [m.name for m in one.modules] == [m.name for m in three.modules]
    for a, c in zip(one.modules, three.modules):
        assert c.error == pytest.approx(a.error, rel=1e-4, abs=1e-9) and c.fro_norm == pytest.approx(a.fro_norm, rel=1e-9)
    x = load_file(str(tmp_path / "one" / "adapter_model.safetensors"))
    y = load_file(str(tmp_path / "three" / "adapter_model.safetensors"))
    assert list(x) == list(y)
    for key in x:
        if key.endswith("lora_A.weight"):
            B = key.replace("lora_A", "lora_B")
            torch.testing.assert_close(y[B] @ y[key], x[B] @ x[key], rtol=1e-4, atol=1e-6)


def test_truncated_rank_is_eckart_young(llama_pair, tmp_path):
    base, tuned, b, t = llama_pair
    result = extract_adapter(b, t, 4, tmp_path / "ad", roles=("q", "down"), progress=False)
    state, _ = merged_state(base, tmp_path / "ad")
    names = {m.name for m in result.modules}
    assert names == {f"model.layers.{i}.{p}" for i in (0, 1) for p in ("self_attn.q_proj", "mlp.down_proj")}
    for m in result.modules:
        key = m.name + ".weight"
        delta = (tuned.state_dict()[key].double() - base.state_dict()[key].double()).numpy()
        u, s, vt = np.linalg.svd(delta)
        best = (u[:, :4] * s[:4]) @ vt[:4]
        np.testing.assert_allclose(state[key].double().numpy() - base.state_dict()[key].double().numpy(), best,
                                   atol=2e-6)
        assert m.error == pytest.approx(np.sqrt((s[4:] ** 2).sum()), rel=1e-4)  # measured error = EY tail
        assert m.tail == pytest.approx(m.error, rel=1e-4)
    untouched = [k for k in state if "k_proj" in k]
    assert all(torch.equal(state[k], base.state_dict()[k]) for k in untouched)  # not targeted: unchanged


def test_plan_with_rank_pattern_and_rslora(llama_pair, tmp_path):
    base, tuned, b, t = llama_pair
    analysis = analyze(b, t, cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(energy=0.5, noise=False, rslora=True, roles=("q", "v", "up")))
    plan_path = save_plan(plan, tmp_path / "plan.json")
    extract_adapter(b, t, plan_path, tmp_path / "ad", progress=False)
    from peft import PeftModel

    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    planned = {m.name: m for m in plan.modules}
    seen = set()
    for name, module in model.named_modules():
        if hasattr(module, "r") and isinstance(module.r, dict) and "default" in module.r:
            plain = name.removeprefix("base_model.model.")
            seen.add(plain)
            assert module.r["default"] == planned[plain].rank
            assert module.scaling["default"] == pytest.approx(planned[plain].alpha / np.sqrt(planned[plain].rank))
    assert seen == set(planned)
    assert len({m.rank for m in plan.modules}) > 1, "the test needs differing ranks to exercise rank_pattern"
    # a DoRA plan gives a plain LoRA adapter, and says so
    from spectra.errors import PeftConfigWarning

    dora = recommend_ranks(analysis, RankPolicy(energy=0.5, noise=False, use_dora=True, roles=("q",)))
    with pytest.warns(PeftConfigWarning, match="plan is for DoRA"):
        result = extract_adapter(b, t, dora, tmp_path / "dora", progress=False)
    assert result.config["use_dora"] is False and "plan is for DoRA" in result.notes[0]
    assert all("the adapter leaves out" in n for n in result.notes[1:])  # the changed k, v, o, … outside the plan


def test_gpt2_conv1d_full_rank(tmp_path):
    base = build_model("gpt2")
    tuned = perturbed(base, names=("c_attn", "c_fc"))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    extract_adapter(b, t, "full", tmp_path / "ad", roles=("q", "up"), progress=False)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True
    assert set(cfg["target_modules"]) == {f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_fc")}
    state, _ = merged_state(base, tmp_path / "ad")
    for name, value in tuned.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=2e-6, msg=name)


def test_modules_to_save_classification_head(tmp_path):
    base = build_model("bert", head=True)
    tuned = perturbed(base, names=("attention.self", "classifier"))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q", "k", "v"), modules_to_save=("classifier",),
                             progress=False)
    assert result.modules_to_save == ["classifier"]
    state, model = merged_state(base, tmp_path / "ad")
    for name in ("classifier.weight", "bert.encoder.layer.1.attention.self.value.weight"):
        torch.testing.assert_close(state[name], tuned.state_dict()[name], rtol=1e-5, atol=2e-6)
    # the adapter's task type is the class's, as in a plan's peft_config (it was null): PEFT loads the classifier
    # model, which takes its head from the adapter; without the head saved, SEQ_CLS would refuse to load: null
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    assert type(model).__name__ == "PeftModelForSequenceClassification"
    extract_adapter(b, t, 2, tmp_path / "ad2", roles=("q",), progress=False)
    assert json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())["task_type"] is None
    merged_state(base, tmp_path / "ad2")  # loads


def _classifier(family):
    """A tiny sequence classifier of `family` and its head, the module PEFT's SEQ_CLS saves whole (Llama's score
    reads the last token that is not padding, so its config needs a pad token)."""
    if family == "bert":
        return build_model("bert"), "classifier"
    import transformers as tf

    config = tiny_config("llama")
    config.pad_token_id = 0
    return on_grid(tf.LlamaForSequenceClassification, config), "score"


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_a_classifier_plan_saves_its_head_whole(family, tmp_path):
    """extract --plan saves the modules the plan's modules_to_save lists (the head PEFT trains in full for SEQ_CLS)
    from TUNED, as --modules-to-save does: it had left them out, so PEFT ran the base's head, task-less."""
    from peft import PeftModel

    base, head = _classifier(family)
    tuned = perturbed(base, names=("attention.self", "self_attn", head))
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False), RankPolicy(energy=0.5, noise=False))
    assert [m.name for m in plan.modules_to_save] == [head]
    full = dataclasses.replace(plan, modules=tuple(dataclasses.replace(m, rank=min(m.shape)) for m in plan.modules))
    result = extract_adapter(b, t, save_plan(full, tmp_path / "plan.json"), tmp_path / "ad", progress=False)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert result.modules_to_save == [head] and config["modules_to_save"] == [head]
    assert config["task_type"] == "SEQ_CLS" and head not in result.left_out
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
    saved = model.base_model.model.get_submodule(head).modules_to_save["default"]  # PEFT's copy, from the adapter
    for name, value in tuned.get_submodule(head).state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name  # bit for bit: copied, not decomposed
    merged = model.merge_and_unload()
    ids = torch.randint(1, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got, before = tuned(input_ids=ids).logits, merged(input_ids=ids).logits, base(input_ids=ids).logits
    assert (want - before).abs().max() > 1e-3  # the fine-tune moves the logits, so agreeing below says something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # full rank: float32 round-off of B@A alone


def test_a_causal_lm_plan_saves_no_module_whole(llama_pair, tmp_path):
    """The negative control: a causal LM's plan lists no modules_to_save (PEFT trains no head in full for
    CAUSAL_LM), and its adapter saves none."""
    base, tuned, b, t = llama_pair
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False), RankPolicy(energy=0.5, noise=False))
    assert plan.modules_to_save == ()
    result = extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    assert result.modules_to_save == [] and result.config["modules_to_save"] is None
    assert result.config["task_type"] == "CAUSAL_LM"


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_embeddings_are_written_as_peft_embedding_loras(family, tmp_path):
    """nn.Embedding takes lora_embedding_A (r, vocab) / lora_embedding_B (dim, r); Linear keys would be dropped."""
    base = build_model(family)
    tuned = perturbed(base)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = extract_adapter(b, t, 3, tmp_path / "ad", roles=("embed", "q"), progress=False)
    tied = "tied to the output head" in " ".join(str(w.message) for w in caught)
    # GPT-2 ties lm_head to wte: the note says so (the others name the changed matrices outside embed, q)
    assert tied == (family == "gpt2") == any("tied to the output head" in n for n in result.notes)
    (embedding,) = [m.name for m in result.modules if "emb" in m.name or m.name.endswith("wte")]
    state, _ = merged_state(base, tmp_path / "ad")
    key = next(k for k in state if k.endswith(embedding.split(".", 1)[-1] + ".weight"))
    W0, W1 = base.state_dict()[key].double().numpy(), tuned.state_dict()[key].double().numpy()
    u, s, vt = np.linalg.svd(W1 - W0)
    np.testing.assert_allclose(state[key].double().numpy() - W0, (u[:, :3] * s[:3]) @ vt[:3], atol=2e-6)
    assert not np.allclose(state[key].double().numpy(), W0)  # negative control: the update did land


def test_calibration_notes_reach_the_result(tmp_path):
    """extract --calibration collects the base's inputs itself: a GPT-2 with 32 positions cuts the texts at 32 tokens
    (the default length is 128), which Calibration.notes says; the result dropped that note, so the CLI, which prints
    result.notes, never said it."""
    from spectra.calibration import collect_calibration

    base = build_model("gpt2")  # n_positions = 32
    b, t = save(base, tmp_path / "b", "safetensors"), save(perturbed(base), tmp_path / "t", "safetensors")
    text = tmp_path / "calibration.txt"
    text.write_text("words to cut into blocks " * 20)
    (note,) = collect_calibration(b, text, progress=False).notes
    assert "cut at 32 tokens, not the default 128" in note
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("qkv",), calibration=text, progress=False)
    left_out = [n for n in result.notes if n.startswith("the adapter leaves out")]  # wte, wpe, c_proj, c_fc…
    assert result.notes == left_out + [note] and result.modules[0].method.startswith("data-optimal")
    plain = extract_adapter(b, t, 2, tmp_path / "plain", roles=("qkv",), progress=False).notes
    assert left_out and plain == left_out  # no calibration


def test_a_head_transformers_renames_is_written_under_the_models_name(tmp_path):
    """GPT-NeoX stores its head as embed_out; transformers 5 loads it into lm_head, where PEFT must find it."""
    base = build_model("gpt_neox")
    tuned = perturbed(base)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("qkv", "head"), progress=False)
    assert "lm_head" in {m.name for m in result.modules}
    state, _ = merged_state(base, tmp_path / "ad")
    W0, W1 = base.state_dict()["lm_head.weight"].double().numpy(), tuned.state_dict()["lm_head.weight"].double().numpy()
    u, s, vt = np.linalg.svd(W1 - W0)
    np.testing.assert_allclose(state["lm_head.weight"].double().numpy() - W0, (u[:, :2] * s[:2]) @ vt[:2], atol=2e-6)


def test_names_the_model_cannot_adapt_and_bad_alpha_are_refused(tmp_path):
    # Gemma 3's multimodal projector is a bare parameter, mm_input_projection_weight (role other, stack projector), of
    # no module PEFT can wrap
    base = build_model("gemma3_multimodal")
    b, t = save(base, tmp_path / "b", "safetensors"), save(perturbed(base), tmp_path / "t", "safetensors")
    # the roles leave it out (it is no layer's weight), naming it among what the adapter does not carry
    result = extract_adapter(b, t, 2, tmp_path / "bare", roles=("q", "other"), stacks=("language", "projector"),
                             progress=False)
    projector = "multi_modal_projector.mm_input_projection_weight"
    assert projector not in {m.name for m in result.modules} and projector in result.left_out
    assert any(projector in n and "TUNED" in n for n in result.notes)
    with pytest.raises(ConfigError, match=f"{projector}: a parameter of its own.*PEFT cannot adapt"):
        extract_adapter(b, t, 2, tmp_path / "ad", roles=("other",), stacks=("projector",), progress=False)
    for alpha in (0.0, -4.0):
        with pytest.raises(ConfigError, match="alpha must be positive"):
            extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",), alpha=alpha, progress=False)
    assert not (tmp_path / "ad").exists()
    extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",), progress=False)  # the rest extracts as before


def test_a_linear_subclass_is_a_module_unless_its_forward_returns_no_tensor():
    """PEFT wraps any nn.Linear subclass as a LoRA module; one whose forward returns a tuple (PhiMoE's router) then
    fails in every forward, so its weight is a parameter target. Falcon's FalconLinear (a tensor) stays a module."""
    import transformers as tf

    from spectra.checkpoints.targets import ModelTarget, meta_model, model_targets

    falcon = tf.FalconConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, vocab_size=64).to_dict()
    model = meta_model(falcon | {"architectures": ["FalconForCausalLM"]})
    assert type(model.transformer.h[0].self_attention.query_key_value).__name__ == "FalconLinear"
    qkv = "transformer.h.0.self_attention.query_key_value"
    assert model_targets([qkv], model)[qkv].parameter is False
    phimoe = meta_model(build_model("phimoe").config.to_dict() | {"architectures": ["PhimoeForCausalLM"]})
    router = "model.layers.0.block_sparse_moe.gate"
    assert model_targets([router], phimoe)[router] == ModelTarget("model.layers.0.mlp.router.weight", parameter=True,
                                                                  stored_name=router)


def _mixtral_fine_tune(update, *, seed: int):
    """A tiny transformers-5 Mixtral and a copy changed in place by ``update(tuned, generator)``."""
    base = build_model("mixtral")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        update(tuned, torch.Generator().manual_seed(seed))
    return base, tuned


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT maps experts itself
def test_fused_experts_at_their_own_ranks_merge_to_their_own_truncations(tmp_path):
    """transformers-5 Mixtral fuses its experts into one parameter per projection, which PEFT adapts at one rank. A
    per-module plan gives the experts of a projection different ranks: extract refused it. It writes them onto the
    fused parameters itself now (the largest rank, the others' factors padded with zeros), and PEFT's merge gives
    each expert its own rank's float64 truncation."""
    def move_experts(tuned, g):  # (experts, out, in), each expert moved by a different amount
        for p in tuned.parameters():
            if p.ndim == 3:
                p += 0.02 * torch.randn(p.shape, generator=g) * torch.linspace(0.1, 1, p.shape[0])[:, None, None]

    base, tuned = _mixtral_fine_tune(move_experts, seed=1)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    analysis = analyze(b, t, cache_dir=False, progress=False)
    mixed = recommend_ranks(analysis, RankPolicy(roles=("gate", "up", "down"), energy=0.6, noise=False))
    assert len({m.rank for m in mixed.modules if m.name.endswith(".w2")}) > 1  # down's experts: several ranks
    result = extract_adapter(b, t, mixed, tmp_path / "ad", progress=False)
    assert all(".experts." in n and not re.search(r"\.experts\.\d", n) for n in result.config["target_parameters"])
    state = _load_without_missing_keys(base, tmp_path / "ad")
    W0, W1 = base.state_dict(), tuned.state_dict()
    for m in (m for m in mixed.modules if m.name.endswith(".w2")):
        layer, e = int(m.name.split(".")[2]), int(m.name.split(".")[-2])
        key = f"model.layers.{layer}.mlp.experts.down_proj"
        d = (W1[key][e] - W0[key][e]).double().numpy()
        np.testing.assert_allclose(state[key][e].double().numpy() - W0[key][e].double().numpy(),
                                   _best_rank(d, m.rank), atol=2e-6, err_msg=m.name)


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # applied (see below)
def test_mixtrals_router_is_written_onto_its_weight(tmp_path):
    """transformers 5 loads Mixtral's router block_sparse_moe.gate into mlp.gate, a MixtralTopKRouter (no Linear):
    extract refused it. Written onto mlp.gate.weight as target_parameters, at its own rank and α (1 here, beside
    attention at 6 and the experts PEFT converts at the global 2), as the plan's peft_config says: it loads, trains
    (router LoRA gradients), runs unmerged as merged, and merges to base + the best rank-1 ΔW. Not under its stored
    name: PEFT 0.21 converts that to the bare gate.weight, every layer's router at the global r, whatever
    rank_pattern says."""
    import dataclasses

    from peft import LoraConfig, PeftModel
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    from spectra.checkpoints.targets import meta_model

    base = build_model("mixtral")  # its router, attention's q and the experts moved
    tuned = perturbed(base, seed=5, select=lambda name, p: p.ndim == 3 or "q_proj" in name or "mlp.gate" in name)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    plan = recommend_ranks(analyze(b, t, cache_dir=False, progress=False),
                           RankPolicy(roles=("q", "down", "other"), uniform=True, noise=False))
    rank = {"q": 6, "down": 2, "other": 1}
    plan = dataclasses.replace(plan, modules=tuple(dataclasses.replace(m, rank=rank[m.role], alpha=2.0 * rank[m.role])
                                                   for m in plan.modules))
    routers = [f"model.layers.{i}.mlp.gate.weight" for i in (0, 1)]
    result = extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    planned = plan.to_peft_config(model=meta_model(json.loads((b / "config.json").read_text())))
    assert result.config["target_parameters"] == routers == [p for p in planned["target_parameters"] if "gate." in p]

    def setting(config, name):  # the rank and α a PEFT config gives `name`, looked up as PEFT does
        from peft.utils.other import get_pattern_key

        key = get_pattern_key([*config["rank_pattern"], *config["alpha_pattern"]], name)
        return config["rank_pattern"].get(key, config["r"]), config["alpha_pattern"].get(key, config["lora_alpha"])

    assert all(setting(result.config, p) == setting(planned, p) == (1, 2.0) for p in routers)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"), is_trainable=True).train()
    wrappers = {n: m for n, m in peft_model.named_modules() if n.endswith("mlp.gate")}
    assert len(wrappers) == 2 and all((m.r["default"], m.scaling["default"]) == (1, 2.0) for m in wrappers.values())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    peft_model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "mlp.gate.lora_" in n]
    assert len(grads) == 4 and all(g is not None and g.abs().sum() > 0 for g in grads)
    state = _load_without_missing_keys(base, tmp_path / "ad")
    merged = build_model("mixtral")
    merged.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(peft_model.eval()(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
    W0, W1 = base.state_dict(), tuned.state_dict()
    for layer in (0, 1):
        at = f"model.layers.{layer}"
        for key, r in ((f"{at}.mlp.gate.weight", 1), (f"{at}.self_attn.q_proj.weight", 6)):
            d = (W1[key] - W0[key]).double().numpy()
            np.testing.assert_allclose((state[key] - W0[key]).double().numpy(), _best_rank(d, r), atol=2e-6)
        key = f"{at}.mlp.experts.down_proj"
        for e in range(3):
            d = (W1[key][e] - W0[key][e]).double().numpy()
            np.testing.assert_allclose((state[key][e] - W0[key][e]).double().numpy(), _best_rank(d, 2), atol=2e-6)
    # the stored name, as PEFT converts it: the bare gate.weight (every layer's router), its rank_pattern left behind
    stored = LoraConfig(r=2, target_modules=["model.layers.1.block_sparse_moe.gate"],
                        rank_pattern={r"^model\.layers\.1\.block_sparse_moe\.gate": 1})
    convert_peft_config_for_transformers(stored, model=base, conversions=None)
    assert stored.target_parameters == {"gate.weight"} and stored.target_modules == set()


def test_mixtrals_router_saved_whole_is_the_tuned_router(tmp_path):
    """modules_to_save naming Mixtral's router (block_sparse_moe.gate, loaded into mlp.gate, a MixtralTopKRouter whose
    LoRA goes onto its weight) is saved as the module mlp.gate, which PEFT copies and runs as is: the merge and the
    unmerged forward use the tuned router. It was kept under the stored name, which PEFT matches to no module: the
    adapter loaded without a word and the router stayed the base's. An expert's w1 (rows of the fused
    gate_up_proj, which no module holds as stored) is refused, as PEFT would drop it too."""
    from peft import PeftModel

    base = build_model("mixtral")  # its router and attention's q moved
    tuned = perturbed(base, seed=6, select=lambda name, p: "q_proj" in name or "mlp.gate" in name)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",),
                             modules_to_save=("model.layers.1.block_sparse_moe.gate",), progress=False)
    assert result.config["modules_to_save"] == ["model.layers.1.mlp.gate"]
    state = _load_without_missing_keys(base, tmp_path / "ad")
    W0, W1 = base.state_dict(), tuned.state_dict()
    assert torch.equal(state["model.layers.1.mlp.gate.weight"], W1["model.layers.1.mlp.gate.weight"])
    assert torch.equal(state["model.layers.0.mlp.gate.weight"], W0["model.layers.0.mlp.gate.weight"])  # not asked
    merged = build_model("mixtral")
    merged.load_state_dict(state)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad")).eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(ConfigError, match=r"modules_to_save: model\.layers\.0\.block_sparse_moe\.experts\.0\.w1 is no"):
        extract_adapter(b, t, 2, tmp_path / "ad2", roles=("q",),
                        modules_to_save=("model.layers.0.block_sparse_moe.experts.0.w1",), progress=False)
    assert not (tmp_path / "ad2").exists()


def test_a_module_to_save_the_model_class_lacks_names_the_class_to_load_onto(tmp_path):
    """A module the adapter's class has no module for (a classifier's score beside a config.json naming
    LlamaForCausalLM) was refused as a weight 'transformers fuses or converts when it loads the checkpoint', which
    nothing does: the message names the class and --model-class now, and with the class it goes through."""
    from safetensors.torch import load_file, save_file

    base = build_model("llama")
    b, t = save(base, tmp_path / "b", "safetensors"), save(base, tmp_path / "t", "safetensors")
    weights = load_file(t / "model.safetensors")
    weights["score.weight"] = torch.randn(2, 32)
    save_file(weights, t / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"modules_to_save: LlamaForCausalLM has no module score, .*--model-class"):
        extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",), modules_to_save=("score",), progress=False)
    assert not (tmp_path / "ad").exists()
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",), modules_to_save=("score",), progress=False,
                             model_class="LlamaForSequenceClassification")
    assert result.config["modules_to_save"] == ["score"]


def _qwen2_embedding_fine_tune(tmp_path):
    """Qwen2 (lm_head tied to embed_tokens, stored once) and a fine-tune of its embedding alone, saved."""
    base = build_model("qwen2")
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.model.embed_tokens.weight.add_(0.01 * torch.randn_like(tuned.model.embed_tokens.weight))  # ½ its norm
    return base, tuned, save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")


def test_a_saved_tied_embedding_carries_its_head_along(tmp_path):
    """qwen2 ties lm_head to embed_tokens: saving the embedding whole must move the head with it."""
    from peft import PeftModel

    base, tuned, b, t = _qwen2_embedding_fine_tune(tmp_path)
    extract_adapter(b, t, 1, tmp_path / "ad", roles=("q",), modules_to_save=("embed_tokens",), progress=False)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["ensure_weight_tying"] is True
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))(ids).logits
        torch.testing.assert_close(got, tuned(ids).logits, rtol=1e-5, atol=1e-6)
        assert float((base(ids).logits - tuned(ids).logits).abs().max()) > 1e-3  # negative control


def test_a_lora_on_a_tied_embedding_says_it_holds_only_merged(tmp_path):
    """PEFT applies an Embedding LoRA to the lookup only: the tied head reads the base weight until merged."""
    from peft import PeftModel

    from spectra.errors import PeftConfigWarning

    base, tuned, b, t = _qwen2_embedding_fine_tune(tmp_path)
    with pytest.warns(PeftConfigWarning, match="tied to the output head lm_head"):
        result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("embed",), progress=False)
    assert len(result.notes) == 1 and "--modules-to-save embed_tokens" in result.notes[0]
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PEFT's own notes on a tied layer in the adapter
        peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ad"))
        assert float((peft_model(ids).logits - tuned(ids).logits).abs().max()) > 1e-3  # what the note says
        torch.testing.assert_close(peft_model.merge_and_unload()(ids).logits, tuned(ids).logits, rtol=1e-4, atol=1e-5)
    untied = build_model("llama")  # no tie: no note
    tuned = copy.deepcopy(untied)
    with torch.no_grad():
        tuned.model.embed_tokens.weight.add_(0.01 * torch.randn_like(tuned.model.embed_tokens.weight))  # ½ its norm
    b, t = save(untied, tmp_path / "b2", "safetensors"), save(tuned, tmp_path / "t2", "safetensors")
    assert extract_adapter(b, t, "full", tmp_path / "ad2", roles=("embed",), progress=False).notes == []


def test_a_lora_on_t5s_shared_embedding_says_it_is_never_called(tmp_path):
    """T5 looks tokens up through encoder.embed_tokens and decoder.embed_tokens, modules of their own that share
    shared's weight (tied, as transformers 5 ties them with tie_word_embeddings): PEFT's LoRA on `shared` is never
    called, so unmerged the adapter carries none of the embedding's update (the note had said only the head
    missed it). Reference: PEFT's unmerged model equals the q-only adapter's; its merge is the fine-tune."""
    import transformers as tf
    from peft import PeftModel

    config = tiny_config("t5")
    assert config.tie_word_embeddings
    torch.manual_seed(0)
    base = tf.T5ForConditionalGeneration(config).eval()
    tuned = copy.deepcopy(base)
    with torch.no_grad():
        tuned.shared.weight += 0.05 * torch.randn(tuned.shared.weight.shape)
        tuned.encoder.block[0].layer[0].SelfAttention.q.weight += 0.05
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        both = extract_adapter(b, t, "full", tmp_path / "both", roles=("q", "embed"), progress=False)
        extract_adapter(b, t, "full", tmp_path / "q", roles=("q",), progress=False)
    note = next(n for n in both.notes if "shared" in n)
    assert "shared's LoRA is never called" in note and "encoder.embed_tokens" in note
    assert "--modules-to-save shared" in note
    ids, dec = torch.tensor([[3, 4, 5, 6, 1]]), torch.tensor([[0, 7, 8]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adapted = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "both")).eval()
        q_only = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "q")).eval()
        got = adapted(input_ids=ids, decoder_input_ids=dec).logits
        want = tuned(input_ids=ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(got, q_only(input_ids=ids, decoder_input_ids=dec).logits)  # what the note says
        assert float((got - want).abs().max()) > 1e-3
        merged = adapted.merge_and_unload()(input_ids=ids, decoder_input_ids=dec).logits
        torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)


def test_keys_use_the_model_names_when_the_checkpoint_lacks_their_prefix(tmp_path):
    """The original GPT-2 checkpoint stores h.0.attn.c_attn; GPT2LMHeadModel's module is transformer.h.0.attn.c_attn."""
    from safetensors.torch import load_file, save_file

    base = build_model("gpt2")
    tuned = perturbed(base, names=("c_attn",))
    for model, side in ((base, "b"), (tuned, "t")):
        save(model, tmp_path / side, "safetensors")
        file = tmp_path / side / "model.safetensors"
        stored = {k.removeprefix("transformer."): v for k, v in load_file(str(file)).items() if k != "lm_head.weight"}
        save_file(stored, str(file), metadata={"format": "pt"})
    extract_adapter(tmp_path / "b", tmp_path / "t", "full", tmp_path / "ad", roles=("qkv",), progress=False)
    keys = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    state, _ = merged_state(base, tmp_path / "ad")
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight"):
        torch.testing.assert_close(state[name], tuned.state_dict()[name], rtol=1e-5, atol=2e-6)


def _load_without_missing_keys(model, adapter_dir):
    """PEFT's merged state dict of ``model`` + adapter; PEFT only warns about keys it could not place, so fail on that."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, _ = merged_state(model, adapter_dir)
    placed = [str(w.message) for w in caught if "adapter keys" in str(w.message)]
    assert not placed, placed
    return state


@pytest.mark.parametrize("bare", ["tuned", "base"])
def test_keys_name_the_base_class_when_the_other_side_is_a_bare_model(bare, tmp_path):
    """LlamaForCausalLM saves model.layers.0…, a bare LlamaModel layers.0…: an adapter is for the base's class."""
    full = build_model("llama")
    tuned_full = perturbed(full, names=("self_attn", "mlp"))
    base, tuned = (full, tuned_full.model) if bare == "tuned" else (full.model, tuned_full)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 4, tmp_path / "ad", roles=("q", "down"), progress=False)
    assert result.model_class == type(base).__name__
    state = _load_without_missing_keys(base, tmp_path / "ad")
    prefix = "model." if bare == "tuned" else ""
    assert {m.name for m in result.modules} == {f"{prefix}layers.{i}.{p}" for i in (0, 1)
                                                for p in ("self_attn.q_proj", "mlp.down_proj")}
    tuned_state = tuned_full.state_dict() if bare == "tuned" else tuned_full.model.state_dict()
    tuned_state = {k.removeprefix("model."): v for k, v in tuned_state.items()}
    for m in result.modules:
        key = m.name + ".weight"
        W0, W1 = base.state_dict()[key].double().numpy(), tuned_state[key.removeprefix("model.")].double().numpy()
        u, s, vt = np.linalg.svd(W1 - W0)
        np.testing.assert_allclose(state[key].double().numpy() - W0, (u[:, :4] * s[:4]) @ vt[:4], atol=2e-6)
        assert not np.allclose(state[key].double().numpy(), W0)  # negative control: the update did land


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT maps experts itself
def test_expert_keys_of_a_bare_fine_tune_take_the_base_class_prefix(tmp_path):
    """A bare MixtralModel fine-tune stores layers.0.block_sparse_moe.experts.N.w1; PEFT converts model.layers.0…"""
    base, tuned = _mixtral_fine_tune(
        lambda tuned, g: tuned.model.layers[1].mlp.experts.down_proj.add_(0.02 * torch.randn(3, 32, 48, generator=g)),
        seed=2)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned.model, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 3, tmp_path / "ad", roles=("down",), progress=False)
    assert {m.name for m in result.modules} == {f"model.layers.{i}.block_sparse_moe.experts.{e}.w2"
                                                for i in (0, 1) for e in range(3)}
    state = _load_without_missing_keys(base, tmp_path / "ad")
    key = "model.layers.1.mlp.experts.down_proj"
    for e in range(3):  # (experts, out, in): each expert's slice is base + its best rank-3 update
        W0, W1 = base.state_dict()[key][e].double().numpy(), tuned.state_dict()[key][e].double().numpy()
        u, s, vt = np.linalg.svd(W1 - W0)
        np.testing.assert_allclose(state[key][e].double().numpy() - W0, (u[:, :3] * s[:3]) @ vt[:3], atol=2e-6)


def test_model_class_chooses_the_class_the_adapter_is_for(tmp_path):
    full = build_model("llama")
    tuned = perturbed(full, names=("self_attn",))
    b, t = save(full, tmp_path / "b", "safetensors"), save(tuned.model, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q",), model_class="LlamaModel", progress=False)
    assert result.model_class == "LlamaModel" and {m.name for m in result.modules} == {"layers.0.self_attn.q_proj",
                                                                                        "layers.1.self_attn.q_proj"}
    state = _load_without_missing_keys(full.model, tmp_path / "ad")
    key = "layers.1.self_attn.q_proj.weight"
    assert not torch.equal(state[key], full.model.state_dict()[key])
    with pytest.raises(ConfigError, match="model_class 'LlamaForNothing'.*e.g. LlamaForCausalLM"):
        extract_adapter(b, t, 2, tmp_path / "ad2", roles=("q",), model_class="LlamaForNothing", progress=False)


def test_a_head_only_the_tuned_class_has_makes_the_adapter_for_that_class(tmp_path):
    """A classifier saved whole from a fine-tune of a bare BertModel: only BertForSequenceClassification holds it."""
    base = build_model("bert", head=False)
    tuned = perturbed(build_model("bert", head=True), names=("attention.self", "classifier"))
    with torch.no_grad():  # the fine-tune started from the bare base
        tuned.bert.load_state_dict(perturbed(base, names=("attention.self",)).state_dict(), strict=False)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    result = extract_adapter(b, t, "full", tmp_path / "ad", roles=("q",), modules_to_save=("classifier",),
                             progress=False)
    assert result.model_class == "BertForSequenceClassification"
    head_model = build_model("bert", head=True)
    head_model.bert.load_state_dict(base.state_dict(), strict=False)
    state = _load_without_missing_keys(head_model, tmp_path / "ad")
    for name in ("classifier.weight", "bert.encoder.layer.1.attention.self.query.weight"):
        torch.testing.assert_close(state[name], tuned.state_dict()[name], rtol=1e-5, atol=2e-6)


def test_bad_input_writes_nothing(llama_pair, tmp_path):
    base, tuned, b, t = llama_pair
    with pytest.raises(ConfigError, match="exceeds min"):
        extract_adapter(b, t, 20, tmp_path / "ad", roles=("k",), progress=False)  # k is 16×32
    assert not (tmp_path / "ad").exists() and not list(tmp_path.glob(".ad*"))
    with pytest.raises(ConfigError, match="workers=0"):
        extract_adapter(b, t, 4, tmp_path / "ad", workers=0, progress=False)
    assert not (tmp_path / "ad").exists() and not list(tmp_path.glob(".ad*"))
    analysis = analyze(b, t, cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(energy=0.5, noise=False))
    data = plan.to_dict()
    data["modules"][0]["name"] = "model.layers.9.self_attn.q_proj"
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="absent from the base"):
        extract_adapter(b, t, tmp_path / "plan.json", tmp_path / "ad", progress=False)
    from safetensors.torch import save_file  # a TUNED that lacks a planned module: TUNED is named, not the base
    state = load_file(str(next(t.glob("*.safetensors"))))
    name = plan.modules[0].name
    del state[f"{name}.weight"]
    (tmp_path / "short").mkdir()
    (tmp_path / "short" / "config.json").write_text((t / "config.json").read_text())
    save_file(state, str(tmp_path / "short" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=f"the base holds but the tuned checkpoint .*short lacks: {re.escape(name)}"):
        extract_adapter(b, tmp_path / "short", plan, tmp_path / "ad", progress=False)
    assert not (tmp_path / "ad").exists()
    result = extract_adapter(b, tmp_path / "short", 2, tmp_path / "ad3", progress=False)  # --rank: left out, said
    assert f"1 tensor(s) only in BASE (TUNED lacks them: no ΔW to take), not in the adapter: {name}.weight" \
        in result.notes
    assert not any("only in BASE" in n for n in extract_adapter(b, t, 2, tmp_path / "ad4", progress=False).notes)
    from tests.models import random_adapter  # TUNED a PEFT adapter of q_proj alone, the plan of every module

    random_adapter(base, tmp_path / "peft", r=2, target_modules=["q_proj"])
    unadapted = next(m.name for m in plan.modules if not m.name.endswith("q_proj"))
    with pytest.raises(ConfigError, match=f"the adapter .*peft does not adapt .*{re.escape(unadapted)}"):
        extract_adapter(b, tmp_path / "peft", plan, tmp_path / "ad5", progress=False)
    assert not (tmp_path / "ad5").exists()
    other = save(perturbed(build_model("llama", seed=1)), tmp_path / "other", "safetensors")
    with pytest.raises(ConfigError, match="another base"):
        extract_adapter(other, t, plan, tmp_path / "ad", progress=False)
    (tmp_path / "ad").mkdir()
    with pytest.raises(ConfigError, match="exists"):
        extract_adapter(b, t, 4, tmp_path / "ad", progress=False)


def test_randomized_path_is_eckart_young_to_its_tolerance():
    """Above full_below the factors come from the converged block Krylov top-r: error = EY tail to ~1e-4."""
    from spectra.lora.extract import _factorize

    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(300, 60, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(500, 60, generator=g, dtype=torch.float64))[0]
    delta = ((u * 0.8 ** torch.arange(60, dtype=torch.float64)) @ v.T).float()  # decaying, like a fine-tune
    s = np.linalg.svd(delta.double().numpy(), compute_uv=False)
    optimum = np.sqrt((s[8:] ** 2).sum())
    A, B, (fro, error, tail, method) = _factorize(delta, 8, 2.0, full_below=0, seed=0)
    assert method == "krylov" and A.shape == (8, 500) and B.shape == (300, 8)
    assert error == pytest.approx(optimum, rel=1e-4) and tail == pytest.approx(optimum, rel=1e-4)
    assert error >= optimum * (1 - 1e-6)  # never better than Eckart–Young
    np.testing.assert_allclose(2.0 * (B.double() @ A.double()).numpy(), _best(delta, 8), atol=1e-4 * s[0])
    _, _, (_, worse, _, _) = _factorize(delta, 7, 2.0, full_below=0, seed=0)  # negative control: one rank less
    assert worse > 1.1 * optimum


def _best(delta, r):
    u, s, vt = np.linalg.svd(delta.double().numpy(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _best_rank(delta: np.ndarray, r: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(delta)
    return (u[:, :r] * s[:r]) @ vt[:r]


@pytest.mark.filterwarnings("ignore:The following (rank|alpha)_pattern keys:RuntimeWarning")  # PEFT maps experts itself
def test_fused_experts_get_their_rank_when_other_modules_outnumber_them(tmp_path):
    """PEFT converts per-expert keys into the fused parameter at the config's global r and α, whatever rank_pattern
    says: attention at rank 6 (8 modules) and expert down projections at rank 2 (6) must make r = 2 (before, r = 6
    and PEFT refused the adapter on a size mismatch). Merged weights = base + the best rank-r ΔW, per expert too."""
    import dataclasses

    base = build_model("mixtral")  # its experts and attention moved
    tuned = perturbed(base, seed=3, select=lambda name, p: p.ndim == 3 or "self_attn" in name)
    b, t = save(base, tmp_path / "b", "safetensors"), save(tuned, tmp_path / "t", "safetensors")
    analysis = analyze(b, t, cache_dir=False, progress=False)
    plan = recommend_ranks(analysis, RankPolicy(roles=("q", "k", "v", "o", "down"), uniform=True, noise=False))
    rank = {"down": 2, "q": 6, "k": 6, "v": 6, "o": 6}
    plan = dataclasses.replace(plan, modules=tuple(dataclasses.replace(m, rank=rank[m.role], alpha=2.0 * rank[m.role])
                                                   for m in plan.modules))
    result = extract_adapter(b, t, plan, tmp_path / "ad", progress=False)
    assert (result.config["r"], result.config["lora_alpha"]) == (2, 4.0)
    state = _load_without_missing_keys(base, tmp_path / "ad")
    W0, W1 = base.state_dict(), tuned.state_dict()
    for layer in (0, 1):
        key = f"model.layers.{layer}.mlp.experts.down_proj"
        for e in range(W0[key].shape[0]):
            d = (W1[key][e] - W0[key][e]).double().numpy()
            np.testing.assert_allclose(state[key][e].double().numpy() - W0[key][e].double().numpy(), _best_rank(d, 2),
                                       atol=2e-6)
        key = f"model.layers.{layer}.self_attn.q_proj.weight"
        d = (W1[key] - W0[key]).double().numpy()
        np.testing.assert_allclose(state[key].double().numpy() - W0[key].double().numpy(), _best_rank(d, 6), atol=2e-6)
    # experts of different projections at different ranks are no one global r for PEFT's conversion: extract writes
    # them onto the fused parameters itself, each at its own rank (it used to refuse the plan)
    rank = {"gate": 2, "up": 2, "down": 3}
    plan = recommend_ranks(analysis, RankPolicy(roles=("gate", "up", "down"), uniform=True, noise=False))
    plan = dataclasses.replace(plan, modules=tuple(dataclasses.replace(m, rank=rank[m.role], alpha=2.0 * rank[m.role])
                                                   for m in plan.modules))
    result = extract_adapter(b, t, plan, tmp_path / "ad2", progress=False)
    assert sorted(result.config["target_parameters"]) == [f"model.layers.{layer}.mlp.experts.{p}" for layer in (0, 1)
                                                          for p in ("down_proj", "gate_up_proj")]
    state = _load_without_missing_keys(base, tmp_path / "ad2")
    for layer in (0, 1):
        key = f"model.layers.{layer}.mlp.experts.down_proj"
        for e in range(W0[key].shape[0]):
            d = (W1[key][e] - W0[key][e]).double().numpy()
            np.testing.assert_allclose(state[key][e].double().numpy() - W0[key][e].double().numpy(), _best_rank(d, 3),
                                       atol=2e-6)


def test_an_adapter_from_weights_files_records_their_model_folder_as_its_base(llama_pair, tmp_path):
    """From `base/model.safetensors` the adapter recorded that file as base_model_name_or_path, which
    AutoPeftModelForCausalLM read as a malformed hub id; the folder holding config.json is what loads."""
    _, _, b, t = llama_pair
    weights = next(b.glob("*.safetensors"))
    extract_adapter(weights, next(t.glob("*.safetensors")), 2, tmp_path / "ad", progress=False)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(b)
    lone = tmp_path / "lone"  # negative control: a file with no config.json beside it is recorded as it was given
    lone.mkdir()
    (lone / "model.safetensors").write_bytes(weights.read_bytes())
    extract_adapter(lone / "model.safetensors", t, 2, tmp_path / "ad2", roles=("q",), progress=False)
    recorded = json.loads((tmp_path / "ad2" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(lone / "model.safetensors")
    # a folder whose from_pretrained loads other weights (TUNED's model.safetensors beside base.safetensors) is not
    # recorded: AutoPeftModel would have applied the update on top of the fine-tune
    import shutil

    same = tmp_path / "same"
    shutil.copytree(t, same)
    shutil.copy(weights, same / "base.safetensors")
    extract_adapter(same / "base.safetensors", same / "model.safetensors", 2, tmp_path / "ad3", roles=("q",),
                    progress=False)
    recorded = json.loads((tmp_path / "ad3" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(same / "base.safetensors")
