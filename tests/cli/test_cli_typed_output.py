"""What the commands print is in their own words and numbers: recommend's memory text names recommend's options
(--json's memory_skipped and notes said "seq_len (--seq-len) 99999", the memory library's argument), a number the
library derives from a typed option prints as the number (a plan's rank capped at --max-rank +2 printed "+2"), an
echo of the option prints as typed (sweep's ε=1e-5 printed "1e-05"), and --help names options, not fields
("alpha-rule=scale")."""

from __future__ import annotations

import json
import re


from spectra.cli.options import TypedFloat, TypedInt
from spectra.cli.plans import _memory_words
from spectra.cli.tables import _fmt
from tests.cli.test_cli import run
from tests.cli.test_cli_typed_numbers import _commands
from tests.cli.test_cli_ranks import _analysis_dir

# a GPT-2 config whose learned position table covers 64 tokens, and a Llama one with heads of 512 values (wider than
# FlashAttention takes: the kernel CUDA runs instead is not modelled, so the estimate notes that eager is)
_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": 128, "n_positions": 64,
         "bos_token_id": 1, "eos_token_id": 1}
_WIDE_HEADS = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 1,
               "num_key_value_heads": 1, "head_dim": 512, "intermediate_size": 64, "vocab_size": 128}


def _run_with(tmp_path, config: dict):
    run_dir = _analysis_dir(tmp_path)
    (tmp_path / "base" / "config.json").write_text(json.dumps(config))
    return run_dir


def test_recommends_memory_text_names_its_options(monkeypatch, capsys, tmp_path):
    report = _run_with(tmp_path, _GPT2)
    code, out, err = run(monkeypatch, capsys, "recommend", report, "--seq-len", "99999", "--json")
    assert code == 0, err
    skipped = json.loads(out)["memory_skipped"]
    assert skipped.startswith("--seq-len 99999 is more than the model can take"), skipped
    assert "Pass --seq-len 64 or less" in skipped and "seq_len" not in skipped  # was "seq_len (--seq-len) 99999"
    code, out, _ = run(monkeypatch, capsys, "recommend", report, "--seq-len", "99999")
    assert "memory: no estimate (--seq-len 99999 is more than" in " ".join(out.split())  # the table's line: the same
    code, out, err = run(monkeypatch, capsys, "recommend", report, "--json")
    notes = json.loads(out)["memory"]["notes"]
    assert any(n.startswith("--seq-len: 64 tokens per sequence, not the default 2048") for n in notes), notes
    assert not any("seq_len (" in n for n in notes), notes


def _wide_heads_analysis(tmp_path):
    """An analysis of _WIDE_HEADS's q and v (512 × 32 each), its base's config.json beside it."""
    from tests.ranks.rows import PLANTED, analysis, make_row

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(_WIDE_HEADS))
    data = analysis(make_row("model.layers.0.self_attn.q_proj", PLANTED, shape=(512, 32), layer=0),
                    make_row("model.layers.1.self_attn.v_proj", [4.0, 0.1, 0.1], shape=(512, 32), role="v", layer=1))
    data["base"] = {"path": str(base), "fingerprint": "abc"}
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "analysis.json").write_text(json.dumps(data))
    return run_dir


def test_an_option_only_memory_has_is_named_with_that_command(monkeypatch, capsys, tmp_path):
    """recommend has no --attention: the note that eager attention is estimated names `spectra memory`'s option
    (the table's "memory note:" line printed the library's attention='eager' too); memory itself names its own."""
    report = _wide_heads_analysis(tmp_path)
    code, out, err = run(monkeypatch, capsys, "recommend", report, "--json")
    assert code == 0, err
    (note,) = [n for n in json.loads(out)["memory"]["notes"] if "activations not estimated" in n]
    assert "--attention eager (of `spectra memory`) is estimated" in note and "attention='eager'" not in note, note
    code, out, _ = run(monkeypatch, capsys, "recommend", report)
    assert "--attention eager (of `spectra memory`) is estimated" in " ".join(out.split()), out
    code, out, err = run(monkeypatch, capsys, "memory", tmp_path / "base", "--json")
    assert code == 0, err
    (note,) = [n for n in json.loads(out)["notes"] if "activations not estimated" in n]
    assert "; --attention eager is estimated" in note and "attention='eager'" not in note, note
    code, out, _ = run(monkeypatch, capsys, "memory", tmp_path / "base")
    assert "; --attention eager is estimated" in " ".join(out.split()), out


def test_memory_words_leave_recommends_own_options_and_prose():
    # negative controls: an option recommend has stays its own; a value followed by an option is not a field
    assert _memory_words("batch (--batch) must be a positive integer, got 0.") == "--batch must be a positive " \
                                                                                    "integer, got 0."
    text = "nothing quantised. Estimate method lora (--method lora): a 16-bit base"
    assert _memory_words(text) == text
    assert _memory_words("attention='eager' (--attention eager) is estimated") == \
        "--attention eager (of `spectra memory`) is estimated"


def _rank_cells(output: str) -> list[str]:
    """The rank column of recommend's table (role, shape, rank, …), one cell per module row."""
    return [cells[4].strip() for line in output.splitlines() if "self_attn" in line
            for cells in [line.split("│")] if len(cells) > 5]  # │ name │ role │ shape │ rank │


def test_a_rank_derived_from_a_typed_option_prints_as_the_number(monkeypatch, capsys, tmp_path):
    """--max-rank +2 caps the q_proj row (min() returns the option's own value): the table printed "+2"; --rank 02 and
    --min-rank 02 printed "02" in every row. The echo in a refusal is still as typed."""
    report = _analysis_dir(tmp_path)
    for args, ranks in ((["--max-rank", "+2"], ["2", "1"]), (["--rank", "02"], ["2", "2"]),
                        (["--min-rank", "02", "--energy", "0.5"], ["2", "2"])):
        code, out, err = run(monkeypatch, capsys, "recommend", report, *args)
        assert code == 0 and _rank_cells(out) == ranks, (args, out, err)
    # negative control: a refusal names the option as typed
    code, _, err = run(monkeypatch, capsys, "recommend", report, "--rank", "099")
    assert code == 2 and "--rank 099 exceeds min(d_in, d_out) = 32" in err, err
    # the run's settings in a title are its numbers too: "batch 02 × 0128 tokens" before
    code, out, err = run(monkeypatch, capsys, "recommend", report, "--batch", "02", "--seq-len", "0128")
    assert code == 0 and "memory (lora, batch 2 × 128 tokens, bf16)" in out, (out, err)
    code, out, err = run(monkeypatch, capsys, "memory", tmp_path / "base", "--batch", "+2", "--seq-len", "0128")
    assert code == 0 and "batch 2 × 128 tokens" in " ".join(out.split()), (out, err)


def test_bench_train_reports_its_steps_as_the_number(monkeypatch, capsys, tmp_path):
    """bench train's report says "{steps} timed steps": --steps 020 wrote "020 timed steps" into train.md."""
    import spectra.bench.train

    seen = {}
    monkeypatch.setattr(spectra.bench.train, "run_train_bench", lambda out, **kwargs: seen.update(kwargs) or out)
    code, _, err = run(monkeypatch, capsys, "bench", "train", "--quick", "--steps", "020", "-o", tmp_path)
    assert code == 0 and seen["steps"] == 20 and f"{seen['steps']} timed steps" == "20 timed steps", (seen, err)


def test_typed_numbers_compare_and_print_the_operand_min_max_returns():
    plus, padded = TypedInt("+3"), TypedInt("08")
    assert min(plus, padded) == 3 and max(plus, padded) == 8 and sorted([padded, plus, 5]) == [3, 5, 8]
    assert str(min(plus, 10)) == "+3" and str(max(TypedFloat("1e-3"), 0.0)) == "1e-3"  # an echo: as typed
    assert (_fmt(min(plus, 10)), _fmt(TypedFloat("9e-1")), _fmt(None), _fmt("q"), _fmt(7)) == ("3", "0.9", "", "q", "7")


def test_sweep_echoes_epsilon_as_typed(monkeypatch, capsys, pair, tmp_path):
    data = tmp_path / "eval.txt"
    data.write_text("some text to evaluate on\n" * 4)
    code, out, err = run(monkeypatch, capsys, "sweep", *pair, "--data", data, "--ranks", "0", "--bootstrap", "0",
                         "--epsilon", "1e-5", "-o", tmp_path / "sweep")
    assert code == 0, err
    assert "functional rank (model, ε=1e-5):" in out and "1e-05" not in out, out  # it said ε=1e-05


def test_help_names_options_not_fields():
    """recommend's --scale and --alpha said "for alpha-rule=scale"; verify's --stacks said "Default: every stack",
    where its sweep trains train's default (the stacks text runs through)."""
    helps = {(*path, p.name): p.help or "" for path, c in _commands() for p in c.params}
    fields = {key: re.findall(r"(?<![\w-])[a-z][a-z_-]*=[\w'\"]", text) for key, text in helps.items()}
    assert not {key: found for key, found in fields.items() if found}
    assert "under --alpha-rule scale" in helps[("recommend", "scale")]
    assert "under --alpha-rule constant" in helps[("recommend", "alpha")]
    assert "every stack" not in helps[("verify", "stacks")] and "train" in helps[("verify", "stacks")]
    assert "default: 256 for randomized" in helps[("analyze", "max_rank")]
    assert "default 5e-4" in helps[("verify", "lr")]


def test_extract_reads_its_rank_as_an_int_option(monkeypatch, capsys, pair, tmp_path):
    """extract --rank ('full' or an integer) took str.isdigit() text: "²" passed it and was a ValueError traceback,
    "+2" was refused though every other int option takes it. Now an int option's text, the number passed on."""
    import json as _json

    code, out, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "²", "-o", tmp_path / "a")
    assert code == 2 and err.startswith("error: --rank '²': expected a positive integer or 'full'.\n"), err
    code, _, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "-01", "-o", tmp_path / "a")
    assert code == 2 and err.startswith("error: --rank must be ≥ 1, got -01.\n"), err  # as typed
    code, out, err = run(monkeypatch, capsys, "extract", *pair, "--rank", "+2", "-o", tmp_path / "b")
    assert code == 0, err
    assert _json.loads((tmp_path / "b" / "adapter_config.json").read_text())["r"] == 2
    ranks = {line.split("│")[2].strip() for line in out.splitlines() if line.count("│") > 5 and "h." in line}
    assert ranks == {"2"}, out  # the table's rank column: the number
