"""GPT-2-named weights without config.json, and the fused q/k/v of GPT-BigCode and MPT.

1. GPT-BigCode saved as bare .safetensors (no config.json): spectra took every c_attn/c_proj/c_fc for GPT-2's Conv1D
   (stored (in, out)) and transposed BigCode's nn.Linear (out, in) weights: ΔW came out transposed, c_attn was "split"
   into rows of its input dimension, and extract wrote fan_in_fan_out adapters that do not load. The shapes decide
   now (c_attn and c_fc have more outputs than inputs; a square c_proj follows its block). Reference: the models'
   own parameters (transformers, from config), in float64; PEFT's load and merge of the extracted adapter.
2. GPT-BigCode's ``attn.c_attn`` (multi-query [q; k; v], k and v one head each; else per head [q_h; k_h; v_h]) and
   MPT's ``attn.Wqkv`` (chunk(3)) were never split: reports showed one qkv row and ``--roles k`` found nothing on MPT.
   Reference: the q, k and v the modules' own forward computes on a random input.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning")


def _bigcode(multi_query: bool, seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    config = tf.GPTBigCodeConfig(n_embd=48, n_layer=2, n_head=4, n_positions=32, vocab_size=64,
                                 multi_query=multi_query, attn_implementation="eager")
    return tf.GPTBigCodeForCausalLM(config).eval()


def _gpt2(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, n_positions=32, vocab_size=64)).eval()


def _bare_pair(tmp_path, model, changes):
    """base.safetensors and tuned.safetensors of `model` (no config.json), the tuned one with `changes`
    (stored tensor name -> update added to the stored tensor); returns their paths."""
    from safetensors.torch import save_file

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(tmp_path / "base.safetensors"))
    for name, update in changes.items():
        state[name] = state[name] + update
    save_file(state, str(tmp_path / "tuned.safetensors"))
    return tmp_path / "base.safetensors", tmp_path / "tuned.safetensors"


@pytest.mark.parametrize("family", ["bigcode-mqa", "bigcode-mha", "gpt2"])
def test_layout_without_config_is_read_from_shapes(tmp_path, family):
    """Each family saved without config.json: every c_attn, c_proj (the square attention one too) and c_fc is read in
    its family's layout (BigCode nn.Linear, GPT-2 Conv1D), so each record's ΔW is the model's own (out, in) ΔW
    (float64); a note says what was read; BigCode's multi-query c_attn is split q (n_embd rows), k, v (one head each)
    by its shape, the 3·n_embd one (per-head interleaved, head count unknown) not split."""
    from spectra.checkpoints.pairing import Pairing, PairingOptions

    model = _bigcode(family == "bigcode-mqa") if family.startswith("bigcode") else _gpt2()
    g = torch.Generator().manual_seed(1)
    changes = {f"transformer.h.{i}.{m}.weight": 0.1 * torch.randn(p.weight.shape, generator=g)
               for i in range(2) for m, p in (("attn.c_attn", model.transformer.h[i].attn.c_attn),
                                               ("attn.c_proj", model.transformer.h[i].attn.c_proj),
                                               ("mlp.c_fc", model.transformer.h[i].mlp.c_fc))}
    base, tuned = _bare_pair(tmp_path, model, changes)
    pairing = Pairing(base, tuned, PairingOptions(dtype="float64", vectors=False))
    records = {r.name: r for r in pairing}
    conv1d = family == "gpt2"
    assert any(("GPT-2's Conv1D layout (in, out)" if conv1d else "GPT-BigCode's nn.Linear layout (out, in)") in n
               for n in pairing.notes), pairing.notes
    for name, update in changes.items():
        record = records[name.removesuffix(".weight")]
        assert record.conv1d is conv1d, name
        expected = (update.T if conv1d else update).double()  # the (out, in) ΔW of the module
        torch.testing.assert_close(record.delta, expected, rtol=0, atol=1e-7, msg=name)
    split = sorted(n for n in records if "[" in n)
    if family == "bigcode-mha":
        assert split == []
    else:
        assert split == [f"transformer.h.{i}.attn.c_attn[{r}]" for i in range(2) for r in ("k", "q", "v")]
        rows = {"q": 48, "k": 12 if family == "bigcode-mqa" else 48, "v": 12 if family == "bigcode-mqa" else 48}
        for name in split:
            assert records[name].shape == (rows[name[-2]], 48), name


def test_extract_without_config_loads_onto_gpt_bigcode(tmp_path, monkeypatch, capsys):
    """extract --rank 2 on a config-less GPT-BigCode pair writes an adapter that PEFT loads onto the model (it wrote
    fan_in_fan_out with lora_A of the wrong size) and whose merge is base + the float64 rank-2 truncation of the
    planted ΔW; negative control: the same pair with config.json gives the same merge."""
    import numpy as np
    from peft import PeftModel

    from tests.cli.test_cli import run

    model = _bigcode(True)
    g = torch.Generator().manual_seed(2)
    name = "transformer.h.0.attn.c_attn.weight"
    delta = (0.1 * torch.randn(72, 3, generator=g) @ torch.randn(3, 48, generator=g)).double()
    base, tuned = _bare_pair(tmp_path, model, {name: delta.float()})
    truth = model.state_dict()[name].double() + delta.float().double()
    u, s, vt = np.linalg.svd((truth - model.state_dict()[name].double()).numpy())
    goal = model.state_dict()[name].double().numpy() + (u[:, :2] * s[:2]) @ vt[:2]
    for label, pair in (("bare", (base, tuned)), ("config", None)):
        if pair is None:
            for side in ("b", "t"):
                (tmp_path / side).mkdir()
                (tmp_path / side / "model.safetensors").write_bytes(
                    (base if side == "b" else tuned).read_bytes())
                model.config.to_json_file(tmp_path / side / "config.json")
            pair = (tmp_path / "b", tmp_path / "t")
        out = tmp_path / f"adapter-{label}"
        code, stdout, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "2", "--roles", "q,k,v", "-o", out)
        assert code == 0, stdout + err
        assert json.loads((out / "adapter_config.json").read_text()).get("fan_in_fan_out") is not True
        loaded = _bigcode(True).double()
        loaded.load_state_dict(model.double().state_dict())
        merged = PeftModel.from_pretrained(loaded, out).merge_and_unload().state_dict()
        np.testing.assert_allclose(merged[name].numpy(), goal, rtol=0, atol=1e-6, err_msg=label)
        model = model.float()


def _bigcode_qkv(model, x):
    """(q, k, v) the first layer's attention computes on hidden states `x` (1, S, d), each (S, heads·head_dim) or
    (S, kv_heads·head_dim), captured at its attention function."""
    from transformers.models.gpt_bigcode import modeling_gpt_bigcode as mod

    seen = {}
    original = mod.eager_attention_forward

    def record(module, query, key, value, *args, **kwargs):
        seen.update(q=query, k=key, v=value)
        return original(module, query, key, value, *args, **kwargs)

    mod.eager_attention_forward = record
    try:
        model.transformer.h[0].attn(x)
    finally:
        mod.eager_attention_forward = original
    return {r: t[0].transpose(0, 1).reshape(x.shape[1], -1) for r, t in seen.items()}  # (S, heads·head_dim)


@pytest.mark.parametrize("multi_query", [True, False])
def test_bigcode_c_attn_split_as_its_forward_computes_q_k_v(tmp_path, multi_query):
    """With config.json: the q, k and v rows spectra splits GPT-BigCode's c_attn into give, on a random input, the
    q, k and v its attention computes (x·W[rows]ᵀ + b[rows]); roles k selects the k rows."""
    from spectra.checkpoints.pairing import Pairing, PairingOptions

    model = _bigcode(multi_query)
    model.save_pretrained(tmp_path)
    pairing = Pairing(tmp_path, tmp_path, PairingOptions(vectors=False, load=False))
    entry = next(e for e in pairing.entries if e.name == "transformer.h.0.attn.c_attn")
    assert [p.role for p in entry.projections] == ["q", "k", "v"]
    x = torch.randn(1, 5, 48)
    qkv = _bigcode_qkv(model, x)
    attn = model.transformer.h[0].attn.c_attn
    for proj in entry.projections:
        rows = proj.rows if isinstance(proj.rows, slice) else list(proj.rows)
        mine = x[0] @ attn.weight[rows].T + attn.bias[rows]
        torch.testing.assert_close(mine, qkv[proj.role], msg=proj.role)
    k_only = Pairing(tmp_path, tmp_path, PairingOptions(vectors=False, load=False, roles=("k",)))
    assert [r.name for r in k_only if r.layer == 0] == ["transformer.h.0.attn.c_attn[k]"]


def test_mpt_wqkv_split_as_its_forward_computes_q_k_v(tmp_path):
    """MPT's Wqkv: the k and v rows give the keys and values its attention stores in the cache, the q rows
    (with them) its attention output; --roles k pairs (it errored 'no ΔW pair … matches --roles k')."""
    import transformers as tf

    from spectra.checkpoints.pairing import Pairing, PairingOptions

    torch.manual_seed(0)
    model = tf.MptForCausalLM(tf.MptConfig(d_model=48, n_heads=4, n_layers=2, vocab_size=64, max_seq_len=32,
                                           expansion_ratio=2)).eval()
    model.save_pretrained(tmp_path)
    pairing = Pairing(tmp_path, tmp_path, PairingOptions(vectors=False, load=False))
    entry = next(e for e in pairing.entries if e.name == "transformer.blocks.0.attn.Wqkv")
    rows = {p.role: p.rows for p in entry.projections}
    assert list(rows) == ["q", "k", "v"]

    class Recorder:  # a cache that records what the attention stores
        def update(self, key, value, layer_idx, **kwargs):
            self.key, self.value = key, value
            return key, value

        def get_seq_length(self):
            return 0

    attn, x = model.transformer.blocks[0].attn, torch.randn(1, 5, 48)
    cache = Recorder()
    out = attn(x, position_bias=None, cache=cache)[0]
    weight = attn.Wqkv.weight

    def heads(t):  # (S, d) -> (1, heads, S, head_dim), as the forward reshapes
        return t.reshape(1, 5, 4, 12).transpose(1, 2)

    q, k, v = (heads(x[0] @ weight[rows[r]].T) for r in ("q", "k", "v"))
    torch.testing.assert_close(k, cache.key)
    torch.testing.assert_close(v, cache.value)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.softmax_scale, dim=-1)
    expected = attn.out_proj((probs @ v).permute(0, 2, 1, 3).reshape(1, 5, 48))
    torch.testing.assert_close(out, expected)
    k_only = Pairing(tmp_path, tmp_path, PairingOptions(vectors=False, load=False, roles=("k",)))
    assert [r.name for r in k_only if r.layer == 0] == ["transformer.blocks.0.attn.Wqkv[k]"]
