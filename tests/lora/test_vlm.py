"""Vision-language models with no causal-LM class (Qwen2-VL, Qwen3-VL, Qwen3-VL-MoE, LLaVA) trained, verified and
calibrated on text.

transformers 5 gives these models an image-text-to-text class only, and ``load_model`` refused them. They now load
through it and run on text batches (no ``pixel_values``). The reference is independent of that class: the family's
plain causal LM (Qwen2, Qwen3, Qwen3-MoE, Llama) built from the text config and given the language model's and
head's weights, run on each example alone in float64. spectra's numbers come from padded float32 batches of the
VLM class: 1e-5 relative on losses, as for the seq2seq models.

What was wrong beside the refusal: by default LoRA wrapped the vision tower's linears, which text never reaches
(their adapters stay at zero); verify's truncated-SVD model and the calibration hooks matched Qwen2-VL's hub names
(``model.layers.N…``) against the loaded ``model.language_model.layers.N…`` and found nothing, so verify left the
SVD model out and the calibration held the head's moments only.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from spectra.cli import app
from spectra.errors import ConfigError
from spectra.lora.data import prepare_data
from spectra.lora.train import (
    TrainConfig,
    evaluate,
    load_model,
    loads_as_image_text_to_text,
    quiet_peft,
    train_adapter,
)
from tests.checkpoints.test_qwen_vl import tiny
from tests.lora.conftest import random_text
from tests.models import add_to_parameter, build_model, low_rank, on_grid, save

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
LOSS_REL = 1e-5  # float32 batches vs the float64 reference, per-token cross-entropy ~4
FAMILIES = ("qwen2_vl", "qwen3_vl_moe")  # trained, verified, swept: hub names (Qwen2-VL), experts (Qwen3-VL-MoE)
TEXT_Q, VISION_QKV = "model.language_model.layers.0.self_attn.q_proj", "model.visual.blocks.0.attn.qkv"
NOTE = "loaded as image-text-to-text (transformers has no causal-LM class for it); text-only batches"
BLOCK_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_vlm(family: str):
    """A tiny VLM of `family` on the 2⁻¹² grid: test_qwen_vl's Qwen models, or a LLaVA (a 2-layer CLIP tower of
    width 16, a 2-layer Llama of width 32)."""
    import transformers as tf

    if family != "llava":
        return tiny(family)
    text = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                                 image_size=28, patch_size=14, projection_dim=16)
    return on_grid(tf.LlavaForConditionalGeneration, tf.LlavaConfig(vision_config=vision, text_config=text,
                                                                     image_token_id=63))


def text_lm(vlm):
    """The family's plain causal LM holding `vlm`'s language model and head, float64, eval mode (the reference)."""
    import transformers as tf

    text = vlm.config.text_config
    common = dict(hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
                  num_hidden_layers=text.num_hidden_layers, num_attention_heads=text.num_attention_heads,
                  num_key_value_heads=text.num_key_value_heads, vocab_size=text.vocab_size,
                  rms_norm_eps=text.rms_norm_eps, tie_word_embeddings=False, attn_implementation="eager",
                  rope_parameters=dict(rope_type="default", rope_theta=text.rope_parameters["rope_theta"]))
    model_type = vlm.config.model_type
    if model_type == "qwen2_vl":
        lm = tf.Qwen2ForCausalLM(tf.Qwen2Config(**common))
    elif model_type == "qwen3_vl":
        lm = tf.Qwen3ForCausalLM(tf.Qwen3Config(**common, head_dim=text.head_dim))
    elif model_type == "qwen3_vl_moe":  # eager experts: grouped_mm takes no float64
        lm = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
            **common, head_dim=text.head_dim, moe_intermediate_size=text.moe_intermediate_size,
            num_experts=text.num_experts, num_experts_per_tok=text.num_experts_per_tok, norm_topk_prob=True,
            experts_implementation="eager"))
    else:
        lm = tf.LlamaForCausalLM(tf.LlamaConfig(**common))
    state = {"model." + k.removeprefix("model.language_model."): v for k, v in vlm.state_dict().items()
             if k.startswith("model.language_model.")}
    lm.load_state_dict(state | {"lm_head.weight": vlm.state_dict()["lm_head.weight"]}, strict=True)
    return lm.double().eval()


def reference_loss(lm, data, index=None) -> tuple[float, int]:
    """Σ −log p(next token) over the examples `index` of `data`, each run alone through `lm`, and the token count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(data)) if index is None else index:
            ids = torch.tensor([data.ids[i]])  # (1, T)
            log_p = torch.log_softmax(lm(input_ids=ids).logits[0, :-1], -1)  # (T-1, V): position t predicts t+1
            total -= float(log_p.gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    return total, count


def language_linears(model) -> list[str]:
    """The language model's q, k, v, o, gate, up, down Linears (a router, mlp.gate, is none), by the model's names."""
    return sorted(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                  and n.startswith("model.language_model.") and n.rpartition(".")[2] in BLOCK_NAMES)


def planted_fine_tune(base):
    """The base with a rank-4 update on the language model's layer-0 q and a rank-2 one on the tower's qkv."""
    tuned = copy.deepcopy(base)
    params = dict(tuned.named_parameters())
    for seed, (name, rank) in enumerate(((TEXT_Q, 4), (VISION_QKV, 2))):
        add_to_parameter(tuned, f"{name}.weight", 64 * low_rank(*params[f"{name}.weight"].shape, rank, seed=seed + 1))
    return tuned


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    """(family, base, tuned, train data, eval data): a planted fine-tune, both saved by save_pretrained (Qwen2-VL with
    the hub's names: model.layers.N…, visual.…)."""
    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_vlm(request.param)
    base, tuned = save(model, folder / "base", "safetensors"), save(planted_fine_tune(model), folder / "tuned",
                                                                     "safetensors")
    data = random_text(folder / "train.txt", chars=16 * 8 * 4, seed=2)
    held = random_text(folder / "eval.txt", chars=16 * 6, seed=5)
    return request.param, base, tuned, data, held


def _loaded(spec):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(str(spec), dtype=torch.float32)


# ---------------------------------------------------------------------------- loading


def test_only_a_model_type_without_a_causal_lm_class_loads_as_image_text_to_text():
    for model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl_moe", "llava", "mistral3", "idefics3", "paligemma"):
        assert loads_as_image_text_to_text({"model_type": model_type}), model_type
    # a causal LM; Gemma 3 and Qwen3.5, whose causal-LM class is their multimodal one; a vision model; a VLM that is
    # an encoder-decoder (Florence-2: its text model reads the image's features through cross-attention)
    for config in ({"model_type": "llama"}, {"model_type": "gemma3"}, {"model_type": "qwen3_5"}, {"model_type": "vit"},
                   {"model_type": "florence2", "is_encoder_decoder": True}):
        assert not loads_as_image_text_to_text(config), config


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl", "qwen3_vl_moe", "llava"])
def test_text_loss_is_the_plain_language_models_and_the_tower_is_not_run(family, tmp_path):
    """The VLM class's loss on padded text batches is the plain causal LM's, each example alone in float64; the image
    placeholder's id (Qwen's 60, byte 'z') is in the text and changes nothing. Changing the vision tower changes no
    loss (not run); changing a language weight does (the negative control)."""
    model = tiny_vlm(family)
    folder = save(model, tmp_path / "m", "safetensors")
    _, data, _, _, _ = prepare_data(folder, random_text(tmp_path / "t.txt", chars=16 * 6, seed=5), max_length=16)
    notes: list[str] = []
    loaded = load_model(folder, task="causal_lm", notes=notes)
    assert type(loaded).__name__.endswith("ForConditionalGeneration") and len(notes) == 1 and NOTE in notes[0]
    assert f"model_type {family} " in notes[0]
    spectra = evaluate(loaded, data, batch_size=4)
    total, count = reference_loss(text_lm(model), data)
    assert spectra["tokens"] == count and spectra["loss"] == pytest.approx(total / count, rel=LOSS_REL)
    tower = next(p for n, p in loaded.named_parameters() if ".visual." in n or ".vision_tower." in n)
    with torch.no_grad():
        tower.add_(1.0)
        assert evaluate(loaded, data, batch_size=4)["loss"] == spectra["loss"]
        loaded.get_submodule("model.language_model.layers.0.self_attn.o_proj").weight.add_(1.0)
    assert evaluate(loaded, data, batch_size=4)["loss"] != pytest.approx(spectra["loss"], rel=1e-4)


def test_a_causal_lm_still_loads_as_one_without_a_note(llama_base):
    notes: list[str] = []
    assert type(load_model(llama_base, task="causal_lm", notes=notes)).__name__ == "LlamaForCausalLM" and not notes


def test_a_model_of_neither_class_is_refused_in_one_paragraph(tmp_path):
    import transformers as tf

    config = tf.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                          image_size=28, patch_size=14)
    vit = save(on_grid(tf.ViTModel, config), tmp_path / "vit", "safetensors")
    with pytest.raises(ConfigError) as err:
        load_model(vit, task="causal_lm")
    message = str(err.value)
    assert "no causal language model class (nor a decoder-only image-text-to-text one) for its model_type 'vit'" \
        in message and "\n" not in message and "LlamaConfig" not in message


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(vlm, tmp_path_factory):
    """LoRA and DoRA adapters of rank 2 on the default targets, trained two epochs on text, evaluated on held data."""
    family, base, _, data, held = vlm
    out = {}
    for method in ("lora", "dora"):
        config = TrainConfig(method=method, rank=2, batch_size=8, epochs=2, lr=1e-2, max_length=16, seed=1)
        folder = tmp_path_factory.mktemp(f"{family}-{method}") / "ad"
        out[method] = train_adapter(base, data, config, folder, eval_data=held, progress=False)
    return out


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_adapter_loads_in_peft_on_the_vlm_and_its_merge_gives_the_reported_eval_loss(vlm, trained, method):
    """The adapter spectra trained loads in PEFT onto the VLM class; merged, the plain LM holding its weights gives the
    eval loss spectra reported (float64, each example alone), which is not the base's (the adapter trained)."""
    from peft import PeftModel

    family, base, _, _, held = vlm
    result = trained[method]
    with quiet_peft():
        merged = PeftModel.from_pretrained(_loaded(base), str(result.out_dir)).merge_and_unload()
    _, data, _, _, _ = prepare_data(base, held, max_length=16)
    total, count = reference_loss(text_lm(merged), data)
    assert result.final_eval["tokens"] == count
    assert result.final_eval["loss"] == pytest.approx(total / count, rel=LOSS_REL), (family, method)
    base_total, _ = reference_loss(text_lm(_loaded(base)), data)
    assert result.final_eval["loss"] != pytest.approx(base_total / count, rel=1e-3)  # negative control
    summary = json.loads((result.out_dir / "spectra_train.json").read_text())
    assert any(NOTE in n for n in summary["notes"]) and summary["task"] == "causal_lm"


def test_default_targets_are_the_language_models_block_linears_and_the_note_says_why(vlm, trained):
    family, base, _, _, _ = vlm
    model = _loaded(base)
    expected = language_linears(model)
    tower = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".visual." in n]
    assert expected and tower
    for result in trained.values():
        adapter = json.loads((result.out_dir / "adapter_config.json").read_text())
        assert sorted(adapter["target_modules"]) == expected, family
        left_out = [n for n in result.notes if "left out" in n]
        assert len(left_out) == 1 and f"the {len(expected)} module(s) of every block role" in left_out[0]
        assert "vision stack" in left_out[0] and "--stacks" in left_out[0]


def test_stacks_select_the_targets_and_name_what_text_cannot_train():
    """stacks=None: the language model's; stacks naming the tower take its modules too (a note says they will not
    train); a stack the model lacks is noted, none held refused; with role qkv, which only the tower's attn.qkv has,
    the default finds nothing text reaches and says how to adapt it anyway."""
    from spectra.lora.train import target_modules

    model = tiny_vlm("qwen2_vl")
    text = [f"model.language_model.layers.{i}.self_attn.q_proj" for i in (0, 1)]
    tower = [f"model.visual.blocks.{i}.attn.qkv" for i in (0, 1)]  # role qkv: q selects its rows
    notes: list[str] = []
    assert target_modules(model, ("q",), notes=notes) == text and "left out" in notes[0]
    for stacks, expected in ((("language",), text), (("vision",), tower), (("language", "vision"), tower + text)):
        notes = []
        assert target_modules(model, ("q",), stacks=stacks, notes=notes) == expected, stacks
        assert (notes == []) == (stacks == ("language",))
        assert all("the vision stack(s) get no gradient from text-only batches" in n for n in notes)
    notes = []
    assert target_modules(model, ("q",), stacks=("vision", "audio"), notes=notes) == tower
    assert "the model has no audio stack" in notes[0]
    with pytest.raises(ConfigError, match=r"stacks \(--stacks\) audio: the model has no module of that stack"):
        target_modules(model, ("q",), stacks=("audio",))
    with pytest.raises(ConfigError, match=r"that text reaches \(only 2 in its vision stack\); name the stack"):
        target_modules(model, ("qkv",))
    gemma = build_model("gemma3_multimodal")  # a VLM whose causal-LM class is its multimodal one: the same rule
    every = [n for n, m in gemma.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("q_proj")]
    assert any("vision_tower" in n for n in every)
    assert target_modules(gemma, ("q",)) == [n for n in every if "vision_tower" not in n]


def test_a_plan_with_tower_modules_is_noted(tmp_path):
    """A plan recommended from a VLM's analysis may hold its tower's modules (by the hub's names): trained on text,
    the note says their adapters stay at zero; a plan of the language model alone gets no such note."""
    from spectra.lora.train import lora_config
    from spectra.ranks import RankPolicy, recommend_ranks, save_plan
    from tests.ranks.rows import analysis, make_row

    model = tiny_vlm("qwen2_vl")
    text = make_row("model.layers.0.self_attn.q_proj", [1.0] * 3 + [0.0] * 8, shape=(32, 32), role="q", layer=0)
    tower = make_row("visual.blocks.0.attn.qkv", [1.0] * 2 + [0.0] * 8, shape=(48, 16), role="qkv", layer=0)
    for rows, noted in (((text, tower), True), ((text,), False)):
        path = save_plan(recommend_ranks(analysis(*rows), RankPolicy(energy=0.99)), tmp_path / f"{noted}.json")
        notes: list[str] = []
        lora_config(model, TrainConfig(plan=str(path)), task="causal_lm", notes=notes)
        assert len(notes) == int(noted)
        assert not noted or "1 module(s) of the vision stack(s) (e.g. visual.blocks.0.attn.qkv, vision)" in notes[0]


def test_stacks_are_parsed_and_refused_where_ignored():
    assert TrainConfig(stacks="decoder, vision").stacks == ("language", "vision")  # the reports' name for it
    with pytest.raises(ConfigError, match=r"stacks \(--stacks\): unknown stack\(s\) eye"):
        TrainConfig(stacks="eye")
    with pytest.raises(ConfigError, match="target_modules names the modules to adapt, so stacks would be ignored"):
        TrainConfig(stacks="vision", target_modules=("a",))
    with pytest.raises(ConfigError, match=r"method full \(--full\) trains every weight, so --stacks would be"):
        TrainConfig(stacks="vision", method="full")
    with pytest.raises(ConfigError, match=r"plan \(--plan\) sets every module's rank, α and target, so --stacks"):
        TrainConfig(stacks="vision", plan="plan.json")


@pytest.mark.parametrize("how", ["stacks", "target_modules"])
def test_a_tower_module_chosen_by_stack_or_name_is_adapted_and_gets_no_gradient(vlm, tmp_path, how):
    """Why the default leaves the tower out: chosen by --stacks or named in target_modules, its LoRA is trained (its
    B and A in the adapter) and stays exactly where it started, B = 0, while the language model's q moved."""
    from safetensors.torch import load_file

    family, base, _, data, _ = vlm
    chosen = (dict(stacks=("language", "vision"), roles=("q",)) if how == "stacks"
              else dict(target_modules=(VISION_QKV, TEXT_Q)))
    config = TrainConfig(**chosen, rank=2, max_steps=3, batch_size=8, lr=1e-2, max_length=16, eval_fraction=0.0)
    result = train_adapter(base, data, config, tmp_path / "ad", progress=False)
    assert not any("left out" in n for n in result.notes)  # chosen modules are taken as chosen
    assert any("get no gradient" in n for n in result.notes) == (how == "stacks")
    tensors = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    b = {name: t for name, t in tensors.items() if "lora_B" in name}
    tower_b = [t for name, t in b.items() if ".visual." in name]
    text_b = [t for name, t in b.items() if ".language_model." in name]
    assert len(tower_b) == (2 if how == "stacks" else 1) and len(text_b) == len(tower_b)  # stacks: both layers' q
    assert all(torch.count_nonzero(t) == 0 for t in tower_b) and all(torch.count_nonzero(t) > 0 for t in text_b)


def test_distillation_from_a_vlm_fine_tune_is_the_token_mean_kl_of_the_plain_language_models(vlm, tmp_path):
    """With the full fine-tune (a VLM too) as teacher, step 1's loss is the mean over the first batch's tokens of
    KL(teacher ‖ base) (the adapter starts at zero), the plain LMs run on each example alone in float64."""
    from spectra.lora.data import batch_indices

    family, base, tuned, data_file, _ = vlm
    config = TrainConfig(rank=2, batch_size=8, max_steps=1, eval_fraction=0.0, seed=5, teacher=str(tuned),
                         max_length=16)
    result = train_adapter(base, data_file, config, tmp_path / "ad", progress=False)
    _, data, _, _, _ = prepare_data(base, data_file, max_length=16)
    student, teacher = text_lm(_loaded(base)), text_lm(_loaded(tuned))
    total, count = 0.0, 0
    with torch.no_grad():
        for i in batch_indices(data, 8, generator=torch.Generator().manual_seed(5))[0]:
            ids = torch.tensor([data.ids[i]])
            log_p, log_q = (torch.log_softmax(m(input_ids=ids).logits[0], -1) for m in (student, teacher))  # (T, V)
            total += float((log_q.exp() * (log_q - log_p)).sum())
            count += ids.shape[1]
    assert total > 0 and result.losses[0] == pytest.approx(total / count, rel=1e-4), family  # KL ~1e-4


def test_qlora_of_a_vlm_is_the_dequantised_language_model_plus_its_adapter(tmp_path):
    """QLoRA loads the VLM class in 4 bits as a causal LM is loaded (bitsandbytes needs 64 input features: a Qwen2-VL
    of width 64 here). Its eval loss is the plain Qwen2 LM's holding bitsandbytes' own dequantised NF4 weights plus
    s·B A of the saved adapter, in float64; the negative control, the full-precision weights plus the adapter, is
    another loss."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import transformers as tf
    from safetensors.torch import load_file

    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 4])
    text = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=64, rope_parameters=rope)
    vision = dict(depth=1, num_heads=2, patch_size=2, spatial_merge_size=2, temporal_patch_size=1, embed_dim=64,
                  hidden_size=64, mlp_ratio=1)
    model = on_grid(tf.Qwen2VLForConditionalGeneration, tf.Qwen2VLConfig(
        text_config=text, vision_config=vision, image_token_id=60, video_token_id=61, vision_start_token_id=62))
    base = save(model, tmp_path / "base", "safetensors")
    data, held = (random_text(tmp_path / f"{n}.txt", chars=16 * k, seed=k) for n, k in (("t", 24), ("e", 6)))
    config = TrainConfig(method="qlora", rank=2, max_steps=3, batch_size=8, lr=1e-2, max_length=16)
    result = train_adapter(base, data, config, tmp_path / "ad", eval_data=held, progress=False)
    assert any(NOTE in n for n in result.notes)
    quantized = load_model(base, task="causal_lm", quantize=True)
    adapter = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    scale = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["lora_alpha"] / 2
    _, eval_data, _, _, _ = prepare_data(base, held, max_length=16)
    losses = []
    for dequantised in (True, False):
        reference = copy.deepcopy(model)
        n = 0
        with torch.no_grad():
            for name, layer in quantized.named_modules():
                if not isinstance(layer, bnb.nn.Linear4bit) or ".language_model." not in name:
                    continue
                weight = reference.get_submodule(name).weight
                if dequantised:
                    weight.copy_(bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state))
                A, B = (adapter[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
                weight += scale * (B.double() @ A.double()).float()
                n += 1
        assert n == len(language_linears(model)) == 14
        total, count = reference_loss(text_lm(reference), eval_data)
        losses.append(total / count)
    assert result.final_eval["loss"] == pytest.approx(losses[0], rel=LOSS_REL)
    assert losses[1] != pytest.approx(losses[0], rel=1e-4)  # negative control: the 4-bit rounding is measured


# ---------------------------------------------------------------------------- verify


def _svd_reference(base_spec, tuned_spec, modules: list[str], rank: int):
    """The base VLM with each of `modules` (the model's names) set to W_base + the rank-`rank` SVD truncation of
    ΔW = W_tuned − W_base, in float64."""
    base, tuned = _loaded(base_spec).double(), _loaded(tuned_spec).double()
    params, tuned_params = dict(base.named_parameters()), dict(tuned.named_parameters())
    with torch.no_grad():
        for name in modules:
            W = params[f"{name}.weight"]
            u, s, vh = torch.linalg.svd(tuned_params[f"{name}.weight"] - W, full_matrices=False)
            W += (u[:, :rank] * s[:rank]) @ vh[:rank]
    return base


def test_verify_evaluates_the_adapter_the_fine_tune_and_the_truncated_svd_model(vlm, trained):
    """Every model verify evaluates is the float64 reference's: the PEFT merge, the fine-tune, and base + the rank-2
    truncation of ΔW in the adapted modules (only q changed: rank 4, so rank 2 is neither end). For Qwen2-VL's hub
    names the SVD model was left out ("match no parameter of the loaded Qwen2VLForConditionalGeneration")."""
    from peft import PeftModel

    from spectra.lora.verify import VerifyConfig, verify_adapter

    family, base, tuned, _, held = vlm
    adapter = trained["lora"].out_dir
    verified = verify_adapter(base, tuned, adapter, eval_data=held, config=VerifyConfig(max_length=16),
                              progress=False)
    assert set(verified.evals) == {"base", "tuned", "adapter", "svd"}, verified.notes
    assert sum(NOTE in n for n in verified.notes) == 1
    _, data, _, _, _ = prepare_data(base, held, max_length=16)
    with quiet_peft():
        merged = PeftModel.from_pretrained(_loaded(base), str(adapter)).merge_and_unload()
    modules = language_linears(_loaded(base))
    references = {"base": _loaded(base), "tuned": _loaded(tuned), "adapter": merged,
                  "svd": _svd_reference(base, tuned, modules, rank=2)}
    losses = {}
    for name, model in references.items():
        total, count = reference_loss(text_lm(model), data)
        losses[name] = total / count
        assert verified.evals[name]["loss"] == pytest.approx(losses[name], rel=LOSS_REL), (family, name)
    assert len({round(v, 6) for v in losses.values()}) == 4  # four different models
    rows = {r["name"] for r in verified.modules}
    # the default roles adapt an MoE's fused experts too (target_parameters): verify reports each expert's projection
    experts = {f"{n.rpartition('.')[0]}.{e}.{n.rpartition('.')[2]}" for n, p in _loaded(base).named_parameters()
               if p.dim() == 3 and ".experts." in n for e in range(p.shape[0])}
    assert bool(experts) == (family == "qwen3_vl_moe")
    assert len(rows) == len(modules) + len(experts) and experts <= rows and not any("visual" in n for n in rows)


# ---------------------------------------------------------------------------- calibration


def test_calibration_hooks_every_language_linear_under_the_checkpoints_names(vlm):
    """C = Σ x xᵀ / N of each language-model Linear's inputs, under the checkpoint's name (Qwen2-VL's hub
    model.layers.N…), is the plain LM's, hooked on each example alone in float64; the tower has no moments (text never
    reaches it). Qwen2-VL's calibration had held the head's moments only."""
    from safetensors import safe_open

    from spectra.calibration import CalibrationConfig, collect_calibration

    family, base, _, _, held = vlm
    calibration = collect_calibration(base, held, config=CalibrationConfig(batch_size=4, max_length=16))
    assert any(NOTE in n for n in calibration.notes)
    with safe_open(base / "model.safetensors", "pt") as fh:
        names = list(fh.keys())  # as stored
    hub = family == "qwen2_vl"
    prefix = "model." if hub else "model.language_model."
    model = _loaded(base)
    lm = text_lm(model)
    modules = [n.removeprefix("model.language_model.") for n in language_linears(model)]  # layers.0.self_attn.q_proj
    assert all(f"{prefix}{m}.weight" in names for m in modules)
    _, data, _, _, _ = prepare_data(base, held, max_length=16)
    inputs = {m: [] for m in modules}
    hooks = [lm.get_submodule(f"model.{m}").register_forward_pre_hook(lambda _, a, m=m: inputs[m].append(a[0][0]))
             for m in modules]
    with torch.no_grad():
        for ids in data.ids:
            lm(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    for m in modules:
        X = torch.cat(inputs[m])  # (N, in) float64
        reference = X.T @ X / X.shape[0]
        C = calibration.covariance(f"{prefix}{m}.weight")
        assert C is not None and calibration.tokens(f"{prefix}{m}.weight") == X.shape[0], (family, m)
        assert torch.allclose(C.double(), reference, rtol=1e-5, atol=1e-6 * float(reference.abs().max())), m
    tower = [n for n in names if ("visual." in n) and n.endswith("attn.qkv.weight")]
    assert tower and all(calibration.covariance(n) is None for n in tower)


# ---------------------------------------------------------------------------- command line


def test_cli_trains_verifies_and_sweeps_a_vlm_saying_it_reads_text_only(vlm, tmp_path):
    family, base, tuned, data, held = vlm
    if family != "qwen2_vl":
        pytest.skip("one family is enough for the command line")
    runner = CliRunner()
    out = runner.invoke(app, ["train", str(base), "--data", str(data), "--rank", "2", "--max-steps", "2",
                              "--max-length", "16", "-o", str(tmp_path / "ad")], terminal_width=400)
    assert out.exit_code == 0, out.output
    assert "loaded as image-text-to-text" in out.output and "left out" in out.output
    out = runner.invoke(app, ["verify", str(base), str(tuned), "--adapter", str(tmp_path / "ad"), "--eval-data",
                              str(held), "-o", str(tmp_path / "v")], terminal_width=400)
    assert out.exit_code == 0, out.output
    evals = json.loads((tmp_path / "v" / "verify.json").read_text())["evals"]
    assert set(evals) == {"base", "tuned", "adapter", "svd"}
    out = runner.invoke(app, ["sweep", str(base), str(tuned), "--data", str(held), "--ranks", "1,2", "--bootstrap",
                              "0", "--max-length", "16", "-o", str(tmp_path / "s")], terminal_width=400)
    assert out.exit_code == 0, out.output
    notes = json.loads((tmp_path / "s" / "sweep.json").read_text())["notes"]
    assert any(NOTE in n for n in notes)
