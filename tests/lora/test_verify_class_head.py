"""verify builds the model with the class count an adapter's saved head needs, and measures the rest exactly.

What was wrong (session 21): an adapter extracted with ``--modules-to-save pre_classifier,classifier`` from a
classifier fine-tuned from 2 labels into 3 was refused by ``spectra verify`` (the saved classifier (3, 32) against the
base's (2, 32)), after the pairing itself had refused the pair. verify now asks
:func:`~spectra.lora.saved_modules.saved_num_labels` (extract's rule) which ``num_labels`` the saved tensors need,
sets those tensors aside with a note (a re-initialised head has no ΔW) and builds its eval models with that count.
Reference: PEFT's own load of the adapter onto the model built with num_labels=3, merged (merge_and_unload), against
float64 numpy ΔW_full and its rank-r truncation; the DistilBertForMaskedLM base (no head, m/dbcls) is the pair
that already loaded, checked the same way.
"""

from __future__ import annotations

import numpy as np
import pytest

from spectra.lora.extract import extract_adapter
from spectra.lora.verify import verify_adapter
from tests.checkpoints.test_pairing_class_head import class_pair

_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _eval_data(path):
    import json

    gen = np.random.default_rng(0)
    lines = [json.dumps({"text": " ".join(gen.choice(_WORDS, 6)), "label": int(gen.integers(3))}) for _ in range(12)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _reference(base, tuned, adapter):
    """Per module (the checkpoint's name): (‖ΔW_full‖, ‖ΔW_ad‖, ‖ΔW_ad − ΔW_full‖ / ‖ΔW_full‖, Eckart–Young
    energy share at the adapter's rank) from PEFT's merge onto the model built with num_labels=3, in float64 numpy."""
    import transformers as tf
    from peft import PeftModel
    from safetensors.numpy import load_file

    b, t = load_file(base / "model.safetensors"), load_file(tuned / "model.safetensors")
    model = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3, ignore_mismatched_sizes=True)
    peft_model = PeftModel.from_pretrained(model, adapter)
    ranks = {name.removeprefix("base_model.model."): module.r["default"]
             for name, module in peft_model.named_modules() if hasattr(module, "lora_A") and "default" in module.r}
    merged = {k: v.detach().double().numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    out = {}
    for module, rank in ranks.items():
        key = f"{module}.weight"
        full = t[key].astype(np.float64) - b[key].astype(np.float64)
        ad = merged[key] - b[key].astype(np.float64)
        s = np.linalg.svd(full, compute_uv=False)
        out[module] = (np.linalg.norm(full), np.linalg.norm(ad), np.linalg.norm(ad - full) / np.linalg.norm(full),
                       float((s[:rank] ** 2).sum() / (s ** 2).sum()))
    return out


@pytest.mark.parametrize("base_labels", [2, None], ids=["classifier-2-to-3", "masked-lm-to-3"])
def test_verify_measures_an_adapter_with_a_head_of_three_classes(tmp_path, base_labels):
    base, tuned, _ = class_pair(tmp_path, "distilbert", base_labels=base_labels)
    adapter = tmp_path / "ad"
    extract_adapter(base, tuned, 1, adapter, modules_to_save=("pre_classifier", "classifier"), progress=False)
    result = verify_adapter(base, tuned, adapter, eval_data=_eval_data(tmp_path / "eval.jsonl"), progress=False)
    want = _reference(base, tuned, adapter)
    rows = {r["name"]: r for r in result.modules}
    assert set(rows) == set(want) and len(rows) == 12
    for name, (full, ad, error, optimal) in want.items():
        row = rows[name]
        assert row["rank"] == 1
        np.testing.assert_allclose([row["fro_norm_full"], row["fro_norm_adapter"]], [full, ad], rtol=1e-6,
                                   err_msg=name)
        np.testing.assert_allclose(row["relative_error"], error, rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(row["optimal_energy"], optimal, rtol=1e-6, err_msg=name)
        assert 0.3 < optimal < 0.99  # a rank-2 update cut at rank 1: the measures are not trivially 1
    if base_labels == 2:
        note = next(n for n in result.notes if n.startswith("classifier: saved whole"))
        assert "TUNED's 3 classes, (3, 32) in the adapter against the base's (2, 32)" in note
        assert "num_labels=3" in note
    else:
        assert "classifier: modules_to_save tensor absent from the base (a new head); not measured" in result.notes
    # the head's tensors named as the checkpoint names them, its bias set aside with it (no "trained bias" note)
    assert not any("base_model.model.classifier" in n for n in result.notes), result.notes
    evals = result.evals
    # PEFT's adapter on the 3-class model is the truncated-SVD model (extract wrote that truncation): same loss
    assert evals["adapter"]["loss"] == pytest.approx(evals["svd"]["loss"], rel=1e-5)
    assert evals["adapter"]["loss"] != pytest.approx(evals["tuned"]["loss"], rel=1e-7)  # rank 1 of rank 2
