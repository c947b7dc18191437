"""Every refusal at the command line names the option as typed, with the value typed: not the library's argument it
fills (`repeats`, rank_plan_or_rank, layers_to_transform, RankPolicy.budget_params, shard_bytes), not a converted
value (--shard-mb -3 as -3145728 bytes, --layers 99-100 as (99, 100), --budget 0.5 as 0), not Python's words (or
None, ('full', 'lora')) and never a traceback. Each case below is what a scripted sweep of every number and choice
option found (what the message said before is the `before` column)."""

from __future__ import annotations

import pickle

import pytest

from spectra.cli.messages import _cli_words
from spectra.cli.options import TypedLayers, _typed_seed
from tests.cli.test_cli import run


@pytest.fixture(scope="module")
def report(tmp_path_factory, pair):
    from spectra.analysis import analyze

    out = tmp_path_factory.mktemp("option-names") / "run"
    analyze(pair[0], pair[1], cache_dir=False, progress=False).write_report(out)
    return out


# (arguments, what the refusal says now, what it said before: absent now)
_REFUSED = [
    (["bench", "svd", "--quick", "--repeats", "0", "-o", "{o}"], "error: --repeats must be ≥ 1, got 0.\n",
     "`repeats`"),
    (["bench", "svd", "--quick", "--seed=-1", "-o", "{o}"], "error: --seed must be ≥ 0, got -1.\n",
     "random_state"),  # a traceback from scikit-learn's randomized_svd
    (["bench", "svd", "--shapes", "32x48x2", "--kinds", "planted", "--ks", "2", "-o", "{o}"],
     "error: --shapes '32x48x2': '32x48x2' is not OUTxIN; expected OUTxIN shapes like 1024x1024,768x2304", "unpack"),  # a traceback
    (["bench", "svd", "--shapes", "0x5", "--kinds", "planted", "--ks", "2", "-o", "{o}"],
     "error: --shapes '0x5': 0 is less than 1; expected OUTxIN shapes", "`M` is empty"),
    (["bench", "svd", "--shapes", "abc", "-o", "{o}"], "error: --shapes 'abc': 'abc' is not OUTxIN; expected OUTxIN",
     "invalid literal for int()"),
    (["bench", "svd", "--shapes", "32x48", "--kinds", "planted", "--ks", "0", "-o", "{o}"],
     "error: --ks '0': 0 is less than 1; expected top-k sizes like 64,256", "n_components"),
    (["bench", "svd", "--quick", "--kinds", "planted,bogus", "-o", "{o}"],
     "error: --kinds: unknown spectrum kind(s) bogus; choose from planted, power_law, bf16.\n", "('planted'"),
    (["bench", "train", "--quick", "--steps", "0", "-o", "{o}"], "error: --steps must be ≥ 1, got 0.\n",
     "median"),  # a traceback: no median for empty data
    (["bench", "make-pair", "{o}", "--shape", "llama-tiny", "--shard-mb=-3"],
     "error: --shard-mb must be ≥ 1, got -3.\n", "3145728"),  # "shard_bytes must be ≥ 64 KiB, got -3145728"
    (["bench", "e2e", "--quick", "--skip", "full", "--peer-timeout=-1", "-o", "{o}", "--work", "{o}"],
     "error: --peer-timeout must be > 0 seconds, got -1.\n", "wrote"),  # accepted: every peer stopped at once
    (["memory", "{b}", "--rank", "0"], "error: --rank must be ≥ 1, got 0.\n", "rank_plan_or_rank"),
    (["memory", "{b}", "--layers", "99-100"],
     "error: --layers must name layers of this 2-layer model (0 … 1), got 99-100.\n", "(99, 100)"),
    (["memory", "{b}", "--method", "bogus"], "error: --method must be one of (full, lora, qlora, dora), got 'bogus'.\n",
     "'full'"),
    (["memory", "{b}", "--precision", "fp8"], "error: --precision must be one of (fp32, bf16, fp16, mixed), got 'fp8'.",
     "'fp32'"),
    (["recommend", "{r}", "--budget", "0.5"],
     "error: --budget '0.5' is less than one parameter; give a positive budget like 20M or 2GB.\n", "budget_params"),
    (["recommend", "{r}", "--budget", "0"], "error: --budget '0' is less than one parameter", "budget_params"),
    (["recommend", "{r}", "--budget", "1B"], "error: --budget '1B': expected parameters like 20M or 1.5e6, or bytes "
     "like 2GB or 512MiB (a bare B is refused: billions or bytes?).\n", "Cannot read budget"),
    (["recommend", "{r}", "--rank", "0"], "error: --rank must be a positive integer, got 0.\n", "None"),
    (["recommend", "{r}", "--max-rank", "0"], "error: --max-rank must be a positive integer, got 0.\n", "None"),
    (["recommend", "{r}", "--alpha-rule", "bogus"], "error: --alpha-rule must be one of (scale, constant), got "
     "'bogus'.\n", "('scale'"),
    (["analyze", "{b}", "{t}", "--no-cache", "--max-rank", "0", "-o", "{o}"],
     "error: --max-rank: 0 must be ≥ 1 (or leave it out for no cap).\n", "None"),
    (["analyze", "{b}", "{t}", "--no-cache", "--workers", "0", "-o", "{o}"],
     "error: --workers 0 must be ≥ 1 (or leave it out for one per torch thread, up to 4).\n", "None"),
    (["verify", "{b}", "{t}", "--sweep", "1", "--data", "{d}", "--recommended", "0", "-o", "{o}"],
     "error: --recommended must be ≥ 1, got 0.\n", "report:"),  # accepted: rank 0, never swept, marked
    # a seed outside 0 … 2⁶⁴ − 1: tracebacks from torch.manual_seed (2**64) and numpy's SeedSequence (-1)
    (["analyze", "{b}", "{t}", "--no-cache", "--seed", str(2**64), "-o", "{o}"],
     f"error: --seed '{2**64}': expected a seed, an integer from 0 to {2**64 - 1}.\n", "Overflow"),
    (["sweep", "{b}", "{t}", "--data", "{d}", "--ranks", "1", "--seed=-1", "-o", "{o}"],
     f"error: --seed '-1': expected a seed, an integer from 0 to {2**64 - 1}.\n", "non-negative"),
    (["train", "{b}", "--data", "{d}", "--max-steps", "1", "--seed", str(2**70), "-o", "{o}"],
     f"error: --seed '{2**70}': expected a seed", "Overflow"),
    (["bench", "make-pair", "{o}", "--shape", "llama-tiny", "--rank-scale", "inf"],
     "error: --rank-scale must be a finite number > 0, got inf.\n", "Overflow"),  # a traceback
    (["recommend", "{r}", "--budget", "1e400"],
     "error: --budget '1e400' is too large to count; give a budget like 20M or 2GB.\n", "Overflow"),  # a traceback
]


def _case(args: list[str]) -> str:  # "bench svd --shapes 0x5", "memory --layers 99-100"
    return " ".join(a for a in args if "{" not in a and a not in ("-o", "--no-cache", "--quick", "--work"))


@pytest.mark.parametrize("args, said, before", _REFUSED, ids=[_case(a) for a, _, _ in _REFUSED])
def test_a_refusal_names_the_option_and_the_value_as_typed(monkeypatch, capsys, pair, report, tmp_path, args, said,
                                                           before):
    data = tmp_path / "data.txt"
    data.write_text("hello world, some text\n" * 8)
    fill = {"b": pair[0], "t": pair[1], "r": report, "d": data, "o": tmp_path / "out"}
    code, out, err = run(monkeypatch, capsys, *[a.format(**fill) for a in args])
    assert code == 2 and said in err, err
    assert before not in err + out, err
    assert "Traceback" not in err and "(run with --debug for the full traceback)" in err  # one line, no traceback
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_valid_value_beside_each_refused_one_is_taken(monkeypatch, capsys, pair, report):
    """Negative control: the refusals above bound the options, they do not refuse what the options take."""
    for args in (["memory", pair[0], "--rank", "1"], ["memory", pair[0], "--layers", "1-1"],
                 ["recommend", report, "--budget", "0.5M"], ["recommend", report, "--rank", "1"]):
        code, _, err = run(monkeypatch, capsys, *args)
        assert code == 0, (args, err)


def test_recommends_memory_note_names_the_option(monkeypatch, capsys, report):
    """recommend still plans when the memory estimate refuses (the estimate is an extra), and says why; that reason
    said "seq_len (--seq-len) 999999 … Pass seq_len (--seq-len) 32 or less"."""
    code, out, err = run(monkeypatch, capsys, "recommend", report, "--seq-len", "999999")
    said = " ".join(out.split())
    assert code == 0, err
    assert "memory: no estimate (--seq-len 999999 is more than the model can take" in said, said
    assert "Pass --seq-len 32 or less" in said and "seq_len" not in said, said


def test_sweeps_notes_name_the_option(monkeypatch, capsys, pair, tmp_path):
    """sweep's and train's notes were printed in the library's words: "max_length (--max-length): examples are cut at
    32 tokens"."""
    data = tmp_path / "data.txt"
    data.write_text("hello world, some text\n" * 8)
    code, _, err = run(monkeypatch, capsys, "sweep", *pair, "--data", data, "--ranks", "1", "--bootstrap", "0", "-q",
                       "-o", tmp_path / "sweep")
    assert code == 0, err
    assert "note: --max-length: examples are cut at 32 tokens" in err and "max_length" not in err, err


def test_python_words_become_the_command_lines():
    """The rewriting itself: a field left out is an option left out, a tuple of choices is the choices; prose and a
    field the command has no option for stay as they are (negative controls)."""
    assert _cli_words("RankPolicy.max_rank must be a positive integer or None, got 0.", ["recommend", "r"]) == \
        "--max-rank must be a positive integer, got 0."
    assert _cli_words("max_rank: 0 must be ≥ 1 (or None for no cap).", ["analyze", "b", "t"]) == \
        "--max-rank: 0 must be ≥ 1 (or leave it out for no cap)."
    assert _cli_words("optimizer must be one of ('adamw', 'sgd'), got 'x'.", ["memory", "m"]) == \
        "--optimizer must be one of (adamw, sgd), got 'x'."
    assert _cli_words("layers_to_transform must name layers, got 3-4.", ["memory", "m"]) == \
        "--layers must name layers, got 3-4."
    assert _cli_words("the names ('a', 'b') and None of them", ["memory", "m"]) == "the names ('a', 'b') and None of them"
    assert _cli_words("RankPolicy.budget_params must be positive.", ["memory", "m"]) == \
        "RankPolicy.budget_params must be positive."  # memory has no --budget


def test_a_seed_is_taken_across_its_whole_range():
    """Negative control of the seed refusals: the range's ends are seeds, and print as typed."""
    assert _typed_seed("0") == 0 and _typed_seed(str(2**64 - 1)) == 2**64 - 1 and repr(_typed_seed("007")) == "007"


def test_typed_layers_are_the_layers_and_print_as_typed():
    layers = TypedLayers(range(2, 5), "2-4")
    assert layers == (2, 3, 4) and tuple(layers) == (2, 3, 4) and f"got {layers!r}" == "got 2-4" == f"got {layers}"
    copy = pickle.loads(pickle.dumps(layers))
    assert copy == (2, 3, 4) and repr(copy) == "2-4"
