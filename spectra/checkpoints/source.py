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

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        # get_slice reads the slice's bytes alone (a view of the mapping where safetensors maps through torch);
        # a range, not an int: safetensors < 0.4.3 cannot index a slice by an integer
        try:
            return self._handle.get_slice(name)[expert:expert + 1][0]
        except Exception as err:
            raise CheckpointError(f"cannot read expert {expert} of tensor {name!r} from {self.path}: "
                                  f"{_sentence(err)} The file may be truncated or corrupt; download or save it "
                                  "again.") from err


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
        except pickle.UnpicklingError as err:
            raise CheckpointError(
                f"refusing to unpickle {path}: it holds objects other than tensors, and loading it would "
                f"execute code from the file ({str(err).splitlines()[0]}). Convert it to safetensors in an "
                "environment you trust, then point spectra at the .safetensors file."
            ) from err
        except (RuntimeError, EOFError, OSError, ValueError) as err:
            raise CheckpointError(f"cannot read {path}: {_sentence(err)} The file is truncated or not a torch "
                                  "checkpoint; download or save it again.") from err
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(state).__name__}); "
                                  "spectra needs a mapping of tensor names to tensors.")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.infos = {k: TensorInfo(k, tuple(v.shape), v.dtype, path) for k, v in self._tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def read_expert(self, name: str, expert: int) -> torch.Tensor:
        return self._tensors[name][expert]  # a view of the memory-mapped tensor


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
    """

    path: Path
    spec: str
    files: list[Path]
    config: dict[str, Any] | None = None
    _readers: dict[Path, Any] = field(default_factory=dict, repr=False)
    _infos: dict[str, TensorInfo] = field(default_factory=dict, repr=False)

    _quantized: dict[str, QuantizedTensor] = field(default_factory=dict, repr=False)
    _parts: dict[str, TensorInfo] = field(default_factory=dict, repr=False)  # a quantised weight's stored tensors

    def __post_init__(self) -> None:
        for file in self.files:
            reader = self._reader(file)
            for name, info in reader.infos.items():
                self._infos.setdefault(name, info)
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
        if name in self._quantized:
            return self._quantized[name].decode(*self._stored_parts(name, expert))[0]
        return self._reader(info.file).read_expert(name, expert)

    def storage_format(self, name: str) -> str | None:
        """The quantised format a tensor is stored in (``mxfp4``, ``float8_e4m3fn``), None where it is stored as listed."""
        q = self._quantized.get(name)
        return None if q is None else q.grid

    def quantized_spacing(self, name: str, expert: int | None = None) -> torch.Tensor | None:
        """Each element's grid spacing in a quantised tensor, shaped as :meth:`read`/:meth:`read_expert` give it: the
        rounding its storage made (:mod:`spectra.checkpoints.quantized`); None for any other tensor."""
        q = self._quantized.get(name)
        if q is None:
            return None
        spacing = q.spacing(*self._stored_parts(name, expert))
        return spacing if expert is None else spacing[0]

    def _stored_parts(self, name: str, expert: int | None = None) -> list[torch.Tensor]:
        """A quantised tensor's stored parts (codes, scales): whole, or for one expert each part's slice of it
        (shaped (1, …)), or the part whole where it holds none per expert (one scale for all)."""
        shape = self.info(name).shape
        out = []
        for part in self._quantized[name].parts:
            stored = self._parts[part]
            reader = self._reader(stored.file)
            per_expert = len(stored.shape) >= len(shape) and stored.shape[0] == shape[0]
            out.append(reader.read(part) if expert is None or not per_expert
                       else reader.read_expert(part, expert)[None])
        return out

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
        if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
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
        files = _weight_files_in_dir(path)
        return CheckpointSource(path=path, spec=spec, files=files, config=_read_config(path / "config.json"))
    if path.name.endswith(".json"):
        files = _files_from_index(path)
        return CheckpointSource(path=path, spec=spec, files=files, config=_read_config(path.parent / "config.json"))
    if path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
        return CheckpointSource(path=path, spec=spec, files=[path], config=_read_config(path.parent / "config.json"))
    raise CheckpointError(f"{path} is not a directory, a .safetensors/.bin file or an index .json; "
                          "spectra does not know how to read it.")


def _weight_files_in_dir(path: Path) -> list[Path]:
    # Preference order follows transformers: safetensors over pickle, index over single file.
    for candidate in (SAFETENSORS_INDEX, "model.safetensors", BIN_INDEX, "pytorch_model.bin"):
        p = path / candidate
        if p.is_file():
            return _files_from_index(p) if candidate.endswith(".json") else [p]
    loose = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    if loose:
        return loose
    raise CheckpointError(
        f"no weights found in directory {path}: expected {SAFETENSORS_INDEX}, model.safetensors, "
        f"{BIN_INDEX}, pytorch_model.bin, any *.safetensors file, or {ADAPTER_CONFIG} for a PEFT adapter."
    )


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read the shard index {index}: {_sentence(err)} It must be JSON with a "
                              "'weight_map' of tensor name → shard file.") from err
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        file = index.parent / shard
        if not file.is_file():
            raise CheckpointError(f"shard {shard!r} named in {index} is missing; download the complete checkpoint.")
        files.append(file)
    return files


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


_HUB_PATTERNS = ["config.json", "adapter_config.json", "*.safetensors", "*.safetensors.index.json",
                 "adapter_model.safetensors"]
_HUB_BIN_PATTERNS = ["config.json", "adapter_config.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                     "adapter_model.bin"]


def _resolve_hub(repo_id: str, revision: str | None) -> Path:
    """Resolve a hub id to a local snapshot: cache first, then the network (config + weights only)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:  # pragma: no cover - huggingface_hub is a dependency
        raise CheckpointError("huggingface_hub is needed to resolve hub ids; pip install huggingface_hub") from err

    last_error: Exception | None = None
    for local_only in (True, False):
        for patterns in (_HUB_PATTERNS, _HUB_BIN_PATTERNS):
            try:
                path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                              local_files_only=local_only))
            except Exception as err:  # offline, 404, gated: all become one clear message below
                last_error = err
                continue
            if any(path.glob("*.safetensors")) or any(path.glob("*.bin")):
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
