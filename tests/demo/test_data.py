"""The demo's data builder: real stdlib text, 8 labelled areas, the same bytes every time."""

import json
import subprocess
import sys

import torch  # noqa: F401  (heavy imports first: the builder must not depend on what is already imported)
import transformers  # noqa: F401

from spectra.demo.data import AREAS, write_dataset

SIZES = {"train": 40, "eval": 10, "test": 10}


def test_deterministic_and_well_formed(tmp_path):
    first = write_dataset(tmp_path / "a", max_per_class=SIZES)
    second = write_dataset(tmp_path / "b", max_per_class=SIZES)
    code = f"from spectra.demo.data import write_dataset; write_dataset({str(tmp_path / 'c')!r}, max_per_class={SIZES!r})"
    subprocess.run([sys.executable, "-c", code], check=True)  # a fresh interpreter, nothing imported before
    for split in ("train", "eval", "test", "labels"):
        assert first[split].read_bytes() == second[split].read_bytes(), split
        assert first[split].read_bytes() == (tmp_path / "c" / first[split].name).read_bytes(), split
    rows = {s: [json.loads(line) for line in first[s].read_text().splitlines()] for s in ("train", "eval", "test")}
    assert json.loads(first["labels"].read_text()) == list(AREAS)
    for split, items in rows.items():
        labels = [r["label"] for r in items]
        assert set(labels) == set(range(len(AREAS))), f"{split} misses a class"
        assert max(labels.count(k) for k in set(labels)) <= SIZES[split]
        assert all(len(r["text"].split()) >= 6 for r in items)
    texts = [{r["text"] for r in items} for items in rows.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2]), "splits overlap"
