"""Library fields as options in CLI messages, but not a user's own word that equals one: a data file or folder named
eval_data or max_steps (no '/', no extension) was printed back as --eval-data / --max-steps."""

from __future__ import annotations

from spectra.cli.messages import _cli_words
from tests.models import build_model, save
from tests.cli.test_cli import run


def test_a_value_the_user_typed_is_not_read_as_a_field(monkeypatch, capsys, tmp_path):
    base = save(build_model("gpt2"), tmp_path / "b", "safetensors")
    monkeypatch.chdir(tmp_path)
    for name in ("max_steps", "eval_data"):
        code, _, err = run(monkeypatch, capsys, "train", base, "--data", name, "-o", tmp_path / "out")
        assert code == 2 and f"--data file {name} does not exist" in err, err
    text = "cannot read eval_data: no such file"
    assert _cli_words(text, ["train", "b", "--eval-data", "eval_data"]) == text
    assert _cli_words(text, ["train", "b", "--eval-data=eval_data"]) == text
    assert _cli_words("eval_data@host:/x", ["train", "b"]) == "eval_data@host:/x"  # an address, not a field
    # negative controls: a field the user did not type as a value is still the command's option
    assert _cli_words(text, ["train", "b", "--eval-data", "data/eval.jsonl"]) == "cannot read --eval-data: no such file"
    assert _cli_words("max_steps=0 must be ≥ 1 (eval_data)", ["train", "b", "--data", "max_steps"]) == \
        "--max-steps 0 must be ≥ 1 (--eval-data)"  # assigned: a field, whatever was typed
