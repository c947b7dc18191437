"""--help never cuts an option's name: a switch's --no- name goes under its name where side by side they would be cut."""

from __future__ import annotations

import re

import pytest

from tests.cli.test_cli import run

COMMANDS = ("pairs", "demo", "analyze", "show", "recommend", "extract", "memory", "train", "verify", "sweep",
            "bench svd", "bench train", "bench verify", "bench make-pair", "bench e2e")
CUT = re.compile(r"-[\w-]*…")  # an option's name with rich's ellipsis: "--gradient-checkpoi…"


def help_text(monkeypatch, capsys, command: str, columns: int) -> str:
    code, out, err = run(monkeypatch, capsys, *command.split(), "--help", columns=columns)
    assert code == 0, err
    return out


def test_switch_names_are_whole_at_80_columns(monkeypatch, capsys):
    """`spectra memory --help` at 80 columns printed `--gradient-checkpoi…    --no-gradient-chec…`."""
    out = help_text(monkeypatch, capsys, "memory", 80)
    for name in ("--gradient-checkpointing", "--no-gradient-checkpointing", "--input-require-grads",
                 "--no-input-require-grads", "--double-quant", "--no-double-quant", "--use-cache", "--no-use-cache"):
        assert re.search(rf"(?<![\w-]){name}(?![\w-])", out), name
    assert not CUT.search(out) and max(map(len, out.splitlines())) <= 80
    lines = out.splitlines()  # the --no- name under its name, the help beside them
    at = next(i for i, line in enumerate(lines) if "--gradient-checkpointing" in line)
    assert "Checkpoint every block" in lines[at] and "--no-gradient-checkpointing" in lines[at + 1]
    out = help_text(monkeypatch, capsys, "recommend", 80)  # "--no-power-of-t…" there
    assert re.search(r"--power-of-two +<bool> +Round ranks", out) and "--no-power-of-two" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_cuts_an_option_name_at_80_columns(monkeypatch, capsys, command):
    out = help_text(monkeypatch, capsys, command, 80)
    assert not CUT.search(out), CUT.findall(out)
    assert max(map(len, out.splitlines())) <= 80


def test_switch_names_stay_side_by_side_where_they_fit(monkeypatch, capsys):
    """Negative control: in a wide terminal the table is typer's own, each switch's two names on one line."""
    out = help_text(monkeypatch, capsys, "memory", 100)
    assert re.search(r"--gradient-checkpointing +--no-gradient-checkpointing +<bool> +Checkpoint every block", out)
    assert re.search(r"--input-require-grads +--no-input-require-grads +<bool>", out)
    out = help_text(monkeypatch, capsys, "recommend", 120)
    assert re.search(r"--power-of-two +--no-power-of-two +<bool> +Round ranks up to powers of two", out)
