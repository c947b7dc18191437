"""Encoder–decoder models (T5, Flan-T5's gated T5 v1.1, BART): every Linear gets its role, layer and stack.

T5 names its projections ``SelfAttention.q``, ``EncDecAttention.q`` and ``DenseReluDense.wi``/``wo`` (gated:
``wi_0``, ``wi_1``), BART ``self_attn.q_proj``, ``encoder_attn.q_proj`` and ``fc1``/``fc2``. Cross-attention
(``EncDecAttention``, ``encoder_attn``) has roles of its own, ``xq xk xv xo``: a decoder layer's self- and
cross-attention q are two modules with other inputs, and must not share a cell of the report. The models are
built from config, their own submodules (``model.encoder.block[i]``…) are the reference for layers and stacks,
and PEFT's own loading and merge the referee for the adapter.
"""

from __future__ import annotations


import pytest
import torch

from spectra.analysis import analyze
from spectra.checkpoints.architectures import module_info, role_selected
from spectra.checkpoints.pairing import Pairing, PairingOptions
from spectra.lora.extract import extract_adapter
from spectra.report.tables import layer_role_grids, matrix_rows, summary_rows
from tests.lora.test_extract import merged_state
from tests.models import build_model, planted_models, save
from tests.cli.test_cli import run

# A Linear's role by its path inside one block (the segments after block.N. / layers.N.), for T5 and BART.
T5_ROLES = {"SelfAttention.q": "q", "SelfAttention.k": "k", "SelfAttention.v": "v", "SelfAttention.o": "o",
            "EncDecAttention.q": "xq", "EncDecAttention.k": "xk", "EncDecAttention.v": "xv", "EncDecAttention.o": "xo",
            "DenseReluDense.wi": "up", "DenseReluDense.wi_0": "gate", "DenseReluDense.wi_1": "up",
            "DenseReluDense.wo": "down"}
BART_ROLES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.out_proj": "o",
              "encoder_attn.q_proj": "xq", "encoder_attn.k_proj": "xk", "encoder_attn.v_proj": "xv",
              "encoder_attn.out_proj": "xo", "fc1": "up", "fc2": "down"}
# The decoder's layer-0 self-attention q and cross-attention q, as each checkpoint names them.
SELF_Q = {"t5": "decoder.block.0.layer.0.SelfAttention.q", "bart": "model.decoder.layers.0.self_attn.q_proj"}
CROSS_Q = {"t5": "decoder.block.0.layer.1.EncDecAttention.q", "bart": "model.decoder.layers.0.encoder_attn.q_proj"}


def _expected_linears(model) -> dict[str, tuple[str, int | None, str | None]]:
    """Every Linear of the model → (role, layer, stack), read off its submodules: the block that holds it and
    whether that block is the encoder's."""
    inner = getattr(model, "model", model)  # BART: model.encoder; T5: encoder
    prefix = "model." if inner is not model else ""
    roles = T5_ROLES if hasattr(inner.encoder, "block") else BART_ROLES
    out = {}
    for stack_name, stack in (("encoder", "encoder"), ("decoder", None)):
        blocks = getattr(getattr(inner, stack_name), "block", None) or getattr(inner, stack_name).layers
        attribute = "block" if hasattr(getattr(inner, stack_name), "block") else "layers"
        for i, block in enumerate(blocks):
            for path, module in block.named_modules():
                if isinstance(module, torch.nn.Linear):
                    inside = path.split(".", 2)[2] if roles is T5_ROLES else path  # T5: drop layer.N.
                    out[f"{prefix}{stack_name}.{attribute}.{i}.{path}"] = (roles[inside], i, stack)
    out["lm_head"] = ("head", None, None)
    return out


@pytest.mark.parametrize("family", ["t5", "t5_gated", "bart"])
def test_every_linear_gets_its_role_layer_and_stack(family):
    """All of T5's were role other (its report one 'other' row); BART's fc1/fc2 other, and its encoder_attn q."""
    model = build_model(family)
    config = model.config.to_dict()
    expected = _expected_linears(model)
    linears = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(linears) == sorted(expected)  # the reference covers every Linear
    for name in linears:
        info = module_info(name, config)
        assert (info.role, info.layer, info.stack) == expected[name], name
    roles = {expected[n][0] for n in linears}
    assert {"xq", "xk", "xv", "xo", "up", "down"} <= roles and ("gate" in roles) == (family == "t5_gated")
    shared = "shared" if family.startswith("t5") else "model.shared"  # the token embedding both stacks read
    assert module_info(shared, config).role == "embed"


def _planted_pair(root, family: str, planted: dict[str, int]):
    """A base and a tuned checkpoint differing by rank-r updates of the named modules with equal singular values
    (every energy rank r): (base, tuned, their folders)."""
    base, tuned = planted_models(family, {module + ".weight": rank for module, rank in planted.items()}, seed=60)
    return base, tuned, save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_self_and_cross_attention_q_of_one_layer_are_two_report_groups(family, tmp_path):
    """Ranks 1 and 3 in one decoder layer's self- and cross-attention q come back as 1 and 3, not as one group
    whose median is 2 (BART: both were role q; T5: both other)."""
    planted = {SELF_Q[family]: 1, CROSS_Q[family]: 3}
    _, _, b, t = _planted_pair(tmp_path, family, planted)
    rows = {d.name: d for d in Pairing(b, t, PairingOptions(load=False))}
    assert [(rows[n].role, rows[n].layer, rows[n].stack) for n in planted] == [("q", 0, None), ("xq", 0, None)]
    analysis = analyze(b, t, cache_dir=False, progress=False).to_dict()
    groups = {(e["stack"], e["role"]): e for e in summary_rows(analysis)}
    assert set(groups) == {(None, "q"), (None, "xq")}  # the only changed modules, each its own group
    for role, rank in (("q", 1), ("xq", 3)):
        assert (groups[None, role]["modules"], groups[None, role]["energy_rank_0.9"]["median"]) == (1, rank)
    assert [e["label"] for e in summary_rows(analysis)] == ["q", "xq"]  # block order: self-, then cross-attention
    grids = {g.stack: g for g in layer_role_grids(matrix_rows(analysis), lambda r: r["energy_rank"]["0.9"])}
    decoder = grids[None]  # the heatmap's decoder panel (the encoder has a panel of its own)
    cell = {role: decoder.values[decoder.layers.index(0)][j] for j, role in enumerate(decoder.roles)}
    assert (cell["q"], cell["xq"]) == (1, 3)


# T5 v1.1 (Flan-T5): updates in both stacks, in self- and cross-attention and in the gated MLP (rank ≤ 2 each)
T5_PLANTED = {"decoder.block.1.layer.0.SelfAttention.q": 2, "decoder.block.1.layer.1.EncDecAttention.q": 1,
              "decoder.block.0.layer.1.EncDecAttention.v": 2, "encoder.block.0.layer.0.SelfAttention.q": 1,
              "encoder.block.0.layer.1.DenseReluDense.wi_0": 2, "decoder.block.0.layer.2.DenseReluDense.wo": 1,
              "decoder.block.0.layer.1.EncDecAttention.k": 2}  # a changed module no role below takes


@pytest.fixture(scope="module")
def flan_t5_pair(tmp_path_factory):
    return _planted_pair(tmp_path_factory.mktemp("t5-gated"), "t5_gated", T5_PLANTED)


def _check_merge(base, tuned, adapter_dir, adapted: set[str]):
    """PEFT loads the adapter on T5ForConditionalGeneration; its merge is the tuned weight on `adapted`, the base's
    on every other module."""
    state, model = merged_state(base, adapter_dir)
    assert type(model).__name__ == "PeftModelForSeq2SeqLM"
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    for module in T5_PLANTED:
        expected = tuned_state if module in adapted else base_state
        torch.testing.assert_close(state[module + ".weight"], expected[module + ".weight"], rtol=0, atol=1e-6,
                                   msg=module)


def test_extract_by_roles_gives_a_peft_adapter_that_merges_to_the_planted_update(flan_t5_pair, tmp_path):
    """--roles q takes self- and cross-attention's q (as PEFT's target_modules=["q"] does on T5), xv only the
    cross-attention's v, gate and down the gated MLP's wi_0 and wo; a rank-2 adapter is exact on rank ≤ 2 updates."""
    base, tuned, b, t = flan_t5_pair
    result = extract_adapter(b, t, 2, tmp_path / "ad", roles=("q", "xv", "gate", "down"), progress=False)
    names = {m.name for m in result.modules} | set(result.unchanged)  # unchanged ones: selected, left out of the file
    assert len(names) == 4 + 2 + 2 + 4 + 4  # per layer of 2: q in both stacks, xq and xv in the decoder, wi_0, wo
    assert {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in names} == {
        "SelfAttention.q", "EncDecAttention.q", "EncDecAttention.v", "DenseReluDense.wi_0", "DenseReluDense.wo"}
    assert result.config["task_type"] == "SEQ_2_SEQ_LM"
    _check_merge(base, tuned, tmp_path / "ad", set(T5_PLANTED) - {"decoder.block.0.layer.1.EncDecAttention.k"})


def test_cli_extract_roles_xq_takes_cross_attention_only(flan_t5_pair, tmp_path, monkeypatch, capsys):
    """`--roles xq` was refused as an unknown role; it adapts the cross-attention's q and nothing else."""
    base, tuned, b, t = flan_t5_pair
    code, _, err = run(monkeypatch, capsys, "extract", b, t, "--rank", "1", "--roles", "xq", "-o", tmp_path / "ad")
    assert code == 0, err
    _check_merge(base, tuned, tmp_path / "ad", {"decoder.block.1.layer.1.EncDecAttention.q"})


def test_a_cross_attention_role_is_selected_by_its_own_name_or_its_self_attention_role():
    assert role_selected("xq", ("q",)) and role_selected("xq", ("xq", "v")) and role_selected("xo", ("o",))
    assert not role_selected("q", ("xq",)) and not role_selected("xq", ("k", "v", "xk"))


def test_pairing_roles_q_takes_cross_attention_too_and_xq_only_it(tmp_path):
    """BART's encoder_attn.q_proj was role q, so `analyze/pairs --roles q` took it; as xq it fell out of the selection.
    q selects self- and cross-attention's q (as extract's targets and PEFT's target_modules do), xq only the latter."""
    _, _, b, t = _planted_pair(tmp_path, "bart", {SELF_Q["bart"]: 1, CROSS_Q["bart"]: 2})
    roles_of = {roles: {d.role for d in Pairing(b, t, PairingOptions(roles=roles, load=False))}
                for roles in (("q",), ("xq",), ("k",))}
    assert roles_of == {("q",): {"q", "xq"}, ("xq",): {"xq"}, ("k",): {"k", "xk"}}


def test_train_accepts_the_cross_attention_roles():
    """TrainConfig refused roles xq…xo ('LoRA targets the block linears q, k, …'), which extract takes."""
    from spectra.errors import ConfigError
    from spectra.lora.train import TrainConfig

    assert TrainConfig(roles=("xq", "xv")).roles == ("xq", "xv")
    with pytest.raises(ConfigError, match="LoRA targets the block linears"):  # negative control
        TrainConfig(roles=("embed",))


def test_training_an_encoder_decoder_as_a_causal_lm_is_refused_in_one_paragraph(tmp_path):
    """`spectra train` on T5 printed transformers' error with every config class it knows (~200 names); as a causal LM
    it is refused in one paragraph that points to the task it trains under (seq2seq_lm)."""
    from spectra.errors import ConfigError
    from spectra.lora.train import load_model

    t5 = save(build_model("t5"), tmp_path / "t5", "safetensors")
    with pytest.raises(ConfigError) as err:
        load_model(t5, task="causal_lm")
    message = str(err.value)
    assert "is an encoder-decoder: train it with --task seq2seq_lm" in message
    assert "GPT2Config" not in message and "\n" not in message


def test_the_stack_beside_an_encoder_is_named_the_decoder(tmp_path):
    """The heatmap panel, the summary and `spectra pairs` called T5's decoder stack "language model"; beside an encoder
    it is the decoder (a multimodal model's language model keeps its name)."""
    from spectra.report.tables import stack_label

    assert [stack_label(s, [None, "encoder"]) for s in (None, "encoder")] == ["decoder", "encoder"]
    assert stack_label(None, [None, "vision"]) == "language model" and stack_label(None) == "language model"
    _, _, b, t = _planted_pair(tmp_path, "t5", {SELF_Q["t5"]: 1})
    report = (analyze(b, t, cache_dir=False, progress=False).write_report(tmp_path / "report") / "report.md")
    text = report.read_text()
    assert "stacks of layers (decoder, encoder)" in text and "language model" not in text
