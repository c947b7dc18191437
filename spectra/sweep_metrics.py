"""Eval metrics of a truncation sweep, kept per example so their noise can be bootstrapped.

Every metric is a pooled ratio ``finish(Σ numerator / Σ denominator)`` over eval examples:
accuracy is correct / counted, loss is summed cross-entropy / counted tokens (or examples),
perplexity is exp(loss). Loss and accuracy follow :func:`spectra.lora.train.evaluate`
(next-token and token-level for language modelling, token-level over the targets for
sequence to sequence), computed per example.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from spectra.errors import ConfigError
from spectra.lora.data import IGNORE_INDEX, predicted_targets


@dataclass(frozen=True)
class Metric:
    """A sweep metric.

    Attributes
    ----------
    name : str
    per_example : callable
        ``f(logits, batch) -> Tensor (B,)`` (scores, averaged) or ``(numerator (B,),
        denominator (B,))`` (pooled as Σ num / Σ den). ``batch`` holds ``input_ids``,
        ``attention_mask`` and ``labels`` as :func:`spectra.lora.data.batches` makes them
        (and, for an encoder–decoder, ``decoder_attention_mask``; its logits are the
        decoder's, aligned with ``labels``: :func:`spectra.lora.data.predicted_targets`).
    higher_is_better : bool
    finish : callable, optional
        Applied elementwise (to numpy arrays) after pooling, e.g. ``np.exp`` for perplexity.
    """

    name: str
    per_example: Callable
    higher_is_better: bool = True
    finish: Callable | None = None

    def pool(self, num, den):
        """finish(num / den), elementwise over numpy arrays."""
        value = np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)
        return self.finish(value) if self.finish is not None else value


def token_stats(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per example: summed cross-entropy, correct predictions and counted targets, float64 (B,) each."""
    labels = batch["labels"]
    logits = logits.float()
    if labels.ndim == 1:  # classification: (B, C) vs (B,)
        loss = torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # (B,)
        return loss.double(), (logits.argmax(-1) == labels).double(), torch.ones(len(labels), dtype=torch.float64, device=labels.device)
    # causal: (B, T-1, V), (B, T-1), position t predicts t+1; seq2seq: (B, T, V), (B, T), decoder position t, token t
    logits, labels = predicted_targets(logits, batch)
    keep = labels != IGNORE_INDEX
    loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")  # (B, T-1)
    correct = (logits.argmax(-1) == labels) & keep
    return (loss * keep).double().sum(1), correct.double().sum(1), keep.double().sum(1)


def _loss(logits, batch):
    loss, _, count = token_stats(logits, batch)
    return loss, count


def _accuracy(logits, batch):
    _, correct, count = token_stats(logits, batch)
    return correct, count


BUILTIN = {
    "accuracy": Metric("accuracy", _accuracy, higher_is_better=True),
    "loss": Metric("loss", _loss, higher_is_better=False),
    "perplexity": Metric("perplexity", _loss, higher_is_better=False, finish=np.exp),
}


def resolve_metric(metric, task: str) -> Metric:
    """A :class:`Metric` from a Metric, a built-in name, a callable, or None (the task's default)."""
    if metric is None:
        return BUILTIN["accuracy" if task == "seq_cls" else "perplexity"]
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in BUILTIN:
            raise ConfigError(f"metric {metric!r} is not one of {', '.join(BUILTIN)}; pass a callable for others.")
        return BUILTIN[metric]
    if callable(metric):
        return Metric(getattr(metric, "__name__", "metric"), metric, higher_is_better=True)
    raise ConfigError(f"metric {metric!r}: pass a Metric, one of {', '.join(BUILTIN)}, or a callable.")


@torch.no_grad()
def example_stats(model, data, metric: Metric, *, batch_size: int) -> dict[str, np.ndarray]:
    """Evaluate ``model`` on ``data`` in batches; per-example arrays (n,) of the metric and of loss/accuracy."""
    from spectra.lora.data import batch_indices, collate, model_inputs
    from spectra.lora.train import model_device, to_device

    was_training = model.training
    model.eval()
    device = model_device(model)
    out: dict[str, list] = {k: [] for k in ("num", "den", "loss", "correct", "count")}
    groups = batch_indices(data, batch_size, by_length=True)  # less padding; rows go back to data order below
    try:
        for index in groups:
            batch = to_device(collate(data, index), device)
            logits = model(**model_inputs(batch, model)).logits
            loss, correct, count = token_stats(logits, batch)
            value = metric.per_example(logits, batch)
            num, den = value if isinstance(value, tuple) else (value, torch.ones(len(batch["labels"])))
            if num.shape != (len(batch["labels"]),) or den.shape != num.shape:
                raise ConfigError(f"metric {metric.name}: per_example must return one value per example, shape "
                                  f"({len(batch['labels'])},), got {tuple(num.shape)}.")
            for k, v in (("num", num), ("den", den), ("loss", loss), ("correct", correct), ("count", count)):
                out[k].append(v.detach().double().cpu().numpy())
    finally:
        model.train(was_training)
    where = np.argsort(np.concatenate([np.asarray(i) for i in groups]))  # batch order -> data order
    return {k: np.concatenate(v)[where] for k, v in out.items()}
