"""Files and directories that appear whole or not at all.

Everything spectra writes — reports, adapters, plans, cache entries, benchmark results,
generated checkpoint pairs — is built under a hidden name beside its destination and
moved into place with one rename. A reader (or the next run) never sees half of it, and
a failure, including Ctrl-C, removes the temporary and leaves the destination as it was;
the temporary of a killed run (SIGKILL, a lost machine) is removed by the next write of
the same destination on the same host.
Temporaries are made with plain ``open``/``mkdir``, so the result has the permissions
the umask gives, like any other file the user creates. Files that a library wrote into a
staged directory are given those permissions too before it is moved into place:
safetensors ≥ 0.8 creates every file owner-only (0600, through a temporary file of its
own; safetensors issue #782), which leaves an adapter unreadable to the other users of a
shared machine or serving process.
"""

from __future__ import annotations

import contextlib
import fnmatch
import glob
import hashlib
import itertools
import os
import secrets
import shutil
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

__all__ = ["OUTPUTS", "RECORD_WRITERS", "command_of", "move_into_place", "other_spectra_file", "record_origin",
           "record_writer", "refuse_replacing_inputs", "refuse_replacing_others", "staged_directory", "write_atomic",
           "write_text_atomic"]


def _sibling(path: Path, what: str) -> Path:
    """A hidden, unique name beside `path` (same directory, so the final rename stays on one filesystem), naming
    this host and process: a temporary left by a killed run is found and removed by the next (:func:`_sweep`)."""
    return path.with_name(f".{path.name}.{what}-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


# this host in temporaries' names: a hash of the whole hostname (stripping and cutting it made node-01 and node-02 of
# a long cluster name, or web-1 and web1, one host, whose temporaries each then removed as a dead process's)
def _host_tag(hostname: str) -> str:
    return hashlib.sha256(hostname.encode()).hexdigest()[:12]


_HOST = _host_tag(socket.gethostname())


def _sweep(path: Path) -> None:
    """Remove the temporaries of `path` that a killed process of this host left (SIGKILL runs no cleanup).

    Only names of this host whose process is gone: on a shared filesystem another host's
    run may still be writing its own.
    """
    prefix = f".{path.name}.tmp-{_HOST}-"
    try:
        names = [n for n in os.listdir(path.parent) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        pid = name[len(prefix):].partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            leftover = path.parent / name
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    leftover.unlink()


def _alive(pid: int) -> bool:
    """Whether process `pid` exists on this host (one another user owns counts: it may be writing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def refuse_replacing_inputs(output: str | os.PathLike, inputs, *, option: str = "-o/--output") -> None:
    """Raise ConfigError where writing `output` would replace one of `inputs` (paths; hub ids are skipped).

    An existing `output` is replaced whole (:func:`move_into_place`), so it must not be an
    input, a folder holding one (``-o models/`` around ``models/base``), or a file directly
    in an input folder, where a checkpoint keeps what is read (``config.json``, weights,
    an index). Give a report folder's read file itself (``run/analysis.json``) so that its
    other files stay writable. A new path, or a folder inside an input folder, replaces
    nothing that is read.
    """
    from spectra.errors import ConfigError

    out = Path(output)
    if not out.exists():
        return
    out = out.resolve()
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        src = Path(given).resolve()
        what = ("is" if out == src else "holds" if out in src.parents else
                "is a file in" if src.is_dir() and out.parent == src and not out.is_dir() else None)
        if what:
            raise ConfigError(f"{option} {output} {what} the input {given}: writing it would replace what this "
                              f"command reads. Choose another {option}.")


# What each command writes into its output directory, as glob patterns (relative, ``/``-separated): an existing
# directory may be replaced (with overwrite) only if it holds one of the command's record files and nothing but these,
# or nothing at all. The library's writers (staged_directory's callers) and the CLI's early check read this one table.
_REPORT_FILES = ("report.md", "report.html", "figures", "figures/*.png", "figures/*.svg")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                    "chat_template.*")
OUTPUTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {  # command: (its record files, the rest it writes)
    "analyze": (("analysis.json",), _REPORT_FILES),
    "sweep": (("sweep.json",), ("plan.json", *_REPORT_FILES)),
    "verify": (("verify.json", "sweep.json"), _REPORT_FILES),  # verify --adapter and --sweep share a -o
    "demo": (("demo.json",), _REPORT_FILES),
    "extract": (("adapter_config.json",), _ADAPTER_FILES),
    "bench make-pair": (("ground_truth.json",), ("base", "base/*", "tuned", "tuned/*")),
    # train's record lists the files it saved (a tokenizer's vocabulary files vary by family: PhoBERT's bpe.codes,
    # Marian's source.spm, …), which then stand for these patterns; the patterns serve records written before it
    "train": (("spectra_train.json",), ("training_log.jsonl", *_ADAPTER_FILES, "README.md", "config.json",
                                        "generation_config.json",
                                        "model.safetensors", "model-*.safetensors", "model.safetensors.index.json",
                                        *_TOKENIZER_FILES)),
}


# Records whose file name more than one command writes (sweep.json: `spectra sweep`'s truncation sweep and `spectra
# verify --sweep`'s rank sweep) are told apart by content: each says the command line that wrote it ("command", which
# the report writers stamp), and one written before that key by its "kind", which every sweep of either command has
# carried since the first. An adapter check (verify.json) has no kind: its name alone tells it.
RECORD_WRITERS: dict[str, tuple[str | None, str]] = {  # the command line in a record → (its older "kind", what it is)
    "sweep": ("truncation_sweep", "a truncation sweep"),
    "verify --sweep": ("sweep", "a rank sweep"),
    "verify --adapter": (None, "an adapter check"),
}


def record_writer(record) -> str | None:
    """The command line that wrote `record` (a report's JSON data): its ``"command"`` (``"verify --sweep"``), or,
    for a record written before that key, the one its ``"kind"`` names; None when neither tells (not a mapping, an
    older verify.json, another file).

    >>> record_writer({"kind": "truncation_sweep"}), record_writer({"command": "verify --sweep", "kind": "sweep"})
    ('sweep', 'verify --sweep')
    """
    if not isinstance(record, Mapping):
        return None
    command = record.get("command")
    if isinstance(command, str):
        return command
    kind = record.get("kind")
    return next((writer for writer, (older, _) in RECORD_WRITERS.items() if older is not None and kind == older), None)


def record_origin(record) -> str | None:
    """What `record` is and which command wrote it, for messages: "a rank sweep of `spectra verify --sweep`"; None
    when :func:`record_writer` cannot tell."""
    writer = record_writer(record)
    if writer is None:
        return None
    what = RECORD_WRITERS.get(writer, (None, "a record"))[1]
    return f"{what} of `spectra {writer}`"


def other_spectra_file(data) -> str | None:
    """What another spectra output is ("a rank plan (…)"), when `data` is one rather than an analysis."""
    if not isinstance(data, Mapping):
        return None
    if "policy" in data and "modules" in data:
        return "a rank plan (`spectra recommend -o`)"
    origin = record_origin(data)  # a sweep.json of `spectra sweep` or `verify --sweep`, a verify.json: by their
    if origin:  # "command", or their "kind" where older (spectra.files.RECORD_WRITERS)
        return origin
    if "summary" in data and "adapter" in data:  # a verify.json written before records said their command
        return "an adapter check (`spectra verify`)"
    if "per_module_plan" in data:
        return "the demo's results (`spectra demo`)"
    return None


def is_analysis(data) -> bool:
    """Whether `data` looks like an ``analysis.json`` (its rows and both checkpoints), of any schema version."""
    return (isinstance(data, Mapping) and {"modules", "base", "tuned"} <= data.keys()
            and other_spectra_file(data) is None)


def records_in(folder: Path) -> list[str]:
    """The spectra record files in `folder`, each with what it is ("run/sweep.json, a truncation sweep of `spectra
    sweep`"), for an error that was handed a folder where a file, or another record, was expected."""
    found = []
    for name in ("analysis.json", "plan.json", "sweep.json", "verify.json", "results.json"):
        data = _read_record(folder / name)
        if data is not None:
            what = ("an analysis (`spectra analyze`)" if is_analysis(data) else other_spectra_file(data)
                    or "a JSON file")
            found.append(f"{folder / name}, {what}")
    return found


def command_of(writer: str) -> str | None:
    """The :data:`OUTPUTS` command a record's command line belongs to ("verify --sweep" → "verify"); None for none."""
    return next((c for c in sorted(OUTPUTS, key=len, reverse=True) if writer == c or writer.startswith(c + " -")), None)


def _read_record(path: Path):
    """A record file's JSON data, or None where it cannot be read as JSON."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _shared_records() -> set[str]:
    """Record names that more than one command of :data:`OUTPUTS` writes: their content tells who wrote them."""
    names = [name for records, _ in OUTPUTS.values() for name in records]
    return {name for name in names if names.count(name) > 1}


def _not_written_by(out: Path, command: str, records: tuple[str, ...]) -> str | None:
    """Why a record of `command`'s name in `out` is not `command`'s, or None where each one present is (or may be).

    A record whose ``"command"`` or ``"kind"`` names another command is that command's (`spectra verify --sweep`'s
    sweep.json in a `spectra sweep` folder); a record under a name several commands write must say which wrote it.
    Any other record is told by its name, as before the key (an older verify.json, a train record).
    """
    shared = _shared_records()
    for name in records:
        path = out / name
        if not path.is_file():
            continue
        data = _read_record(path)
        writer = record_writer(data)
        if writer is not None and command_of(writer) != command:
            return f"holds {name}, {record_origin(data)}"
        if writer is None and name in shared:
            writers = [f"`spectra {c}`" for c, (names, _) in OUTPUTS.items() if name in names]
            return (f"holds {name}, which says neither the command that wrote it (\"command\") nor its \"kind\" "
                    f"({' and '.join(writers)} each write a {name})")
    return None


def refuse_replacing_others(output: str | os.PathLike, *, command: str, overwrite: bool,
                            option: str = "-o/--output") -> None:
    """Raise ConfigError unless the output directory `output` may be written by `command`: it is new, or
    ``overwrite`` is given and it is empty or holds only what `command` writes.

    An output directory is replaced whole (:func:`move_into_place`), so ``overwrite`` must
    not delete what spectra did not write: a folder holding a user's ``thesis.tex``, or the
    cache, is refused with the name of one such file. `command` is a key of :data:`OUTPUTS`
    (``"analyze"``, ``"train"``, ...): a directory it wrote holds one of its record files
    (``analysis.json``), and every file and folder under `output` must be a record or match
    one of its patterns. A file where a directory goes is refused with or without
    ``overwrite`` (it is not what this command writes, and ``overwrite`` would not help).
    `option` names the output in messages (``-o/--output`` in the CLI, ``out_dir`` in Python); they name
    ``overwrite=True``, which the CLI's messages read as ``--overwrite``.

    A record must also be `command`'s by content where it says: a ``sweep.json`` that `spectra verify --sweep`
    wrote (its ``"command"``, or its ``"kind"`` where older) is not `spectra sweep`'s to replace, nor the reverse;
    a record under a name both write must say which (:data:`RECORD_WRITERS`).
    """
    from spectra.errors import ConfigError

    if command not in OUTPUTS:
        raise ValueError(f"command {command!r} has no entry in spectra.files.OUTPUTS; known: {', '.join(OUTPUTS)}.")
    records, writes = OUTPUTS[command]
    out = Path(output)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ConfigError(f"{option} {output} is a file; `spectra {command}` writes a directory there. Choose another "
                          f"{option}.")
    if not overwrite:
        raise ConfigError(f"{option} {output} exists; pass overwrite=True to replace it or choose another {option}.")
    entries = out.rglob("*")  # lazily: a home folder given by mistake is refused at its first foreign file
    first = next(entries, None)
    if first is None:
        return
    other = _not_written_by(out, command, records)  # first: a report of the other kind is named as such
    if other is not None:
        raise ConfigError(f"{option} {output} {other}: overwrite=True replaces only a directory that "
                          f"`spectra {command}` wrote (or an empty one). Choose another {option}, or move the files "
                          "out first.")
    listed = _recorded_files(out, records)
    if listed is not None:  # the record names every file the command saved: those alone, and their folders
        writes = (*listed, *{Path(f).parent.as_posix() for f in listed if "/" in f})
    foreign = next((p for p in itertools.chain([first], entries)
                    if not any(fnmatch.fnmatchcase(p.relative_to(out).as_posix(), w) for w in (*records, *writes))),
                   None)
    if foreign is None and any((out / name).is_file() for name in records):
        return
    any_record = {name for names, _ in OUTPUTS.values() for name in names}  # another command's: say whose
    origin = (record_origin(_read_record(foreign)) if foreign is not None and foreign.is_file()
              and foreign.relative_to(out).as_posix() in any_record else None)
    why = (f"holds {foreign.relative_to(out).as_posix()}{f' ({origin})' if origin else ''}, which `spectra {command}` "
           "does not write" if foreign is not None
           else f"holds no {' or '.join(records)}, so `spectra {command}` did not write it")
    raise ConfigError(f"{option} {output} {why}: overwrite=True replaces only a directory that `spectra {command}` "
                      f"wrote (or an empty one), and nothing else in it. Choose another {option}, or move the files "
                      "out first.")


def _recorded_files(out: Path, records: tuple[str, ...]) -> tuple[str, ...] | None:
    """The files a command's record in `out` says it saved (its ``"files"`` list, paths relative to `out`), or None
    where no record lists them (a record written before the list, or a command that keeps none)."""
    for name in records:
        data = _read_record(out / name)
        listed = data.get("files") if isinstance(data, Mapping) else None
        if isinstance(listed, list) and all(isinstance(f, str) for f in listed):
            return tuple(glob.escape(f) for f in listed)
    return None


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden sibling of `path`, then rename it to `path` (replacing it).

    `write` must create the file it is given; its name does not end in the target's
    suffix, so a writer that picks a format from the suffix (``Figure.savefig``) must be
    told the format.
    """
    path = Path(path)
    _sweep(path)
    tmp = _sibling(path, "tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` through a temporary sibling and one rename."""
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding=encoding))


@contextlib.contextmanager
def staged_directory(out: str | os.PathLike, *, command: str | None = None, overwrite: bool = False,
                     option: str = "out_dir") -> Iterator[Path]:
    """Yield a new empty directory beside `out`; on a clean exit it becomes `out`, on an exception it is removed.

    An existing `out` is replaced in one swap (:func:`move_into_place`). With `command` (a key
    of :data:`OUTPUTS`), that is allowed only by :func:`refuse_replacing_others`' rule, checked
    here before anything is staged: the library's writers and the CLI share it. Without
    `command` the caller has decided. A file at `out` is refused either way: a directory
    never replaces a file. The parent of `out` is created if missing.
    """
    out = Path(out)
    if command is not None:
        refuse_replacing_others(out, command=command, overwrite=overwrite, option=option)
    if out.exists() and not out.is_dir():
        from spectra.errors import ConfigError

        raise ConfigError(f"{out} is a file; a directory is written there. Choose another output.")
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep(out)
    staging = _sibling(out, "tmp")
    staging.mkdir()  # plain mkdir: the umask's permissions, not mkdtemp's owner-only 0700
    try:
        yield staging
        _umask_permissions(staging)
        move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _umask_permissions(folder: Path) -> None:
    """Give every regular file under `folder` the mode a plain ``open()`` would: 0o666 masked by the umask."""
    mode = 0o666 & ~_umask()
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink() and (path.stat().st_mode & 0o777) != mode:
            path.chmod(mode)


def _umask() -> int:
    """The process umask, read without changing it where the platform allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the usual set-and-restore (briefly process-wide)
    os.umask(mask)
    return mask


def move_into_place(staging: Path, out: Path) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is set aside first and restored on failure."""
    if not out.exists():
        staging.rename(out)
        return
    old = _sibling(out, "old")
    out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:  # a file (or link) set aside: rmtree would leave it behind as a hidden .old file
        with contextlib.suppress(OSError):
            old.unlink()
