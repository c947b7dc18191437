"""What the commands share of option parsing: numbers as typed, comma lists, --stacks, --layers, the check of -o
before any work, and the help texts several commands give one option."""

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


class _AsTyped:
    """A number option's value that prints as the user typed it: ``--energy 2`` is refused as "got 2", not as the
    float's "2.0" (``--energy 1e-3``: "1e-3", ``--rank +3``: "+3"), with no rewriting of the message. It is the number
    in all else: it compares, hashes and computes as one, and JSON writes the number (``json`` prints floats and ints
    by ``float.__repr__`` and ``int.__repr__``)."""

    text: str

    def __new__(cls, text: str):
        number = super().__new__(cls, text)  # float(text) or int(text): ValueError where text is no such number
        number.text = text.strip()
        return number

    def __repr__(self) -> str:  # f"got {x}" and f"got {x!r}" alike; a format spec (f"{x:g}") formats the number
        return self.text

    __str__ = __repr__

    def __reduce__(self):  # copy, deepcopy (dataclasses.asdict) and pickle keep the text
        return type(self), (self.text,)


class TypedFloat(_AsTyped, float):
    """A float option's number, printed as typed (see :class:`_AsTyped`)."""


class TypedInt(_AsTyped, int):
    """An int option's number, printed as typed (see :class:`_AsTyped`)."""


class TypedLayers(tuple):
    """--layers FIRST-LAST as the layer numbers it spans, printed as typed: ``--layers 99-100`` on a 2-layer model is
    refused as "got 99-100", not as the tuple's "(99, 100)" (see :class:`_AsTyped`)."""

    text: str

    def __new__(cls, layers, text: str):
        span = super().__new__(cls, layers)
        span.text = text
        return span

    def __repr__(self) -> str:
        return self.text

    __str__ = __repr__

    def __reduce__(self):
        return type(self), (tuple(self), self.text)


class _NotANumber(ValueError):
    """Text a number option cannot read; :func:`_number_refusal` names the option (typer's parser is given the text
    alone). `problem` says which item of a list is at fault, as typed (``'x' is not an integer``)."""

    def __init__(self, text: str, expected: str, problem: str | None = None) -> None:
        super().__init__(f"{text!r}: " + (f"{problem}; " if problem else "") + f"expected {expected}.")
        self.text, self.expected = text, expected


def _typed(typed: type, number: type, value):
    if not isinstance(value, str):  # the declared default: typer passes it through the parser too (900 → 900.0)
        return number(value)
    try:
        return typed(value)
    except ValueError:
        raise _NotANumber(value, "a number" if number is float else "an integer") from None


def _typed_float(value) -> float:
    """The ``parser=`` of every float option: the typed text as a :class:`TypedFloat`."""
    return _typed(TypedFloat, float, value)


def _typed_int(value) -> int:
    """The ``parser=`` of every int option: the typed text as a :class:`TypedInt`."""
    return _typed(TypedInt, int, value)


# a seed seeds torch (manual_seed: at most 2⁶⁴ − 1) and numpy (SeedSequence: no negative number): --seed -1 and
# --seed 2**64 were tracebacks from one or the other
_SEED_RANGE = (0, 2**64 - 1)


def _typed_seed(value) -> int:
    """The ``parser=`` of every --seed (bench svd's, which scikit-learn bounds lower, has its own range): an int
    option's number, refused as typed outside 0 … 2⁶⁴ − 1."""
    seed = _typed_int(value)
    if not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise _NotANumber(str(value), f"a seed, an integer from {_SEED_RANGE[0]} to {_SEED_RANGE[1]}")
    return seed


class _NumberList:
    """The ``parser=`` of an option that takes comma-separated numbers (``--ranks 1,2,4,8``): each item read as a
    number option's text is (:func:`_typed_int`, :func:`_typed_float`), so each prints as typed, into a tuple. A list
    with an item that is no such number (``4,x``, ``4.5``, ``true``), an empty item (``4,,8``; one trailing comma,
    ``1,2,4,``, is taken), no item at all (``''``, ``,``) or an item below `least` (``4,-1``) is refused naming the option, the list and the item as typed:
    ``--ranks '4,x': 'x' is not an integer; expected comma-separated ranks ≥ 0 like 0,1,2,4,8.`` With a `form` such
    as "OUTxIN", each item is that many numbers joined by "x" (``--shapes 1024x1024,768x2304``), a tuple of them."""

    def __init__(self, number: type, expected: str, *, least: int | None = None, form: str | None = None) -> None:
        self.number, self.expected, self.least, self.form = number, expected, least, form

    def __call__(self, value) -> tuple:
        if not isinstance(value, str):  # a declared default that is no text: the numbers it holds
            return tuple(value)
        items = value.split(",")
        if not value.strip():
            raise _NotANumber(value, self.expected, "nothing given")
        if len(items) > 1 and not items[-1].strip():
            items = items[:-1]  # one trailing comma (``--ranks 1,2,4,``), which the parsers before this one took
        return tuple(self._item(value, i, item) for i, item in enumerate(items, 1))

    def _item(self, value: str, index: int, item: str):
        if not item.strip():
            raise _NotANumber(value, self.expected, f"item {index} is empty")
        if self.form is None:
            return self._number(value, item)
        parts = item.lower().split("x")
        if len(parts) != len(self.form.split("x")):
            raise _NotANumber(value, self.expected, f"{item.strip()!r} is not {self.form}")
        return tuple(self._number(value, part) for part in parts)

    def _number(self, value: str, item: str):
        try:
            number = _typed(TypedInt if self.number is int else TypedFloat, self.number, item)
        except _NotANumber as err:
            raise _NotANumber(value, self.expected, f"{item.strip()!r} is not {err.expected}") from None
        if self.least is not None and number < self.least:
            raise _NotANumber(value, self.expected, f"{number} is less than {self.least}")
        return number


_NUMBER_PARSERS = (_typed_float, _typed_int, _typed_seed)


def _is_number_option(param) -> bool:
    info = getattr(getattr(param, "type_descriptor", None), "parameter_info", None)
    parser = getattr(info, "parser", None)
    return parser in _NUMBER_PARSERS or isinstance(parser, _NumberList)


def _option_name(param) -> str:
    return max((o for o in param.opts if o.startswith("--")), key=len)


def _number_refusal(err: Exception):
    """A ConfigError in spectra's words (``--energy 'abc': expected a number.``) for typer's refusal `err` of a number
    option's text, None for any other. typer reads options through pydantic, which hands our parser's error back in
    the refusal's cause: the option is typer's, the text ours."""
    from spectra.errors import ConfigError

    param = getattr(err, "param", None)
    errors = getattr(err.__cause__, "errors", lambda: [])()
    refused = next((e["ctx"]["error"] for e in errors if isinstance((e.get("ctx") or {}).get("error"), _NotANumber)),
                   None)
    if refused is None or param is None or not _is_number_option(param):
        return None
    return ConfigError(f"{_option_name(param)} {refused}")


def _refuse_out_of_range(ctx) -> None:
    """Refuse a number option's value outside its declared ``min``/``max``, naming it as typed: typer checks them
    only with its own number parser, which these options replace (the help still shows the range)."""
    from spectra.errors import ConfigError

    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or not _is_number_option(param):
            continue
        if param.min is not None and value < param.min:
            raise ConfigError(f"{_option_name(param)} must be ≥ {param.min}, got {value}.")
        if param.max is not None and value > param.max:
            raise ConfigError(f"{_option_name(param)} must be ≤ {param.max}, got {value}.")


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


def _layers(value: str | None) -> TypedLayers | None:
    """--layers as the layers it names (PEFT's layers_to_transform), printed as typed."""
    span = _layer_range(value)
    return None if span is None else TypedLayers(range(span[0], span[1] + 1), value)


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
    if folder.exists() and not folder.is_dir():  # -o afile/sub: a file on the way, not a permission
        raise ConfigError(f"cannot write {output}: {folder} is a file, not a folder. Choose another -o/--output.")
    if folder.exists() and not os.access(folder, os.W_OK):
        raise ConfigError(f"cannot write {output}: {folder} is not a folder this user may write to. Choose another "
                          "-o/--output.")
    if folder.is_dir():  # os.access trusts the mode bits: /proc, or a full or odd file system, still refuse files
        import tempfile

        try:
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".spectra-probe-")
        except OSError as exc:
            raise ConfigError(f"cannot write {output}: no file can be created in {folder} ({exc.strerror}). Choose "
                              "another -o/--output.") from None
        os.close(fd)
        os.unlink(probe)
