"""`spectra verify` prints its numbers: --adapter printed only a headline (the eval numbers were in report.md only),
--sweep only the report's path. The printed cells are checked against verify.json / sweep.json."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from spectra.cli import app

COMMON = ["--max-steps", "2", "--max-length", "16", "--batch-size", "8"]


def cells(output: str) -> list[list[str]]:
    """The rows of every rich table in `output`, as lists of stripped cell texts."""
    return [[c.strip() for c in line.strip().strip("│").split("│")] for line in output.splitlines()
            if line.strip().startswith("│")]


def share(value) -> str:  # 0.41234 -> '41.2%', formatted here, not by spectra's helpers
    return f"{100 * value:.1f}%"


@pytest.fixture(scope="module")
def tuned(llama_base, text_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("verify_cli") / "tuned"
    done = CliRunner().invoke(app, ["train", str(llama_base), "--full", "--data", str(text_data), "-o", str(out),
                                    *COMMON, "-q"])
    assert done.exit_code == 0, done.output
    return out


def test_verify_adapter_prints_the_summary_and_eval_numbers_of_verify_json(llama_base, tuned, text_data, tmp_path):
    runner = CliRunner(env={"COLUMNS": "200"})
    adapter = tmp_path / "ad"
    done = runner.invoke(app, ["train", str(llama_base), "--rank", "2", "--data", str(text_data), "-o", str(adapter),
                               *COMMON, "-q"])
    assert done.exit_code == 0, done.output
    args = ["verify", str(llama_base), str(tuned), "--adapter", str(adapter), "--eval-data", str(text_data)]
    done = runner.invoke(app, [*args, "-o", str(tmp_path / "v")])
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "v" / "verify.json").read_text())
    s, evals = result["summary"], result["evals"]
    rows = cells(done.output)
    assert ["captured (column space)", share(s["captured_energy"])] in rows
    assert ["captured (row space)", share(s["captured_energy_row"])] in rows
    assert ["Eckart–Young optimum at the same ranks", share(s["optimal_energy"])] in rows
    assert ["φ(k, r), energy-weighted", f"{s['phi']:.4g}"] in rows
    assert ["intruder dimensions adapter / full", f"{s['intruders_adapter']} / {s['intruders_full']}"] in rows
    assert set(evals) == {"base", "tuned", "adapter", "svd"}
    for name, e in evals.items():  # loss, its gap to the full fine-tune's loss (the tuned row's is +0), accuracy
        gap = e["loss"] - evals["tuned"]["loss"] + 0.0
        assert [name, f"{e['loss']:.4g}", f"{gap:+.4g}", share(e["accuracy"])] in rows, (name, rows)
    assert ["tuned", f"{evals['tuned']['loss']:.4g}", "+0", share(evals["tuned"]["accuracy"])] in rows
    quiet = runner.invoke(app, [*args, "-o", str(tmp_path / "q"), "-q"])  # negative control: -q, no tables
    assert quiet.exit_code == 0 and not cells(quiet.output) and "report:" in quiet.output, quiet.output
    bare = runner.invoke(app, args[:5] + ["-o", str(tmp_path / "bare")])  # no --eval-data: the summary, no eval table
    assert bare.exit_code == 0, bare.output
    assert not json.loads((tmp_path / "bare" / "verify.json").read_text())["evals"]
    assert not any(row[0] in ("base", "adapter", "svd") for row in cells(bare.output))


def test_verify_sweep_prints_a_row_per_run_from_sweep_json(llama_base, tuned, text_data, tmp_path):
    runner = CliRunner(env={"COLUMNS": "250"})
    done = runner.invoke(app, ["verify", str(llama_base), str(tuned), "--sweep", "1,2", "--data", str(text_data),
                               "--eval-data", str(text_data), "--max-steps", "2", "-o", str(tmp_path / "sweep")])
    assert done.exit_code == 0, done.output
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    rows = cells(done.output)
    assert len(sweep["runs"]) == 2
    for r in sweep["runs"]:
        assert [r["method"], str(r["rank"]), f"{r['trainable_params']:,}", share(r["captured_energy"]),
                share(r["optimal_energy"]), f"{r['phi']:.4g}", str(r["intruders_adapter"]),
                f"{r['eval']['loss']:.4g}", share(r["eval"]["accuracy"]), f"{r['svd_eval']['loss']:.4g}",
                f"{1e3 * r['step_median_s']:.1f}"] in rows, (r, rows)
    for name in ("base", "tuned"):
        e = sweep["reference_evals"][name]
        assert f"{name} eval: loss {e['loss']:.4g}, accuracy {share(e['accuracy'])}" in done.output
