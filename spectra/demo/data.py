"""The demo's task: which area of the Python standard library does this docstring come from?

Real English text that ships with Python itself, so the demo needs no download: the
first paragraph of the docstring of every public function, class and method of a few
modules per area, labelled with the area (8 classes). The builder is deterministic on
a given Python version: texts are deduplicated (a text found in two areas is dropped),
sorted, and split by a hash of the text, so the same interpreter writes the same bytes.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
import warnings
from pathlib import Path

# area -> stdlib modules whose docstrings stand for it
AREAS: dict[str, tuple[str, ...]] = {
    "files and processes": ("os", "shutil", "pathlib", "subprocess", "tempfile", "glob"),
    "numbers and math": ("math", "cmath", "statistics", "decimal", "fractions", "random"),
    "email and mime": ("email.message", "email.utils", "email.mime.text", "mailbox", "smtplib", "imaplib"),
    "web and http": ("http.client", "http.server", "urllib.request", "urllib.parse", "http.cookiejar", "html.parser"),
    "concurrency": ("asyncio", "threading", "multiprocessing", "concurrent.futures", "queue", "selectors"),
    "text processing": ("re", "string", "textwrap", "difflib", "unicodedata", "codecs"),
    "dates and times": ("datetime", "calendar", "time", "zoneinfo", "sched"),
    "testing and debugging": ("unittest", "unittest.mock", "doctest", "pdb", "traceback", "logging"),
}
SPLITS = {"train": 0.6, "eval": 0.2, "test": 0.2}  # shares of each area, by text hash
MIN_WORDS = 6  # shorter first paragraphs ("Return x.") carry too little to classify


def _paragraphs(module_name: str) -> list[str]:
    """First docstring paragraph of every public member (and class member) defined in the module's package."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few stdlib modules warn on import (deprecations)
        module = importlib.import_module(module_name)
    package = module_name.split(".")[0]
    texts, seen, alive = [], set(), []

    def visit(obj, depth: int) -> None:
        for name, member in inspect.getmembers(obj):
            if name.startswith("_") or id(member) in seen or inspect.ismodule(member):
                continue  # submodules appear only once imported: their presence depends on import order
            owner = str(getattr(member, "__module__", "") or "")
            if owner and not owner.startswith(package):
                continue  # re-exported from elsewhere: not this area's text
            seen.add(id(member))
            alive.append(member)  # keep it alive: a freed object's id could be reused by the next member
            doc = inspect.getdoc(member)
            if doc:
                first = re.split(r"\n\s*\n", doc.strip())[0]
                text = " ".join(first.split())
                if len(text.split()) >= MIN_WORDS:
                    texts.append(text)
            if inspect.isclass(member) and depth == 0:
                visit(member, 1)

    visit(module, 0)
    return texts


def build_examples() -> list[dict]:
    """Every labelled example, sorted, with its split; deterministic for a Python version."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modules in AREAS.values():  # import everything first: lazy attributes then resolve alike
            for module in modules:
                importlib.import_module(module)
    by_text: dict[str, set[int]] = {}
    for label, modules in enumerate(AREAS.values()):
        for module in modules:
            for text in _paragraphs(module):
                by_text.setdefault(text, set()).add(label)
    examples = []
    for text in sorted(by_text):
        labels = by_text[text]
        if len(labels) != 1:
            continue  # the same text in two areas cannot be labelled
        fraction = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8
        split = "train" if fraction < SPLITS["train"] else "eval" if fraction < SPLITS["train"] + SPLITS["eval"] else "test"
        examples.append({"text": text, "label": next(iter(labels)), "split": split})
    return examples


def write_dataset(out_dir: str | os.PathLike, *, max_per_class: dict[str, int] | None = None) -> dict[str, Path]:
    """Write ``train.jsonl``, ``eval.jsonl``, ``test.jsonl`` ({"text", "label"}) and ``labels.json``.

    Parameters
    ----------
    out_dir : path
    max_per_class : dict split → int, optional
        Keep at most this many examples per class and split (the first by text hash),
        to size the task for a CPU.

    Returns
    -------
    dict
        split name → path of its file (plus ``"labels"``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    examples = build_examples()
    paths = {}
    for split in SPLITS:
        rows = [e for e in examples if e["split"] == split]
        rows.sort(key=lambda e: (hashlib.sha256(e["text"].encode()).hexdigest(), e["text"]))  # a fixed shuffle
        limit = (max_per_class or {}).get(split)
        if limit is not None:
            counts: dict[int, int] = {}
            kept = []
            for e in rows:
                if counts.get(e["label"], 0) < limit:
                    counts[e["label"]] = counts.get(e["label"], 0) + 1
                    kept.append(e)
            rows = kept
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps({"text": e["text"], "label": e["label"]}) + "\n" for e in rows))
        paths[split] = path
    labels = out_dir / "labels.json"
    labels.write_text(json.dumps(list(AREAS), indent=2) + "\n")
    paths["labels"] = labels
    return paths


write_demo_dataset = write_dataset  # the name under which the public API exports it
