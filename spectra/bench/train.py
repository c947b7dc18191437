"""``spectra bench train``: the trainer's step time against a plain PEFT loop.

Both loops train the same LoRA (rank 8 on every block linear) of the same model,
built from config, on the same batches, with the same AdamW; the plain loop is the
five lines every PEFT tutorial shows (forward, backward, step, zero_grad). The
trainer adds gradient clipping, the learning-rate schedule, per-step JSON logging
and a progress bar; the target is to stay within 10 % of the plain loop.
"""

from __future__ import annotations

import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from spectra.errors import ConfigError
from spectra.files import write_text_atomic
from spectra.report.render import markdown_table

_SIZES = {  # name -> (hidden, intermediate, layers, heads, vocab, seq_len, batch)
    "quick": (64, 128, 2, 4, 256, 32, 4),
    "small": (256, 688, 4, 8, 1024, 64, 8),
}


def run_train_bench(out_dir, *, steps: int = 20, warmup: int = 3, quick: bool = False, seed: int = 0) -> Path:
    """Time both loops and write ``train.md`` and ``train.json`` into ``out_dir``.

    Parameters
    ----------
    out_dir : str or path
    steps : int
        Timed steps per loop, after ``warmup`` untimed ones.
    quick : bool
        A tiny model (seconds), for smoke tests.
    seed : int

    Returns
    -------
    Path
        The Markdown file.
    """
    if steps < 1:  # no timed step: the report's median had no data
        raise ConfigError(f"steps must be ≥ 1, got {steps}.")
    import transformers as tf

    from spectra.lora.train import TrainConfig, train_adapter

    hidden, inter, layers, heads, vocab, seq_len, batch = _SIZES["quick" if quick else "small"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(seed)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(
            hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
            num_key_value_heads=heads, vocab_size=vocab, max_position_embeddings=seq_len, tie_word_embeddings=False))
        model.save_pretrained(tmp / "base")
        total = warmup + steps
        gen = torch.Generator().manual_seed(seed)
        letters = torch.randint(97, 123, (total * batch * seq_len,), generator=gen).tolist()
        (tmp / "data.txt").write_text(bytes(letters).decode("ascii"))
        config = TrainConfig(rank=8, batch_size=batch, max_length=seq_len, max_steps=total, eval_fraction=0.0,
                             seed=seed)
        start = time.perf_counter()
        result = train_adapter(tmp / "base", tmp / "data.txt", config, tmp / "adapter", progress=False)
        trainer_wall = time.perf_counter() - start
        trainer = result.step_times[warmup:]
        plain = _plain_loop(tmp / "base", tmp / "data.txt", config, warmup)
    ratio = statistics.median(trainer) / statistics.median(plain)
    ratio_min = min(trainer) / min(plain)  # robust to other load on a shared machine
    data = {"model": {"hidden": hidden, "intermediate": inter, "layers": layers, "vocab": vocab},
            "batch": batch, "seq_len": seq_len, "steps": steps, "rank": 8,
            "trainer_step_median_s": statistics.median(trainer), "plain_step_median_s": statistics.median(plain),
            "trainer_step_min_s": min(trainer), "plain_step_min_s": min(plain), "ratio": ratio,
            "ratio_fastest": ratio_min,
            "trainer_run_wall_s": trainer_wall, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch": torch.__version__}
    write_text_atomic(out / "train.json", json.dumps(data, indent=2) + "\n")
    rows = [["spectra trainer", f"{1e3 * data['trainer_step_median_s']:.1f}", f"{1e3 * data['trainer_step_min_s']:.1f}"],
            ["plain PEFT loop", f"{1e3 * data['plain_step_median_s']:.1f}", f"{1e3 * data['plain_step_min_s']:.1f}"]]
    verdict = "within" if ratio <= 1.10 else "outside"
    text = (f"# Trainer step time vs a plain PEFT loop\n\nLlama built from config (hidden {hidden}, {layers} layers, "
            f"vocab {vocab}), LoRA r=8 on every block linear, batch {batch} × {seq_len} tokens, AdamW, "
            f"{steps} timed steps after {warmup} warm-up, {data['threads']} threads, torch {torch.__version__}.\n\n"
            + markdown_table(["loop", "median step (ms)", "fastest step (ms)"], rows)
            + f"\n\nTrainer / plain median: **{ratio:.3f}** ({verdict} the 10 % target); fastest steps: "
              f"{ratio_min:.3f}. The trainer's whole run "
              f"(load, {steps + warmup} steps, save) took {trainer_wall:.1f} s. On a shared machine read the ratio, "
              "not the absolute times.\n")
    return write_text_atomic(out / "train.md", text)


def _plain_loop(base: Path, data: Path, config, warmup: int) -> list[float]:
    """The tutorial loop on the same model, LoRA config and batches as the trainer."""
    from peft import get_peft_model

    from spectra.lora.data import batches, prepare_data
    from spectra.lora.train import load_model, lora_config, quiet_peft

    task, train, _, _, _ = prepare_data(base, data, task="causal_lm", max_length=config.max_length)
    torch.manual_seed(config.seed)
    model = load_model(base, task=task)
    with quiet_peft():
        model = get_peft_model(model, lora_config(model, config, task=task))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    times = []
    for batch in batches(train, config.batch_size, generator=torch.Generator().manual_seed(config.seed)):
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if len(times) >= config.max_steps:
            break
    return times[warmup:]
