"""Does the demo report just written match the committed one? Exit 1, naming what differs, if not.

Bit-for-bit equality held only on one kind of CPU: the same code on an AVX2-only host wrote
numbers 1e-8 (SVDs) to 1.3e-5 (the trained adapters' losses) off the committed ones, made on
an AVX-512 host, so every PNG and SVG differed by a few anti-aliased pixels. The check is on
what the code decides instead:

- ``demo.json``: the same keys, lists, strings and integers; floats within a relative 1e-3
  (76× the largest difference seen between the two hosts);
- ``report.md``: identical (its numbers are printed at display precision);
- figures and ``report.html`` (renderings of the above): the same set of files.

Usage: python .ci/demo_matches.py reports/demo   (run inside the git checkout, after `spectra demo`)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

RTOL = 1e-3


def committed(path: Path) -> str:
    return subprocess.run(["git", "show", f"HEAD:{path.as_posix()}"], check=True, capture_output=True,
                          text=True).stdout


def differences(old, new, where: str = "demo.json") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        if old.keys() != new.keys():
            return [f"{where}: keys {sorted(old.keys() ^ new.keys())} added or removed"]
        return [d for k in old for d in differences(old[k], new[k], f"{where}.{k}")]
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [f"{where}: {len(old)} items committed, {len(new)} written"]
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in differences(a, b, f"{where}[{i}]")]
    if isinstance(old, float) and isinstance(new, float):
        scale = max(abs(old), abs(new))
        return [] if abs(old - new) <= RTOL * scale else [f"{where}: {old!r} committed, {new!r} written"]
    return [] if old == new and type(old) is type(new) else [f"{where}: {old!r} committed, {new!r} written"]


def main(folder: str) -> int:
    root = Path(folder)
    problems = differences(json.loads(committed(root / "demo.json")),
                           json.loads((root / "demo.json").read_text()))
    if committed(root / "report.md") != (root / "report.md").read_text():
        problems.append("report.md: differs")
    listed = subprocess.run(["git", "ls-files", "--", folder], check=True, capture_output=True, text=True).stdout
    tracked = set(listed.split())
    written = {p.as_posix() for p in root.rglob("*") if p.is_file()}
    problems += [f"{p}: written, not committed" for p in sorted(written - tracked)]
    problems += [f"{p}: committed, not written" for p in sorted(tracked - written)]
    for line in problems:
        print(line, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "reports/demo"))
