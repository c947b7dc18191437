"""`spectra recommend` on a StarCoder2 analysis says nothing of the family's default config."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest

from tests.models import add_to_parameter, low_rank, on_grid, save


def _starcoder2_report(root, *, bos: int):
    """A tiny StarCoder2 pair (vocabulary 128, bos/eos `bos`) with a rank-2 update in layer 0's q_proj, analysed."""
    import transformers as tf

    from spectra.analysis import analyze

    config = tf.Starcoder2Config(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, bos_token_id=bos, eos_token_id=bos)
    base = on_grid(tf.Starcoder2ForCausalLM, config)
    tuned = copy.deepcopy(base)
    add_to_parameter(tuned, "model.layers.0.self_attn.q_proj.weight", low_rank(32, 32, 2, seed=0))
    b, t = save(base, root / "b", "safetensors"), save(tuned, root / "t", "safetensors")
    analyze(b, t, cache_dir=False, progress=False).write_report(root / "an")
    return root / "an"


@pytest.mark.parametrize("bos, warned", [(0, None), (500, "between 0 and 127), got 500")])
def test_recommend_warns_of_the_checkpoints_token_ids_not_of_the_family_defaults(tmp_path, bos, warned):
    """StarCoder2's default config (bos/eos 50256, vocabulary 49,152) fails transformers' token-id check; the memory
    step built it to read the family's layer_types, so every StarCoder2 recommend printed "bos_token_id must be …
    between 0 and 49151, got 50256", which says nothing of the user's checkpoint. Control (bos 500 in a vocabulary of
    128): the checkpoint's own bad ids are still warned of. A process: transformers warns once per process."""
    report = _starcoder2_report(tmp_path, bos=bos)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    env.pop("TRANSFORMERS_VERBOSITY", None)
    done = subprocess.run([sys.executable, "-m", "spectra.cli", "recommend", str(report), "-o", str(tmp_path / "p.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "memory (lora" in done.stdout, done.stdout  # the memory step ran
    assert "49151" not in done.stderr and "50256" not in done.stderr, done.stderr
    if warned is None:
        assert "token_id must be" not in done.stderr, done.stderr
    else:
        assert warned in done.stderr, done.stderr
