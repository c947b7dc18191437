"""The command line: fast --help, one-paragraph errors with exit code 2, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from spectra.cli import main
from tests.models import build_model, save


def run(monkeypatch, capsys, *args, columns: int = 250) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["spectra", *map(str, args)])
    monkeypatch.setenv("COLUMNS", str(columns))  # the tests read whole cells, unless they test a narrow terminal
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_help_is_fast_and_imports_no_torch():
    code = "import sys; from spectra.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    # every command module is imported with the package: each imports the heavy libraries inside its commands
    code = ("import sys; import spectra.cli; print(sorted({'torch', 'transformers', 'peft', 'spectra.lora', "
            "'spectra.analysis', 'matplotlib'} & set(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
    negative = subprocess.run([sys.executable, "-c", code.replace("import spectra.cli", "import spectra.lora.train")],
                              capture_output=True, text=True, check=True).stdout
    assert "'spectra.lora'" in negative and "'torch'" in negative  # the check sees a heavy import where there is one
    out = subprocess.run([sys.executable, "-m", "spectra.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("analyze", "show", "pairs", "recommend", "memory", "bench"):
        assert command in out.stdout


def test_analyze_writes_report_and_show_reads_it(monkeypatch, capsys, pair, tmp_path):
    out = tmp_path / "report"
    code, stdout, _ = run(monkeypatch, capsys, "analyze", *pair, "-o", out, "--no-cache", "--quiet")
    assert code == 0 and "report.html" in stdout
    assert (out / "analysis.json").is_file() and (out / "report.html").is_file()
    code, stdout, _ = run(monkeypatch, capsys, "show", out)
    assert code == 0 and "energy-90% rank" in stdout and "qkv" in stdout
    code, stdout, _ = run(monkeypatch, capsys, "show", out, columns=80)  # a classic terminal: cells wrap, never cut
    assert code == 0 and "E90" in stdout and "…" not in stdout and max(map(len, stdout.splitlines())) <= 80
    code, _, _ = run(monkeypatch, capsys, "recommend", out, "-o", tmp_path / "plan.json")
    assert code == 0
    code, _, err = run(monkeypatch, capsys, "show", tmp_path / "plan.json")  # said "re-run spectra analyze"
    assert code == 2 and "plan.json is a rank plan (`spectra recommend -o`), not an analysis" in " ".join(err.split())


def test_analyze_base_top_k_keeps_that_many_base_values(monkeypatch, capsys, pair, tmp_path):
    """--base-top-k reaches the config: W_base's top values are kept only when asked for (none by default)."""
    import json

    code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-o", tmp_path / "r", "--no-cache", "-q",
                       "--base-top-k", "4")
    assert code == 0, err
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    matrices = [row for row in data["modules"] if row["kind"] == "matrix"]
    assert matrices and all(len(row["base_top_singular_values"]) == 4 for row in matrices)
    assert data["config"]["base_top_k"] == 4


def test_show_of_identical_checkpoints_prints_no_empty_table(monkeypatch, capsys, pair, tmp_path):
    """Every ΔW = 0: the per-role table has no rows; the terminal said so with an empty table."""
    code, stdout, err = run(monkeypatch, capsys, "analyze", pair[0], pair[0], "-o", tmp_path / "r", "--no-cache", "-q")
    assert code == 0, err
    code, stdout, _ = run(monkeypatch, capsys, "show", tmp_path / "r")
    assert code == 0 and "no role has a rank to tabulate" in stdout and "by role" not in stdout
    assert "unchanged (ΔW = 0)" in stdout


def test_the_terminal_table_shows_the_headline_energy_level(monkeypatch, capsys, pair, tmp_path):
    """Without 0.9 among --energy, the rank columns follow the level the summary sentence uses (0.95 here)."""
    code, stdout, err = run(monkeypatch, capsys, "analyze", *pair, "-o", tmp_path / "r", "--no-cache",
                            "--energy", "0.8,0.95")
    assert code == 0, err
    assert "E95/full" in stdout and "E95: energy-95% rank" in stdout and "E90" not in stdout
    assert "95% of the update's energy" in stdout


def test_analyze_names_tensors_it_could_not_pair_in_the_terminal(monkeypatch, capsys, pair, tmp_path):
    """A tensor missing from TUNED was only in report.md: the run printed "Across N weight matrices" and nothing else."""
    import shutil

    from safetensors.torch import load_file, save_file

    tuned = shutil.copytree(pair[1], tmp_path / "t")
    weights = load_file(tuned / "model.safetensors")
    gone = "transformer.h.1.mlp.c_fc.weight"
    del weights[gone]
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    code, stdout, err = run(monkeypatch, capsys, "analyze", pair[0], tuned, "-o", tmp_path / "r", "--no-cache")
    assert code == 0, err
    assert f"note: 1 tensor(s) only in BASE, not analysed: {gone}" in stdout
    code, stdout, _ = run(monkeypatch, capsys, "show", tmp_path / "r")
    assert f"only in BASE, not analysed: {gone}" in stdout
    code, stdout, err = run(monkeypatch, capsys, "analyze", pair[0], tuned, "-o", tmp_path / "q", "--no-cache", "-q")
    assert code == 0 and f"only in BASE, not analysed: {gone}" in err  # a warning: -q keeps it, on stderr
    code, stdout, _ = run(monkeypatch, capsys, "analyze", *pair, "-o", tmp_path / "r2", "--no-cache")
    assert code == 0 and "not analysed" not in stdout  # negative control: a complete pair


def test_analyze_prints_the_calibration_notes_also_from_the_cache(monkeypatch, capsys, pair, tmp_path):
    """The GPT-2 pair has 32 positions: `analyze --calibration` cuts the texts at 32 tokens, which the calibration
    notes and the terminal never said (nor analysis.json). A rerun served from the cache says it too, and `show`."""
    text = tmp_path / "calibration.txt"
    text.write_text("words to cut into blocks " * 20)
    # the note names the option that set the length, the calibration's own (it said "max_length:", an option of train)
    cut = "note: calibration max_length: examples are cut at 32 tokens, not the default 128"
    args = ("analyze", *pair, "--roles", "qkv", "--calibration", text, "--cache-dir", tmp_path / "cache")
    for out in ("r", "again"):
        code, stdout, err = run(monkeypatch, capsys, *args, "-o", tmp_path / out)
        assert code == 0 and cut in stdout, err
    code, stdout, err = run(monkeypatch, capsys, *args, "-o", tmp_path / "q", "-q")
    assert code == 0 and cut in err  # -q: on stderr, with the other notes
    code, stdout, _ = run(monkeypatch, capsys, "show", tmp_path / "r")
    assert cut in stdout
    code, stdout, _ = run(monkeypatch, capsys, "analyze", *pair, "--roles", "qkv", "-o", tmp_path / "plain",
                          "--no-cache")
    assert code == 0 and "calibration" not in stdout  # negative control: no calibration data, no note


def test_analyze_roles_and_layers(monkeypatch, capsys, pair, tmp_path):
    from spectra.analysis import AnalysisResult

    code, _, _ = run(monkeypatch, capsys, "analyze", *pair, "-o", tmp_path / "r", "--no-cache", "-q",
                     "--roles", "q,k", "--layers", "0-0")
    assert code == 0
    names = [m["name"] for m in AnalysisResult.load(tmp_path / "r").modules]
    assert names == ["transformer.h.0.attn.c_attn[q]", "transformer.h.0.attn.c_attn[k]"]


@pytest.mark.parametrize("args, message", [
    (["analyze", "{b}", "{missing}"], "does not exist"),
    (["analyze", "{b}", "{t}", "--layers", "x-y"], "--layers"),
    (["analyze", "{b}", "{t}", "--method", "magic"], "method"),
    (["analyze", "{b}", "{t}", "--roles", "query"], "unknown role"),
    (["analyze", "{b}", "{t}", "--energy", "0.9,lots"], "--energy"),
    (["analyze", "{b}", "{t}", "--device", "cuda:7"] if not torch.cuda.is_available() else
     ["analyze", "{b}", "{missing}"], "cuda" if not torch.cuda.is_available() else "does not exist"),
])
def test_bad_input_is_one_paragraph_and_writes_nothing(monkeypatch, capsys, pair, tmp_path, args, message):
    out = tmp_path / "out"
    fill = {"b": pair[0], "t": pair[1], "missing": tmp_path / "nope"}
    code, _, err = run(monkeypatch, capsys, *[a.format(**fill) for a in args], "-o", out, "--no-cache", "-q")
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".*out*")), "a temporary report directory was left behind"


def test_existing_output_needs_overwrite(monkeypatch, capsys, pair, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-o", out, "--no-cache", "-q")
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-o", out, "--no-cache", "-q", "--overwrite")
    assert code == 2 and "holds keep.txt, which `spectra analyze` does not write" in err  # a user's file: kept
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()  # an empty directory, then the report spectra wrote there: replaced
    for _ in range(2):
        code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-o", out, "--no-cache", "-q", "--overwrite")
        assert code == 0 and (out / "analysis.json").is_file(), err
    file = tmp_path / "a_file"
    file.write_text("mine")
    for overwrite in ((), ("--overwrite",)):  # "is a file" with or without --overwrite, which would not help
        code, _, err = run(monkeypatch, capsys, "analyze", *pair, "-o", file, "--no-cache", "-q", *overwrite)
        assert code == 2 and "is a file" in err and "pass --overwrite" not in err and file.read_text() == "mine"


def test_an_output_that_would_replace_an_input_is_refused_even_with_overwrite(monkeypatch, capsys, pair, tmp_path):
    """-o equal to an input, holding one, or a file in an input folder (or the report file read) is refused before
    any work; a folder inside an input folder, or a report folder's other files, replace nothing read: allowed."""
    import shutil

    base, tuned = (shutil.copytree(p, tmp_path / p.name) for p in pair)
    before = sorted(p.name for p in tuned.iterdir())
    for command, out in (("analyze", tuned), ("analyze", tmp_path), ("extract", base),
                         ("analyze", tuned / "config.json")):
        extra = ("--rank", "2") if command == "extract" else ("--no-cache",)
        code, _, err = run(monkeypatch, capsys, command, base, tuned, *extra, "-o", out, "--overwrite", "-q")
        assert code == 2 and "would replace what this command reads" in err, (command, out, err)
    assert sorted(p.name for p in tuned.iterdir()) == before and base.is_dir()
    (tuned / "x").mkdir()
    code, _, err = run(monkeypatch, capsys, "analyze", base, tuned, "--no-cache", "-o", tuned / "x", "--overwrite",
                       "-q")
    assert code == 0, err  # a folder inside the checkpoint's: nothing the loader reads
    run_dir = tuned / "x"
    code, _, err = run(monkeypatch, capsys, "recommend", run_dir, "-o", run_dir / "analysis.json", "--overwrite")
    assert code == 2 and "is the input" in err and "analysis.json" in err
    for _ in range(2):  # beside the analysis it reads: written, then replaced on a rerun with --overwrite
        code, _, err = run(monkeypatch, capsys, "recommend", run_dir, "-o", run_dir / "plan.json", "--overwrite")
        assert code == 0, err
    plan = tmp_path / "plan.json"
    plan.write_text("mine")
    code, _, err = run(monkeypatch, capsys, "recommend", run_dir, "-o", plan)
    assert code == 2 and "--overwrite" in err and plan.read_text() == "mine"
    code, _, err = run(monkeypatch, capsys, "recommend", run_dir, "-o", plan, "--overwrite")
    assert code == 0 and plan.read_text() != "mine", err


def test_recommend_names_the_spectra_file_it_was_given_instead_of_an_analysis(monkeypatch, capsys, pair, tmp_path):
    import json

    code, _, _ = run(monkeypatch, capsys, "analyze", *pair, "--no-cache", "-o", tmp_path / "run", "-q")
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "run", "-o", tmp_path / "plan.json")
    assert code == 0, err
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "plan.json")
    assert code == 2 and "is a rank plan (`spectra recommend -o`), not an analysis" in err
    (tmp_path / "sweep.json").write_text(json.dumps({"kind": "truncation_sweep", "base": "b", "modules": []}))
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "sweep.json")
    assert code == 2 and "is a truncation sweep" in err
    (tmp_path / "odd.json").write_text(json.dumps({"config": {}, "base": "b", "modules": []}))
    code, _, err = run(monkeypatch, capsys, "recommend", tmp_path / "odd.json")
    assert code == 2 and "'base' must be an object" in err
    code, _, err = run(monkeypatch, capsys, "recommend", pair[0])
    assert code == 2 and "is a model folder, not an analysis: pass BASE TUNED" in err
    # show: a config.json read as "schema_version None; this spectra reads version 1", a sweep's folder as
    # "No such file … analysis.json"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code, _, err = run(monkeypatch, capsys, "show", tmp_path / "config.json")
    assert code == 2 and "is not an analysis spectra wrote (no schema_version)" in err
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text((tmp_path / "sweep.json").read_text())
    code, _, err = run(monkeypatch, capsys, "show", tmp_path / "sw")
    assert code == 2 and "holds no analysis.json but" in err and "a truncation sweep" in " ".join(err.split())
    # a plan option given an analysis, its folder or a sweep (read as "[Errno 21] Is a directory", "malformed")
    for given, said in ((tmp_path / "run", "It holds"), (tmp_path / "run" / "analysis.json", "is an analysis"),
                        (tmp_path / "sweep.json", "is a truncation sweep")):
        code, _, err = run(monkeypatch, capsys, "extract", *pair, "--plan", given, "-o", tmp_path / "ad")
        assert code == 2 and said in " ".join(err.split()) and not (tmp_path / "ad").exists(), err
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--plan", tmp_path / "plan.json", "-o", tmp_path / "ad")
    assert code == 0, err  # the plan itself


def test_debug_shows_traceback(monkeypatch, capsys, pair, tmp_path):
    from spectra.errors import CheckpointError

    monkeypatch.setattr(sys, "argv", ["spectra", "--debug", "analyze", str(pair[0]), str(tmp_path / "nope"), "-q"])
    with pytest.raises(CheckpointError):
        main()


def test_recommend_pair_then_extract_with_plan(monkeypatch, capsys, pair, tmp_path):
    monkeypatch.setenv("SPECTRA_CACHE", str(tmp_path / "cache"))
    plan = tmp_path / "plan.json"
    code, stdout, err = run(monkeypatch, capsys, "recommend", *pair, "--energy", "0.9", "-o", plan)
    assert code == 0, err
    assert plan.is_file() and "c_attn" in stdout
    # the reasons modules were left out are printed in brackets, which rich must not take for markup
    assert "left out" in stdout and "[unchanged" in stdout
    code, stdout, err = run(monkeypatch, capsys, "extract", *pair, "--plan", plan, "-o", tmp_path / "ad", "-q")
    assert code == 0, err
    assert (tmp_path / "ad" / "adapter_model.safetensors").is_file()


def test_extract_uniform_rank_form(monkeypatch, capsys, pair, tmp_path):
    code, stdout, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "2", "--roles", "q,k,v,o,up,down",
                            "-o", tmp_path / "ad")
    assert code == 0, err
    # the one changed module (c_attn); the unchanged ones are left out, said in a note
    assert "error ‖ΔW − s·BA‖_F" in stdout and "│ transformer.h.0.attn.c_attn" in stdout and "1 modules" in stdout
    assert "7 targeted module(s) unchanged (ΔW = 0) left out of the adapter" in err  # 8 modules, c_attn changed
    assert "load onto a GPT2LMHeadModel" in stdout
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "2", "--model-class", "GPT2ForNothing",
                       "-o", tmp_path / "ad4")
    assert code == 2 and "--model-class 'GPT2ForNothing'" in err and not (tmp_path / "ad4").exists()
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "-o", tmp_path / "ad2")
    assert code == 2 and "exactly one of --plan" in err and not (tmp_path / "ad2").exists()
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "99", "-o", tmp_path / "ad3")
    assert code == 2 and "exceeds min" in err and not (tmp_path / "ad3").exists()
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "2", "--roles", "q,foo", "-o", tmp_path / "ad5")
    assert code == 2 and "unknown role(s) foo; choose from q, k" in err and not (tmp_path / "ad5").exists()
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    for extra in (["--roles", "q"], ["--alpha", "3"], ["--rslora"]):  # ignored under --plan: refused
        code, _, err = run(monkeypatch, capsys, "extract", *pair, "--plan", plan, *extra, "-o", tmp_path / "ad6")
        assert code == 2 and f"{extra[0]} would be ignored" in err and not (tmp_path / "ad6").exists()


def test_natural_order_of_module_names():
    from spectra.checkpoints.names import natural_key

    names = ["model.layers.10.mlp", "model.layers.2.mlp", "model.layers.2.attn", "lm_head"]
    assert sorted(names, key=natural_key) == ["lm_head", "model.layers.2.attn", "model.layers.2.mlp", "model.layers.10.mlp"]


def test_pairs_lists_modules_in_order_with_experts_only_for_moe(monkeypatch, capsys, pair, tmp_path):
    code, stdout, _ = run(monkeypatch, capsys, "pairs", *pair)
    assert code == 0 and "│ h.0.attn.c_attn[q]" in stdout and "expert" not in stdout
    moe = save(build_model("mixtral"), tmp_path / "moe", "safetensors")
    code, stdout, _ = run(monkeypatch, capsys, "pairs", moe, moe, "--roles", "up")
    assert code == 0 and "┃ expert ┃" in stdout and "stack" not in stdout
    multimodal = save(build_model("gemma3_multimodal"), tmp_path / "mm", "safetensors")  # a vision tower: a stack column
    code, stdout, _ = run(monkeypatch, capsys, "pairs", multimodal, multimodal, "--roles", "q")
    assert code == 0 and "┃ stack " in stdout and "│ vision " in stdout and "│ language model " in stdout
    import shutil

    from safetensors.torch import load_file, save_file

    tuned = shutil.copytree(pair[1], tmp_path / "t")
    weights = load_file(tuned / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, tuned / "model.safetensors", metadata={"format": "pt"})
    code, stdout, _ = run(monkeypatch, capsys, "pairs", pair[0], tuned)  # what does not pair is said, not dropped
    assert code == 0 and "1 tensor(s) only in BASE, not paired: transformer.h.1.mlp.c_fc.weight" in stdout
    code, stdout, _ = run(monkeypatch, capsys, "pairs", *pair, "--layers", "1-1", "--exclude", "*mlp*")
    assert code == 0 and "┃ transformer.h.1.… " in stdout and "│ attn.c_attn[q]" in stdout and "mlp" not in stdout
    code, stdout, err = run(monkeypatch, capsys, "pairs", *pair, "--include", "zzz*")  # was an empty table, exit 0
    assert code == 2 and "no ΔW pair of" in err and "matches --include zzz*" in err and "┃" not in stdout


def test_module_table_orders_layers_naturally_and_prints_names_literally():
    from rich.console import Console

    from spectra.cli.tables import _module_table

    names = ["model.layers.10.mlp.up", "model.layers.2.mlp.up", "model.layers.2.attn.c_attn[q]"]
    table = _module_table("t [bold]x[/bold]", names, [("a",), ("b",), ("c",)], ("col",))
    console = Console(width=120, record=True)
    console.print(table)
    text = console.export_text()
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert [r.split("│")[1].strip() for r in rows] == ["2.attn.c_attn[q]", "2.mlp.up", "10.mlp.up"]
    assert "t [bold]x[/bold]" in text and "┃ model.layers.… " in text


def test_module_names_wrap_at_their_dots_in_a_narrow_terminal(monkeypatch):
    """At 80 columns the name column wrapped mid-word ("0.self_attn.k_p" / "roj"); it now breaks after a dot, and a
    wide terminal keeps every name on one line."""
    from rich.console import Console

    from spectra.cli.tables import _module_table, _wrap_dotted

    assert _wrap_dotted("0.self_attn.k_proj", 14) == "0.self_attn.\nk_proj"
    assert _wrap_dotted("0.mlp.down_proj", 15) == "0.mlp.down_proj" and _wrap_dotted("abcdefgh", 3) == "abcdefgh"
    names = [f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"]
    rows = [("k", "32×64", "4", "8", "100.0%", "384", "energy≥0.9")] * len(names)
    headers = ("role", "shape", "rank", "alpha", "energy", "params", "reason")
    for columns, one_line in ((80, False), (200, True)):
        monkeypatch.setenv("COLUMNS", str(columns))
        console = Console(width=columns, record=True)
        console.print(_module_table("t", names, rows, headers, fold=("reason",)))
        text = console.export_text()
        cells = [line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│")]
        assert ("0.self_attn.q_proj" in cells) == one_line, cells
        assert all(c.endswith(".") or c.endswith("_proj") or c == "" for c in cells), cells  # never mid-word
        assert max(map(len, text.splitlines())) <= columns


def test_paths_that_cannot_be_written_or_read_give_one_error_line(tmp_path):
    """Unwritable outputs are refused before any work; a non-UTF-8 data file and edited JSON are named."""
    import subprocess
    import sys

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    run = lambda *args: subprocess.run([sys.executable, "-m", "spectra.cli", *args], capture_output=True,  # noqa: E731
                                       text=True)
    out = run("analyze", str(tmp_path / "nothing"), str(tmp_path / "nothing"), "-o", str(blocker / "report"))
    assert out.returncode == 2 and "cannot write" in out.stderr and "Traceback" not in out.stderr
    edited = tmp_path / "analysis.json"
    edited.write_text('{"schema_version": 1, "modules": []}')
    out = run("show", str(edited))
    assert out.returncode == 2 and "not an analysis spectra wrote" in out.stderr and "Traceback" not in out.stderr


def test_data_that_is_not_text_is_named(tmp_path):
    from spectra.errors import ConfigError
    from spectra.lora.data import read_records

    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_records(binary, task="causal_lm")


def test_the_command_line_drops_bitsandbytes_missing_kernel_package_warning(caplog):
    """PEFT imports bitsandbytes, whose CPU backend warned on every extract/train/verify that the optional
    `kernels` package is missing; the CLI filters that one message and nothing else from its logger."""
    import logging

    from spectra.cli.messages import _quiet_third_party

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    before = list(logger.filters)
    try:
        _quiet_third_party()
        with caplog.at_level(logging.WARNING, logger=logger.name):
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please …", "no kernels")
            logger.warning("another bitsandbytes warning")
        assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
    finally:
        logger.filters[:] = before


def test_quiet_train_prints_no_library_progress_bars(pair, tmp_path):
    """`spectra train --full -q` printed transformers' "Writing model shards" bar; -q now silences the Hugging Face
    libraries' bars and warnings (the environment switches they read when first imported)."""
    data = tmp_path / "train.txt"
    data.write_text("\n".join(f"line {i} of some text to train on" for i in range(8)))
    args = [sys.executable, "-m", "spectra.cli", "train", str(pair[0]), "--data", str(data), "--full",
            "--max-steps", "1", "--batch-size", "2", "--max-length", "16"]
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY")}
    quiet = subprocess.run([*args, "-o", str(tmp_path / "q"), "-q"], capture_output=True, text=True, env=env)
    loud = subprocess.run([*args, "-o", str(tmp_path / "l")], capture_output=True, text=True, env=env)
    assert quiet.returncode == 0 and loud.returncode == 0, quiet.stderr + loud.stderr
    assert "Writing model shards" in loud.stderr  # negative control: without -q the bar is there
    assert "Writing model shards" not in quiet.stderr + quiet.stdout and "full: 1 step, " in quiet.stdout


def test_train_and_sweep_fit_the_default_length_to_a_short_position_table(monkeypatch, capsys, tmp_path):
    """`spectra train`/`sweep` passed --max-length 128 as if typed, so a BERT with 32 positions crashed in its forward
    (a traceback, exit 1); left unset the length is the model's 32, said in a note, and an explicit 128 is refused."""
    import json

    base = save(build_model("bert"), tmp_path / "bert", "safetensors")
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"a review of item {i}, " + "and more words " * 3,
                                        "label": ("pos", "neg")[i % 2]}) + "\n" for i in range(16)))
    train = ["train", base, "--data", data, "--rank", "4", "--max-steps", "1", "--batch-size", "8"]
    code, out, err = run(monkeypatch, capsys, *train, "-o", tmp_path / "out")
    assert code == 0 and "note: " in err and "cut at 32 tokens, not the default 128" in err, err
    code, _, err = run(monkeypatch, capsys, *train, "--max-length", "128", "-o", tmp_path / "long")
    assert code == 2 and "error: --max-length 128 is more than the model can take" in err
    tuned = save(build_model("bert", seed=1), tmp_path / "bert-tuned", "safetensors")
    code, _, err = run(monkeypatch, capsys, "sweep", base, tuned, "--data", data, "--ranks", "0,2", "-q",
                       "-o", tmp_path / "sweep")
    assert code == 0 and "cut at 32 tokens" in err, err


def test_analyze_prints_the_pairings_notes(monkeypatch, capsys, tmp_path):
    """report.md listed the pairing's notes (tied weights, resized vocabularies, skipped buffers); the terminal did
    not, so a user reading only it missed them. The first three are printed, with a count of the rest. (A resized
    vocabulary's note here: SigLIP's head.probe (1, 1, d), whose skip note this read before, is now a vector.)"""
    model = build_model("llama")
    base = save(model, tmp_path / "base", "safetensors")
    model.resize_token_embeddings(model.config.vocab_size + 8)
    tuned = save(model, tmp_path / "tuned", "safetensors")
    code, out, _ = run(monkeypatch, capsys, "analyze", base, tuned, "--roles", "q", "--no-cache",
                       "-o", tmp_path / "report")
    assert code == 0 and "note: model.embed_tokens: vocabulary resized, 8 rows added in tuned" in out, out
