"""The demo's data builder: real stdlib text, 8 labelled areas, the same bytes every time."""

import json

from spectra.demo.data import AREAS, write_dataset


def test_deterministic_and_well_formed(tmp_path):
    first = write_dataset(tmp_path / "a", max_per_class={"train": 40, "eval": 10, "test": 10})
    second = write_dataset(tmp_path / "b", max_per_class={"train": 40, "eval": 10, "test": 10})
    for split in ("train", "eval", "test", "labels"):
        assert first[split].read_bytes() == second[split].read_bytes(), split
    rows = {s: [json.loads(line) for line in first[s].read_text().splitlines()] for s in ("train", "eval", "test")}
    assert json.loads(first["labels"].read_text()) == list(AREAS)
    for split, items in rows.items():
        labels = [r["label"] for r in items]
        assert set(labels) == set(range(len(AREAS))), f"{split} misses a class"
        assert max(labels.count(k) for k in set(labels)) <= {"train": 40, "eval": 10, "test": 10}[split]
        assert all(len(r["text"].split()) >= 6 for r in items)
    texts = [{r["text"] for r in items} for items in rows.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2]), "splits overlap"
