"""Where tensors come from: a lazy name → tensor view of one checkpoint.

I/O only. A source lists names, shapes and dtypes without reading any data and
reads one tensor at a time on demand: safetensors through ``safe_open``
(memory-mapped), pickle ``.bin`` files through ``torch.load(weights_only=True,
mmap=True)``. No code from a checkpoint is ever executed.

Accepted forms (``open_checkpoint(spec)``):

- a local Hugging Face model directory: ``model.safetensors``,
  ``model.safetensors.index.json`` (sharded), ``pytorch_model.bin`` or
  ``pytorch_model.bin.index.json``;
- a single ``.safetensors`` or ``.bin``/``.pt`` file, or an index ``.json``;
- a PEFT adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``
  or ``adapter_model.bin``), returned as an :class:`AdapterSource`;
- a Hugging Face hub id (``org/name``, optionally ``org/name@revision``), resolved
  through ``huggingface_hub`` into the local cache, downloading only config and
  weight files.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from spectra.checkpoints.quantized import QuantizedTensor, quantized_tensors
from spectra.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
ADAPTER_CONFIG = "adapter_config.json"
_SAMPLE = 256 * 1024  # bytes hashed at each of three places per weight file
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")  # names of files, not of hub repositories


def _sentence(err: BaseException) -> str:
    """``err``'s message as one sentence ending in a full stop, to go before spectra's own: torch's and json's
    messages may end in one already ("…modified after saving."), and an empty one (``EOFError()``) is named by its
    type."""
    text = str(err).strip() or type(err).__name__
    return text if text.endswith((".", "!", "?")) else text + "."


@dataclass(frozen=True)
class TensorInfo:
    """Metadata of one stored tensor, read without touching its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path


class _SafetensorsFile:
    """One memory-mapped .safetensors file; the handle opens on first use."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            names = list(self._handle.keys())
        except Exception as err:  # safetensors raises SafetensorError/OSError with terse text
            raise CheckpointError(
                f"cannot read safetensors file {path}: {_sentence(err)} The file is truncated or corrupt; "
                "download or save it again."
            ) from err
        self.infos: dict[str, TensorInfo] = {}
        for name in names:
            sl = self._handle.get_slice(name)
            self.infos[name] = TensorInfo(name, tuple(sl.get_shape()), _parse_dtype(sl.get_dtype(), name, path), path)

    def read(self, name: str) -> torch.Tensor:
        try:
            return self._handle.get_tensor(name)
        except Exception as err:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.path}: {_sentence(err)} The file may be "
                                  "truncated or corrupt; download or save it again.") from err

    def read_rows(self, name: str, start: int, stop: int, *, what: str) -> torch.Tensor:
        """Rows [start, stop) of a tensor's first dimension, read alone; ``what`` names them in an error."""
        # get_slice reads the slice's bytes alone (a view of the mapping where safetensors maps through torch);
        # a range, not an int: safetensors < 0.4.3 cannot index a slice by an integer
        try:
            return self._handle.get_slice(name)[start:stop]
        except Exception as err:
            raise CheckpointError(f"cannot read {what} of tensor {name!r} from {self.path}: {_sentence(err)} The "
                                  "file may be truncated or corrupt; download or save it again.") from err


def _unreadable_pickle(path: Path, err: Exception) -> CheckpointError:
    """The error for a .bin/.pt file torch could not load with ``weights_only=True``, by what is wrong with it."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError:
        head = b""
    if head.startswith(b"version https://git-lfs"):
        return CheckpointError(f"{path} is a git-lfs pointer, not the weights: run `git lfs pull` in its repository "
                               "(or download the file itself).")
    # torch's weights-only unpickler: "Unsupported global: GLOBAL posix.system" (a torch zip), "Trying to load
    # unsupported GLOBAL posix.system whose module posix is blocked." (a raw pickle)
    unsupported = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
    if unsupported:  # torch's weights-only unpickler met a callable: loading it would run code
        return CheckpointError(f"refusing to unpickle {path}: it holds objects other than tensors, and loading it "
                               f"would execute code from the file ({unsupported[0]}). Convert it to safetensors in "
                               "an environment you trust, then point spectra at the .safetensors file.")
    if isinstance(err, pickle.UnpicklingError):  # torch's text advises weights_only=False: quote its cause alone
        causes = [line.strip() for line in str(err).splitlines()[1:] if line.strip()
                  and not line.startswith(("Please file", "Check the documentation"))]
        what = f"its pickle is not a state dict torch can read safely ({causes[0] if causes else 'UnpicklingError'})."
    elif isinstance(err, (RuntimeError, OSError, ValueError, EOFError)):
        what = _sentence(err)
    else:
        what = f"{type(err).__name__} {err} while unpickling."  # a KeyError's message alone reads "101."
    return CheckpointError(f"cannot read {path}: {what} The file is truncated or not a torch checkpoint; download or "
                           "save it again.")


class _PickleFile:
    """One pickle .bin file, loaded with ``weights_only=True`` and memory-mapped."""

    def __init__(self, path: Path):
        self.path = path
        try:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                # torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped: read it whole
                state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises KeyError, UnpicklingError, RuntimeError… on bad files
            raise _unreadable_pickle(path, err) from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__}); "
                                  "spectra needs a mapping of tensor names to tensors.")
        for key in ("state_dict", "model", "module", "model_state_dict"):  # a trainer's checkpoint: the weights
            if not any(isinstance(v, torch.Tensor) for v in state.values()) and isinstance(state.get(key), dict):
                state = state[key]
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if not self._tensors:
            keys = ", ".join(map(str, list(state)[:8])) + (" …" if len(state) > 8 else "")
            raise CheckpointError(f"{path} holds no tensors at its top level (keys: {keys or 'none'}); spectra needs "
                                  "a state dict of tensor names to tensors. Save the model's state_dict() alone (or "
                                  "the entry of this file that holds it) and point spectra at that.")
        self.infos = {k: TensorInfo(k, tuple(v.shape), v.dtype, path) for k, v in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def read_rows(self, name: str, start: int, stop: int, *, what: str) -> torch.Tensor:
        return self._tensors[name][start:stop]  # a view of the memory-mapped tensor: only these rows are paged in


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


def _parse_dtype(code: str, name: str, path: Path) -> torch.dtype:
    try:
        return _SAFETENSORS_DTYPES[code]
    except KeyError:
        raise CheckpointError(
            f"tensor {name!r} in {path} has dtype {code}, which spectra cannot read as numbers "
            f"(supported: {', '.join(sorted(_SAFETENSORS_DTYPES))}). Dequantise the checkpoint first."
        ) from None


@dataclass
class CheckpointSource:
    """A lazy view of one checkpoint: names, shapes and dtypes now; data on demand.

    Attributes
    ----------
    path : Path
        The directory or file the user pointed at (after hub resolution).
    spec : str
        What the user typed (path or hub id), for messages.
    config : dict or None
        ``config.json`` beside the weights, when present.
    files : list of Path
        Weight files, in index order.
    weight_map : dict or None
        A shard index's tensor name → shard file: each tensor it names is read from that shard (a stale copy
        in another shard is not), and a shard that lacks a tensor named for it is refused. None: the files'
        own tensors, a name in two files refused.
    """

    path: Path
    spec: str
    files: list[Path]
    config: dict[str, Any] | None = None
    weight_map: dict[str, Path] | None = None
    _readers: dict[Path, Any] = field(default_factory=dict, repr=False)
    _infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    _quantized: dict[str, QuantizedTensor] = field(default_factory=dict, repr=False)
    _parts: dict[str, TensorInfo] = field(default_factory=dict, repr=False)  # a quantised weight's stored tensors

    def __post_init__(self) -> None:
        if self.weight_map is not None:
            for name, file in self.weight_map.items():
                info = self._reader(file).infos.get(name)
                if info is None:
                    raise CheckpointError(
                        f"tensor {name!r}: the shard index of {self.path} places it in {file.name}, which does not "
                        "hold it; the download is incomplete or the index is stale. Download the complete "
                        "checkpoint again.")
                self._infos[name] = info
        for file in self.files:
            for name, info in self._reader(file).infos.items():
                if self.weight_map is not None:
                    self._infos.setdefault(name, info)  # a tensor the index does not name: its shard's
                elif name in self._infos and self._infos[name].file != file:
                    raise CheckpointError(
                        f"tensor {name!r} is in two weight files of {self.path}: {self._infos[name].file.name} "
                        f"and {file.name}. The folder holds two checkpoints (or a leftover file); pass the one "
                        "file, or an index .json that says which shard holds each tensor.")
                else:
                    self._infos[name] = info
        # a quantised weight (MXFP4, block-scaled FP8) is listed in its codes' place, as the tensor it encodes
        self._quantized = quantized_tensors(self._infos, self.config, self.spec)
        listed = {q.parts[0]: name for name, q in self._quantized.items()}
        scales = {q.parts[1] for q in self._quantized.values()}
        self._parts = {part: self._infos[part] for q in self._quantized.values() for part in q.parts}
        infos = {}
        for name, info in self._infos.items():
            if name in listed:
                q = self._quantized[listed[name]]
                infos[listed[name]] = TensorInfo(listed[name], q.shape, q.dtype, info.file)
            elif name not in scales:
                infos[name] = info
        self._infos = infos

    # -- metadata -------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in {self.spec}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def format(self) -> str:
        return "safetensors" if self.files and self.files[0].suffix == ".safetensors" else "bin"

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the input for caches and reports, from content, not paths or times.

        Hashes each weight file's name, size and three 256 KiB samples (head, middle, tail),
        plus config.json: a few MiB read whatever the checkpoint's size, the same for a copy
        of the same files, different for any fine-tune (which changes weights everywhere).
        """
        h = hashlib.sha256()
        for file in self.files:
            size = file.stat().st_size
            h.update(f"{file.name}:{size}".encode())
            with open(file, "rb") as fh:
                for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    fh.seek(offset)
                    h.update(fh.read(_SAMPLE))
        if self.config is not None:
            h.update(json.dumps(self.config, sort_keys=True).encode())
        return {
            "path": str(self.path.absolute()),  # absolute: read back from other working directories (recommend)
            "format": self.format,
            "files": len(self.files),
            "size_bytes": sum(f.stat().st_size for f in self.files),
            "fingerprint": h.hexdigest()[:16],
        }

    # -- data -----------------------------------------------------------------------

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped where the format allows), in its stored dtype (a quantised one: as
        :mod:`spectra.checkpoints.quantized` dequantises it)."""
        info = self.info(name)
        if name in self._quantized:
            return self._quantized[name].decode(*self._stored_parts(name))
        return self._reader(info.file).read(name)

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        """Read ``tensor[expert]`` of a stored 3-D expert tensor (E, d₁, d₂) (or (E, d) biases) alone.

        ``read(name)[expert]`` would hand its caller the whole tensor to slice; whatever scans
        it (a NaN check) then reads all E experts' data for each one, E× the tensor per
        parameter (gpt-oss: E = 32 or 128).
        """
        info = self.info(name)
        if not len(info.shape) or not 0 <= expert < info.shape[0]:
            raise CheckpointError(f"tensor {name!r} in {self.spec} has shape {info.shape}: no expert {expert}")
        return self._rows(name, expert, expert + 1, what=f"expert {expert}")[0]

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows ``[start, stop)`` of a stored tensor alone: one expert of experts stacked on the rows of one 2-D
        tensor (DBRX's ``ffn.experts.mlp.w1`` (E·ffn, d_model), expert e its rows e·ffn … (e+1)·ffn).

        ``read(name)[start:stop]`` would read and hand out all E experts' rows for each one, E× the tensor's data per
        parameter (and E× its NaN/Inf scan where the caller scans what it is handed).
        """
        info = self.info(name)
        if not len(info.shape) or not 0 <= start < stop <= info.shape[0]:
            raise CheckpointError(f"tensor {name!r} in {self.spec} has shape {info.shape}: no rows {start}:{stop}")
        return self._rows(name, start, stop, what=f"rows {start}:{stop}")

    def _rows(self, name: str, start: int, stop: int, *, what: str) -> torch.Tensor:
        """Rows [start, stop) of a listed tensor (checked), read alone where its storage allows; ``what`` names them
        in an error."""
        if name not in self._quantized:
            return self._reader(self.info(name).file).read_rows(name, start, stop, what=what)
        parts = self._stored_parts(name, (start, stop))
        if parts is None:  # the rows cut through a scale's block: decoded whole
            return self.read(name)[start:stop]
        return self._quantized[name].decode(*parts)

    def storage_format(self, name: str) -> str | None:
        """The quantised format a tensor is stored in (``mxfp4``, ``float8_e4m3fn``), None where it is stored as listed."""
        q = self._quantized.get(name)
        return None if q is None else q.grid

    def quantized_spacing(self, name: str, expert: int | None = None, *,
                          rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Each element's grid spacing in a quantised tensor, shaped as :meth:`read`, :meth:`read_expert` (``expert``)
        or :meth:`read_rows` (``rows``, (start, stop)) give it: the rounding its storage made
        (:mod:`spectra.checkpoints.quantized`); None for any other tensor."""
        q = self._quantized.get(name)
        if q is None:
            return None
        if expert is not None:
            return self.quantized_spacing(name, rows=(expert, expert + 1))[0]
        parts = None if rows is None else self._stored_parts(name, rows)
        if parts is None:  # the whole tensor, or rows that cut through a scale's block: its spacing whole
            spacing = q.spacing(*self._stored_parts(name))
            return spacing if rows is None else spacing[rows[0]:rows[1]]
        return q.spacing(*parts)

    def _stored_parts(self, name: str, rows: tuple[int, int] | None = None) -> list[torch.Tensor] | None:
        """A quantised tensor's stored parts (codes, scales): whole, or for rows (start, stop) of the tensor each
        part's rows that hold them (:meth:`QuantizedTensor.stored_rows`), read alone; None where those rows cut
        through a scale's block (the caller decodes the tensor whole)."""
        q = self._quantized[name]
        stored = [self._parts[part] for part in q.parts]
        if rows is None:
            return [self._reader(s.file).read(s.name) for s in stored]
        ranges = q.stored_rows([s.shape for s in stored], *rows)
        if ranges is None:
            return None
        return [self._reader(s.file).read(s.name) if r is None
                else self._reader(s.file).read_rows(s.name, *r, what=f"rows {r[0]}:{r[1]} (those of rows "
                                                                  f"{rows[0]}:{rows[1]} of {name!r})")
                for s, r in zip(stored, ranges)]

    def _reader(self, file: Path):
        if file not in self._readers:
            self._readers[file] = _SafetensorsFile(file) if file.suffix == ".safetensors" else _PickleFile(file)
        return self._readers[file]


@dataclass
class AdapterSource:
    """A PEFT adapter directory: its config and a lazy view of its tensors.

    Keys look like ``base_model.model.<module>.lora_A.weight`` (r, in),
    ``…lora_B.weight`` (out, r), optionally ``…lora_magnitude_vector`` (out,) for
    DoRA, and whole tensors for ``modules_to_save``.
    """

    path: Path
    spec: str
    config: dict[str, Any]
    weights: CheckpointSource

    def fingerprint(self) -> dict[str, Any]:
        """The weights' fingerprint, with the adapter config (its α, rank pattern, DoRA…) hashed in."""
        fp = self.weights.fingerprint()
        config = json.dumps(self.config, sort_keys=True).encode()
        fp["fingerprint"] = hashlib.sha256(fp["fingerprint"].encode() + config).hexdigest()[:16]
        fp["format"] = "peft-adapter"
        return fp

    @property
    def format(self) -> str:
        return "peft-adapter"


def open_checkpoint(spec: str | os.PathLike, *, revision: str | None = None) -> CheckpointSource | AdapterSource:
    """Open a checkpoint lazily: nothing but headers is read.

    Parameters
    ----------
    spec : str or path
        Local directory, weight file, index JSON, PEFT adapter directory, or hub id
        (``org/name`` or ``org/name@revision``).
    revision : str, optional
        Hub revision (branch, tag or commit) when ``spec`` is a hub id.

    Returns
    -------
    CheckpointSource or AdapterSource

    Raises
    ------
    CheckpointError
        Missing path, a directory with no weights, a corrupt file, an unsafe pickle,
        or a hub id that cannot be resolved (offline, private, misspelt).
    """
    if isinstance(spec, CheckpointSource | AdapterSource):
        return spec
    text = str(spec)
    path = Path(text).expanduser()
    if not path.exists():
        if (_HUB_ID.match(text) and not text.startswith((".", "/", "~"))
                and not text.lower().endswith(_FILE_SUFFIXES)):  # models/x.safetensors is a missing file, no repo
            repo_id, _, rev = text.partition("@")
            path = _resolve_hub(repo_id, revision or rev or None)
        else:
            raise CheckpointError(f"checkpoint {text!r} does not exist. Pass a model directory, a "
                                  ".safetensors/.bin file, an index .json, a PEFT adapter directory or a "
                                  "hub id like 'org/name'.")
    return _open_local(path, text)


def _open_local(path: Path, spec: str) -> CheckpointSource | AdapterSource:
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return _open_adapter(path, spec)
        files, weight_map = _weight_files_in_dir(path)
        return CheckpointSource(path=path, spec=spec, files=files, config=_read_config(path / "config.json"),
                                weight_map=weight_map)
    if path.name.endswith(".json"):
        files, weight_map = _files_from_index(path)
        return CheckpointSource(path=path, spec=spec, files=files, config=_read_config(path.parent / "config.json"),
                                weight_map=weight_map)
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return CheckpointSource(path=path, spec=spec, files=[path], config=_read_config(path.parent / "config.json"))
    raise CheckpointError(f"{path} is not a directory, a .safetensors/.bin file or an index .json; "
                          "spectra does not know how to read it.")


def _weight_files_in_dir(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The folder's weight files, and its index's tensor → shard map where it has one.

    Preference order follows transformers (``modeling_utils``): safetensors over pickle, and a single file over
    an index. ``save_pretrained`` of a smaller model into a folder that held shards deletes the shards but leaves
    the index behind; transformers loads the single file, and spectra had refused the folder for the missing shards.
    """
    for candidate in ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", BIN_INDEX):
        p = path / candidate
        if p.is_file():
            return _files_from_index(p) if candidate.endswith(".json") else ([p], None)
    loose = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if loose:
        return loose, None
    raise CheckpointError(
        f"no weights found in directory {path}: expected {SAFETENSORS_INDEX}, model.safetensors, "
        f"{BIN_INDEX}, pytorch_model.bin, any *.safetensors file, or {ADAPTER_CONFIG} for a PEFT adapter."
    )


def _files_from_index(index: Path) -> tuple[list[Path], dict[str, Path]]:
    """The shard files an index names, in its order, and its tensor name → shard file map."""
    try:
        data = json.loads(index.read_text())
        if isinstance(data, dict) and "weight_map" not in data and ("model_type" in data or "peft_type" in data):
            # a config.json or adapter_config.json given for the checkpoint: it was "cannot read the shard index"
            kind = "a PEFT adapter's config" if "peft_type" in data else "a model's config"
            raise CheckpointError(f"{index} is {kind}, not weights: pass the folder that holds it ({index.parent}).")
        weight_map = data["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read the shard index {index}: {_sentence(err)} It must be JSON with a "
                              "'weight_map' of tensor name → shard file.") from err
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"cannot read the shard index {index}: its 'weight_map' must map tensor names to shard "
                              "file names (strings). Download the checkpoint again.")
    files = {}
    for shard in dict.fromkeys(weight_map.values()):
        file = index.parent / shard
        if not shard.endswith((".safetensors", ".bin", ".pt", ".pth")):
            raise CheckpointError(f"shard {shard!r} named in {index} is not a weight file (.safetensors, .bin, .pt "
                                  "or .pth); the index is damaged. Download the checkpoint again.")
        if not file.is_file():
            raise CheckpointError(f"shard {shard!r} named in {index} is missing; download the complete checkpoint.")
        files[shard] = file
    return list(files.values()), {name: files[shard] for name, shard in weight_map.items()}


def _read_config(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except ValueError as err:  # UnicodeDecodeError (a binary file) included
        raise CheckpointError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must be a JSON object (a model config), not {type(data).__name__}.")
    return data


def _open_adapter(path: Path, spec: str) -> AdapterSource:
    config = _read_config(path / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / ADAPTER_CONFIG} must be a JSON object.")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise CheckpointError(f"adapter {path} is of type {peft_type}; spectra reads LoRA adapters "
                              "(including rsLoRA and DoRA) only.")
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).is_file():
            weights = CheckpointSource(path=path, spec=spec, files=[path / name], config=None)
            return AdapterSource(path=path, spec=spec, config=config, weights=weights)
    raise CheckpointError(f"adapter directory {path} has {ADAPTER_CONFIG} but no adapter_model.safetensors "
                          "or adapter_model.bin.")


_HUB_META = ["config.json", "adapter_config.json", SAFETENSORS_INDEX, BIN_INDEX]


def _hub_weight_patterns(meta: Path) -> list[list[str]]:
    """The weight files to fetch into a hub snapshot holding its metadata (`_HUB_META`), in the order
    :func:`_weight_files_in_dir` prefers them: an adapter's; ``model.safetensors``; the shards its index names (and
    nothing else: ``*.safetensors`` had also fetched a full copy beside them, Mistral's ``consolidated.safetensors``,
    doubling the download for a file never read); ``pytorch_model.bin``; the bin index's shards; any loose files."""
    if (meta / ADAPTER_CONFIG).is_file():
        return [["adapter_model.safetensors"], ["adapter_model.bin"]]
    def shards(index: str) -> list[list[str]]:
        try:
            names = sorted(set(json.loads((meta / index).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return []  # absent or unreadable: opening the snapshot says which
        return [names] if names and all(isinstance(n, str) for n in names) else []

    return ([["model.safetensors"]] + shards(SAFETENSORS_INDEX) + [["pytorch_model.bin"]] + shards(BIN_INDEX)
            + [["*.safetensors"], ["*.bin"]])


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    """Resolve a hub id to a local snapshot: cache first, then the network (config, index and the weights read)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed to resolve hub ids; pip install huggingface_hub") from err

    last_error: Exception | None = None
    for local_only in (True, False):
        try:
            meta = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_META,
                                          local_files_only=local_only))
        except Exception as err:  # offline, 404, gated: all become one clear message below
            last_error = err
            continue
        for patterns in _hub_weight_patterns(meta):
            try:
                path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_META + patterns,
                                              local_files_only=local_only))
            except Exception as err:
                last_error = err
                continue
            if all(any(path.glob(p)) for p in patterns):
                return path
    raise CheckpointError(
        f"no local path {repo_id!r} exists, and cannot fetch hub id {repo_id!r}{'@' + revision if revision else ''}: "
        f"it is not in the local cache and the hub could not be reached or has no weights for it "
        f"({type(last_error).__name__}: "
        f"{str(last_error).splitlines()[0] if last_error else 'no weight files'}). If you are offline, download "
        "the model elsewhere and pass its local directory instead (e.g. "
        f"`hf download {repo_id} --local-dir ./model` (`huggingface-cli download` before huggingface_hub 0.34), "
        "then `spectra analyze ./base ./model`)."
    ) from last_error


# -- provenance: is TUNED of BASE's architecture, and an adapter of BASE itself? ---------------------------------


def architecture_note(base: CheckpointSource, tuned: CheckpointSource) -> str | None:
    """A note when the two checkpoints' ``config.json`` files name different model types, else None.

    A fine-tune keeps its base's ``model_type``; a head swap (``LlamaForCausalLM`` → ``…ForSequenceClassification``)
    keeps it too, so ``architectures`` are compared only where a config lacks ``model_type``. Nothing is said when
    either config is absent.
    """
    difference = architecture_difference(base, tuned)
    if difference is None:
        return None
    return (f"BASE and TUNED are different architectures: {difference}. A fine-tune keeps its base's "
            "architecture, so TUNED is likely no fine-tune of BASE and its ΔW compares unrelated weights; check the "
            "two paths (ignore this if TUNED was converted from BASE into another model class).")


def architecture_difference(base: CheckpointSource, tuned: CheckpointSource) -> str | None:
    """``"<base>/config.json names model_type 'mistral' (…) and <tuned>/config.json names …"`` when the two model
    types differ (see :func:`architecture_note`), else None."""
    b_family, t_family = _config_family(base.config), _config_family(tuned.config)
    if b_family is None or t_family is None or b_family == t_family:
        return None
    return (f"{_config_file(base)} names {_describe_config(base.config)} and {_config_file(tuned)} names "
            f"{_describe_config(tuned.config)}")


def recorded_base_note(adapter: AdapterSource, base: CheckpointSource) -> str | None:
    """A note when a PEFT adapter's ``adapter_config.json`` says it was trained on another model than ``base``.

    PEFT records the model's ``name_or_path`` (``base_model_name_or_path``) and, when saved without a
    ``task_type``, its class (``auto_mapping.base_model_class``, with its module ``parent_library``). They are
    compared with ``base`` in this order, the first that decides:

    - a local path that exists: the same folder, or the same :meth:`CheckpointSource.fingerprint` (a copy), agrees.
      PEFT records the path as the model was loaded, relative to the folder training ran in, which spectra does not
      know: a relative path is read from the working directory and from the adapter's folder and each folder above
      it (training usually runs in one of them, and saves the adapter below it), and agrees where any folder it
      names there is ``base``; where none is, the note names the first (the working directory's first) and where
      it was read from. An absolute path is read as it is;
    - a hub id, with ``base`` a hub id (or a folder of the hub cache): the same repository agrees, unless the
      adapter records a ``revision`` (PEFT's ``get_peft_model(…, revision=…)``) that is known not to be ``base``'s:
      a commit other than the snapshot ``base`` lies in, or a branch or tag the hub cache's ``refs`` point at
      another commit. A revision that cannot be told here (a branch the cache does not know, a ``base`` outside
      the hub cache whose commit is unknown) says nothing;
    - else the recorded class: it agrees when ``base``'s ``config.json`` lists it in ``architectures``, or its
      transformers module (``transformers.models.llama.modeling_llama``) or class (``Llama…``) names ``base``'s
      model type.

    None where they agree, where the adapter records nothing, or where nothing recorded can be checked here (a
    path that no longer exists, with no class: people move folders). Shapes that do not fit are refused elsewhere.
    """
    config = adapter.config
    recorded = config.get("base_model_name_or_path")
    recorded = str(recorded) if isinstance(recorded, str) and recorded.strip() else None
    mapping = config.get("auto_mapping") if isinstance(config.get("auto_mapping"), dict) else {}
    cls, library = mapping.get("base_model_class"), mapping.get("parent_library")
    cls = cls if isinstance(cls, str) and cls else None
    library = library if isinstance(library, str) else None
    where = adapter.path / ADAPTER_CONFIG
    reason = None
    if recorded is not None:
        revision = config.get("revision")
        same = _same_model(recorded, base, adapter.path,
                           revision=revision if isinstance(revision, str) and revision.strip() else None)
        if same is True:
            return None
        if same is not None:
            reason = f"{where} records base_model_name_or_path {recorded!r}, but BASE is {base.spec!r}: {same}"
    other_class = cls is not None and base.config is not None and not _class_fits(cls, library, base.config)
    if other_class:
        named = (f"; it records the class {cls} (auto_mapping.base_model_class), and BASE's {_config_file(base)} "
                 f"names {_describe_config(base.config)}")
        if reason is not None:
            reason += named
        else:
            trained = f"{recorded!r}, a {cls}" if recorded else f"a {cls}"
            reason = (f"{where} records that it was trained on {trained} (auto_mapping.base_model_class), but BASE "
                      f"{base.spec!r} is {_describe_config(base.config)} ({_config_file(base)})")
    if reason is None:
        return None
    whole = [what for what, held in (("a DoRA update", config.get("use_dora")),
                                     ("a module saved whole (modules_to_save)", config.get("modules_to_save")))
             if held]
    effect = (f"{' and '.join(whole)} depend{'s' if len(whole) == 1 else ''} on the base weight it is merged onto, "
              "so ΔW here is the adapter merged onto BASE, not onto the model it was trained on" if whole else
              "a LoRA's ΔW = s·B@A does not depend on the base, but ‖ΔW‖/‖W‖ and every other measure against W use "
              "BASE's weights")
    return (f"adapter {adapter.spec} may not be of BASE: {reason}. {effect[0].upper()}{effect[1:]}; pass the model it "
            "was trained on as BASE (or ignore this if BASE is a copy of it).")


def _same_model(recorded: str, base: CheckpointSource, adapter_dir: Path, *,
                revision: str | None = None) -> bool | str | None:
    """True when ``recorded`` (an adapter's ``base_model_name_or_path``, at ``revision`` where it records one) is
    ``base``; why not, when it is known not to be; None when that cannot be told here. A relative path is read where
    :func:`_recorded_folders` looks for it."""
    found = _recorded_folders(recorded, adapter_dir)
    if found:
        differs = None
        for path, read in found:
            same = _same_folder(path, base)
            if same is True:
                return True
            if same is not None and differs is None:
                differs = f"{path}{read} exists here and holds other weights or another config.json than BASE ({same})"
        return differs  # None: no readable model there, so the class (if recorded) decides
    if not _HUB_ID.match(recorded) or recorded.startswith((".", "/", "~")):
        return None  # a local path that no longer exists
    repo = recorded.partition("@")[0]
    base_repo = _hub_repo(base)
    if base_repo is None:
        return None
    if base_repo.lower() != repo.lower():
        at = f" (revision {revision})" if revision else ""
        return f"the adapter was trained on hub model {repo}{at}, BASE is hub model {base_repo}"
    other = _other_revision(revision, base) if revision else None
    return True if other is None else f"the adapter was trained on revision {revision!r} of {repo}, {other}"


def _recorded_folders(recorded: str, adapter_dir: Path) -> list[tuple[Path, str]]:
    """The paths that exist here of a recorded ``base_model_name_or_path``, each with how it was read (``""``, or
    ``" ('llama' read from the working directory)"``), each folder once: an absolute (or ``~``) path as it is; a
    relative one from the working directory, then from the adapter's folder and each folder above it, nearest
    first (PEFT records the path as the model was loaded, relative to the folder training ran in)."""
    path = Path(recorded).expanduser()
    if path.is_absolute():
        return [(path, "")] if path.exists() else []
    here = adapter_dir.absolute()
    places = [(Path.cwd(), "the working directory")] + [(folder, f"the adapter's folder {folder}" if folder == here
                                                         else f"{folder}, above the adapter's folder")
                                                        for folder in (here, *here.parents)]
    found: dict[Path, tuple[Path, str]] = {}
    for folder, name in places:
        candidate = folder / path
        if candidate.exists():
            found.setdefault(candidate.resolve(), (candidate.resolve(), f" ({recorded!r} read from {name})"))
    return list(found.values())


def _same_folder(path: Path, base: CheckpointSource) -> bool | str | None:
    """True when the existing ``path`` is ``base`` (the same folder, or a copy: the same fingerprint); their
    fingerprints when it holds another model; None when it holds none spectra can read (or an adapter)."""
    here = base.path.resolve()
    if path.resolve() in (here, here.parent if here.is_file() else here):
        return True
    try:
        theirs = open_checkpoint(path)
    except CheckpointError:
        return None
    if isinstance(theirs, AdapterSource):
        return None
    mine, other = base.fingerprint()["fingerprint"], theirs.fingerprint()["fingerprint"]
    return True if mine == other else f"fingerprint {other} against BASE's {mine}"


def _other_revision(revision: str, base: CheckpointSource) -> str | None:
    """How ``base`` is known to be another revision of its hub repository than ``revision`` (a commit, branch or
    tag PEFT recorded), e.g. ``"BASE is commit 0123… (the hub cache's snapshot)"``; None where it is that revision
    or where that cannot be told: ``base`` outside the hub cache (its commit unknown), or a branch or tag the cache's
    ``refs`` do not name."""
    snapshot = _hub_snapshot(base)
    if snapshot is None:
        return None
    repo_dir, commit = snapshot
    refs = {}  # branch or tag -> the commit the cache last saw it at
    for ref in (repo_dir / "refs").rglob("*") if (repo_dir / "refs").is_dir() else ():
        if ref.is_file():
            refs[ref.relative_to(repo_dir / "refs").as_posix()] = ref.read_text().strip()
    names = [name for name, at in refs.items() if at == commit]
    this = f"BASE is commit {commit} (the hub cache's snapshot{', ' + ', '.join(names) if names else ''})"
    if re.fullmatch(r"[0-9a-fA-F]{7,40}", revision):  # a commit, in full or abbreviated
        return None if commit.startswith(revision.lower()) else this
    revision = revision.removeprefix("refs/heads/").removeprefix("refs/tags/")  # branch and tag names as refs/ holds
    if revision in names:
        return None
    if revision in refs:
        return f"which the hub cache's refs/{revision} names as commit {refs[revision]}; {this}"
    return None


def _hub_snapshot(source: CheckpointSource) -> tuple[Path, str] | None:
    """(the hub cache's ``models--org--name`` folder, the commit) of the snapshot ``source`` lies in, else None. Read
    off the path as given (a snapshot's files are links into ``blobs/``, which resolving would follow)."""
    parts = Path(os.path.abspath(source.path)).parts
    for i in range(len(parts) - 2):
        if (parts[i].startswith("models--") and parts[i + 1] == "snapshots"
                and re.fullmatch(r"[0-9a-f]{40}", parts[i + 2])):
            return Path(*parts[:i + 1]), parts[i + 2]
    return None


def _hub_repo(source: CheckpointSource) -> str | None:
    """The hub repository ``source`` came from: the id the user typed, or the ``models--org--name`` folder of the
    hub cache it lies in; None for another local path."""
    if not Path(source.spec).expanduser().exists() and _HUB_ID.match(source.spec):
        return source.spec.partition("@")[0]
    for part in reversed(source.path.resolve().parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return part.removeprefix("models--").replace("--", "/", 1)
    return None


def _class_fits(cls: str, library: str | None, config: dict[str, Any]) -> bool:
    """Whether a model class an adapter records is of the architecture a ``config.json`` describes."""
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if cls in architectures:
        return True
    family = _config_family(config)
    families = {_class_family(a) for a in architectures} | ({family} if family else set())
    module = re.fullmatch(r"transformers\.models\.(\w+)\.modeling_\w+", library or "")
    return _class_family(cls) in families or (module is not None and _normal(module.group(1)) in families)


def _config_family(config: dict[str, Any] | None) -> str | None:
    """A config's model type (``model_type``, else its first architecture's family), normalised; None if neither."""
    if not config:
        return None
    model_type = config.get("model_type")
    if isinstance(model_type, str) and model_type:
        return _normal(model_type)
    architectures = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    return _class_family(architectures[0]) if architectures else None


def _class_family(cls: str) -> str:
    """``LlamaForCausalLM``, ``LlamaModel`` → ``llama``: a class name without its task, normalised."""
    return _normal(re.sub(r"(Model)?(For[A-Z]\w*)?$", "", cls) or cls)


def _normal(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _describe_config(config: dict[str, Any] | None) -> str:
    """``model_type 'mistral' (MistralForCausalLM)`` for messages."""
    config = config or {}
    architectures = ", ".join(a for a in config.get("architectures") or [] if isinstance(a, str))
    kind = f"model_type {config['model_type']!r}" if config.get("model_type") else "no model_type"
    return f"{kind} ({architectures})" if architectures else kind


def _config_file(source: CheckpointSource) -> Path:
    """The ``config.json`` a source's ``config`` was read from (beside a single file or an index)."""
    return (source.path if source.path.is_dir() else source.path.parent) / "config.json"
