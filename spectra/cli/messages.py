"""The command line's words: library errors and notes in the options of the command that was run, and third-party
output kept out of the terminal. (A number option's value is named as typed by the value itself: options.TypedFloat.)"""

from __future__ import annotations

import os
import re

import typer


def _quiet_third_party(*, quiet: bool = False) -> None:
    """Drop bitsandbytes' import-time warning that its optional CPU 4-bit kernel package is not installed,
    and under ``-q``/``--quiet`` the progress bars and warnings of Hugging Face libraries too.

    PEFT imports bitsandbytes, so every extract/train/verify printed "Failed to load CPU
    gemm_4bit_forward from kernels-community" although nothing needed it; QLoRA on the CPU
    works without it (bitsandbytes falls back to its own kernel). With ``-q``, transformers'
    "Writing model shards" bars and load reports ("Notes: UNEXPECTED …") went on printing:
    both read their switches from the environment when first imported, which the commands
    do lazily, after this. Only the command line does this: a library user keeps the
    libraries' logging as configured.
    """
    import logging

    if quiet:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: "gemm_4bit_forward from kernels-community" not in str(record.msg))


# library fields whose option has another name: analyze's --energy fills AnalysisConfig.thresholds, --skip-nonfinite
# its on_nonfinite='skip'; sweep's --epsilon is the functional policy's ε (recommend's --functional)
# memory's --layers fills layers_to_transform; recommend's --budget fills budget_params or budget_bytes
_FIELD_OPTIONS = {"thresholds": "energy", "on_nonfinite": "skip_nonfinite", "functional": "epsilon",
                  "layers_to_transform": "layers", "budget_params": "budget", "budget_bytes": "budget"}
# Python's words for an option left out and for a set of choices: "a positive integer or None", "(or None for no
# cap)", "one of ('full', 'lora')"; a user leaves the option out and types the choices unquoted
_NONE = re.compile(r" or None(?=[,.;)])")
_NONE_FOR = re.compile(r"\(or None for ")
_CHOICES = re.compile(r"(?:(?<=one of )|(?<=from ))\('[^']*'(?:, '[^']*')+\)")
# a library field as an error names it: RankPolicy.energy, workers=0, on_nonfinite='skip', max_rank
# (never inside a path or a dotted name: /data/eval_data/x.txt, model.layers.0.mlp.gate_proj, max_length.txt)
_FIELD = re.compile(r"(?<![\w./\\@-])(?:(?:RankPolicy|[A-Z]\w*Config)\.)?([a-z][a-z0-9]*(?:_[a-z0-9]+)*)"
                    r"(?![\w/\\@-]|\.\w)(?:=('[^']*'|[^\s,;:)]+))?")  # nor an address: eval_data@host


def _cli_message(err: Exception, argv: list[str]) -> str:
    """A library error in the words of the command that was run (`argv`, without the program): the configuration
    fields it names become the command's options (``workers=0`` → ``--workers 0``, ``RankPolicy.energy`` →
    ``--energy``, ``max_rank`` → ``--max-rank``), and the NaN/Inf error's hint names --skip-nonfinite only where the
    command has it. A field is read as one where it is qualified, assigned, holds an underscore or opens the
    message: a plain word ("the rank of") stays prose, and so does a bare word the user typed as a value (a folder
    named eval_data). A field the command has no option for stays as it is."""
    from spectra.errors import NonFiniteWeightError

    text = str(err)
    if isinstance(err, NonFiniteWeightError) and "skip_nonfinite" not in _command_options(argv):
        from spectra.checkpoints.pairing import SKIP_NONFINITE_HINT  # a broken checkpoint: re-saved, not skipped

        text = text.replace(" " + SKIP_NONFINITE_HINT, "")
    return _cli_words(text, argv)


def _command(argv: list[str]):
    """The click command `argv` runs (typer's own copy of click: asked by what it holds), None where `argv` names
    a group or no command."""
    from spectra.cli import app  # the package's: it imports this module before it makes the app

    words = [a for a in argv if not a.startswith("-")]
    command = typer.main.get_command(app)
    for name in words[:2]:
        if not hasattr(command, "commands"):
            break
        command = command.commands.get(name)
        if command is None:
            return None
    return None if hasattr(command, "commands") else command


def _command_options(argv: list[str]) -> dict[str, tuple[str, bool, str | None]]:
    """The options of the command `argv` runs: parameter name → (its --option, whether a flag, its --no- form)."""
    command = _command(argv)
    if command is None:
        return {}
    return {p.name: (max((o for o in p.opts if o.startswith("--")), key=len), p.is_flag,
                     next(iter(p.secondary_opts), None))  # --no-noise of --noise
            for p in command.params if p.param_type_name == "option" and any(o.startswith("--") for o in p.opts)}


def _cli_words(text: str, argv: list[str]) -> str:
    """`text` (an error or a note of the library) with the fields it names as the options of the command `argv`
    runs (see :func:`_cli_message`)."""
    options = _command_options(argv)
    # what the user typed as values (a path `eval_data`, --output=max_steps): a bare word equal to one is theirs,
    # named back to them ("cannot read eval_data: no such file"), not the field of the same name
    typed = {a.split("=", 1)[1] if a.startswith("-") else a for a in argv if not a.startswith("-") or "=" in a}

    def option(match: re.Match) -> str:
        field, value = match.group(1), match.group(2)
        name = field if field in options else _FIELD_OPTIONS.get(field)
        bare = match.group(0) == field
        named = not bare or ("_" in field or match.start() == 0) and field not in typed  # a field, not prose
        if name not in options or not named:
            return match.group(0)
        flag, is_flag, off = options[name]
        if is_flag:  # noise=False: --no-noise
            return off if value == "False" and off else flag
        return flag if value is None else f"{flag} {value}"

    if "overwrite" not in options:  # demo replaces its own output unasked: it has no --overwrite to name
        text = re.sub(r"overwrite=True replaces only a directory that (`spectra [^`]+`) wrote",
                      r"\1 replaces only a directory it wrote", text)
    text = _FIELD.sub(option, text)
    text = _NONE_FOR.sub("(or leave it out for ", _NONE.sub("", text))
    text = _CHOICES.sub(lambda m: m.group(0).replace("'", ""), text)  # (full, lora, qlora, dora)
    # "--max-length (--max-length) 128", "--overwrite (CLI: --overwrite)": the option once; "--attention 'eager'
    # (--attention eager)" (the library's attention='eager' with the option as typed): once, as typed
    return re.sub(r"(--[\w-]+)((?: [^\s()]+)?) \((?:CLI: )?\1((?: [^\s()]+)?)\)",
                  lambda m: m.group(1) + (m.group(3) or m.group(2)), text)
