"""Per-example evaluation (spectra.sweep_metrics): values come back in data order."""

from types import SimpleNamespace

import numpy as np
import torch

from spectra.lora.data import TokenizedData
from spectra.lora.train import evaluate
from spectra.sweep_metrics import BUILTIN, example_stats


class LengthModel(torch.nn.Module):
    """Logits from each example's unpadded length and first token, independent of the padding."""

    def forward(self, input_ids, attention_mask):
        n = attention_mask.sum(1).double()  # (B,)
        first = input_ids[:, 0].double()
        return SimpleNamespace(logits=torch.stack([n / 10, first / 10, -n / 20], 1))  # (B, 3)


def _data():
    rng = np.random.default_rng(1)
    ids = [[int(rng.integers(1, 9))] * int(k) for k in rng.integers(1, 30, size=37)]
    return TokenizedData(ids, [int(i % 3) for i in range(37)], "seq_cls", pad_token_id=0)


def test_example_stats_rows_in_data_order():
    data = _data()
    stats = example_stats(LengthModel(), data, BUILTIN["loss"], batch_size=5)  # batched by length inside
    for i, seq in enumerate(data.ids):  # one example at a time: no padding, no reordering
        (logits,) = LengthModel()(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).logits
        expected = float(torch.nn.functional.cross_entropy(logits[None], torch.tensor([data.labels[i]])))
        assert abs(stats["loss"][i] - expected) < 1e-6  # the loss is taken in float32
    assert stats["count"].tolist() == [1.0] * len(data)


def test_evaluate_equals_the_per_example_definition():
    """Length-ordered batches with padding give the mean over examples taken one by one in data order."""
    data = _data()
    losses, correct = [], 0
    for seq, label in zip(data.ids, data.labels):
        logits = LengthModel()(torch.tensor([seq]), torch.ones(1, len(seq), dtype=torch.long)).logits.float()
        losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor([label]))))
        correct += int(logits.argmax(-1)) == label
    for batch_size in (4, len(data)):
        result = evaluate(LengthModel(), data, batch_size=batch_size)
        assert result["examples"] == len(data) and abs(result["loss"] - np.mean(losses)) < 1e-6
        assert result["accuracy"] == correct / len(data)
