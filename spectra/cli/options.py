"""What the commands share of option parsing: comma lists, --stacks, --layers, the check of -o before any work, and
the help texts several commands give one option."""

from __future__ import annotations

import os
from pathlib import Path

from spectra.checkpoints.architectures import STACKS, parse_stacks  # no torch: the names --stacks takes


# --stacks of every command with --roles: the stacks by the names the reports print (architectures.STACK_NAMES)
_STACKS_HELP = ("Comma-separated stacks to keep, with --roles: language (the language model; reports call it "
                f"'language model', or 'decoder' beside an encoder), {', '.join(STACKS)} — what a report's "
                "'vision q' starts with. E.g. --roles q,v "
                "--stacks language: the language model's q and v, not the vision tower's (--roles alone takes "
                "both, as PEFT's target_modules do); --stacks vision: the vision tower only. Default: every stack.")
# --task of train and sweep: the choices, and what each wants of the data
_TASK_HELP = ("auto (default: seq2seq_lm for an encoder-decoder such as T5 or BART, else seq_cls when every record has "
              "a label, else causal_lm), causal_lm (text: .txt, or {\"text\"} records), seq_cls ({\"text\", \"label\"} "
              "records) or seq2seq_lm (an encoder-decoder learns to write target from source: .jsonl of "
              "{\"source\": ..., \"target\": ...} records, or .csv/.tsv with source,target columns; the loss is over "
              "target tokens).")

_OVERWRITE_HELP = ("Replace an existing output directory that this command wrote, or an empty one; a folder holding "
                   "any other file is refused, naming it.")


def _split(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(v.strip() for v in value.split(",") if v.strip())


def _stacks(value: str | None) -> tuple[str, ...] | None:
    """--stacks as the library spells it (decoder → language); an unknown stack refused, naming the option."""
    return parse_stacks(value, option="--stacks")


def _layer_range(value: str | None) -> tuple[int, int] | None:
    from spectra.errors import ConfigError

    if value is None:
        return None
    first, sep, last = value.partition("-")
    try:
        span = (int(first), int(last if sep else first))
    except ValueError:
        raise ConfigError(f"--layers {value!r}: expected FIRST-LAST, e.g. 0-11, or one layer, e.g. 5.") from None
    if not 0 <= span[0] <= span[1]:
        raise ConfigError(f"--layers {value!r}: FIRST-LAST with 0 ≤ FIRST ≤ LAST, e.g. 0-11.")
    return span


def _writable(output: Path | None, *inputs, command: str | None = None, overwrite: bool = False) -> None:
    """Refuse, before any work, an output whose folder cannot be written (outputs are staged beside it, then renamed),
    one that would replace an input (the output is, holds or lies inside one of `inputs`), and, for a `command` that
    writes a directory, an existing one unless --overwrite is given and it holds only what `command` writes
    (``files.OUTPUTS``, the table the library's writers read); without `command` (a file output) an existing
    directory there is refused."""
    from spectra.errors import ConfigError
    from spectra.files import refuse_replacing_inputs, refuse_replacing_others

    if output is None:
        return
    refuse_replacing_inputs(output, inputs)
    if command is not None:
        refuse_replacing_others(output, command=command, overwrite=overwrite)
    elif output.is_dir():
        raise ConfigError(f"-o {output} is a directory; this command writes a file there. Choose another -o.")
    elif output.exists() and not overwrite:
        raise ConfigError(f"-o {output} exists; pass --overwrite to replace it or choose another -o.")
    folder = output.absolute().parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if folder.exists() and not (folder.is_dir() and os.access(folder, os.W_OK)):
        raise ConfigError(f"cannot write {output}: {folder} is not a folder this user may write to. Choose another "
                          "-o/--output.")
