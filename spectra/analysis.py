"""The whole-model analysis: stream ΔW → spectra → metrics → one row per module.

This is the one module that joins reading (``spectra.checkpoints``) and math
(``spectra.linalg``). It streams ΔW one tensor pair at a time with read-ahead (the
next pair is read while this one is decomposed), caches every finished module on
disk so an interrupted run resumes, and returns an :class:`AnalysisResult` whose
``to_dict()`` is the ``analysis.json`` schema (see the README).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import re
import sys
import time
import warnings
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from spectra.calibration import add_activation_rows, collect_calibration, file_digest
from spectra.checkpoints.adapter import held_factor_bytes
from spectra.checkpoints.architectures import parse_stacks
from spectra.checkpoints.buffers import BufferPool
from spectra.checkpoints.pairing import DeltaW, Pairing, PairingOptions, describe
from spectra.checkpoints.relatedness import relative_size, squared_norms
from spectra.errors import ConfigError
from spectra.files import other_spectra_file, records_in, write_text_atomic
from spectra.linalg import sketch
from spectra.linalg import metrics, noise
from spectra.linalg.svd import Spectrum, adaptive_svd, full_svd, randomized_svd
from spectra.report.tables import analysis_problem
from spectra.workers import frozen_gc, split_workers, thread_pool

SCHEMA_VERSION = 1
_METHODS = ("auto", "full", "randomized", "adaptive", "sketch")


@dataclass(frozen=True)
class AnalysisConfig:
    """How to analyse a pair. Written into every report so a result can be reproduced."""

    method: str = "auto"  # exact spectrum for small matrices, the bf16 energy sketch ("sketch") above full_below
    full_below: int = 1024  # short side at or below which a full SVD takes well under a second
    max_rank: int | None = None  # cap on singular values computed by randomized/adaptive (None: no cap)
    thresholds: tuple[float, ...] = (0.5, 0.9, 0.95, 0.99)  # energy ranks reported; the adaptive path resolves the largest
    base_top_k: int = 0  # top singular values of W_base kept per row (0: none). No report reads them, and on a
    # TinyLlama-shaped pair 16 of them cost 12 % of the analysis, so they are asked for (--base-top-k)
    base_top_iter: int = 2  # Krylov depth for W_base's top σ above full_below (sketch.top_values: outliers to ~1e-3)
    resolve: float = 0.9  # energy whose rank "sketch" must get exactly (±1); higher thresholds only when within reach
    # GEMM dtype of the sketch's power steps; Rayleigh–Ritz stays fp32. "auto": bfloat16 where this device runs its
    # GEMMs ≥ 1.25× float32's rate (2–5× with AMX, AVX-512 BF16, GPUs since Ampere), else float32 (an AVX2-only CPU
    # emulates bf16 50–300× slower than float32): measured once per process, and written into the report resolved.
    # Left "auto" (not measured, nothing sketches) for method full/randomized/adaptive without base_top_k
    sketch_dtype: str = "auto"
    roles: tuple[str, ...] | None = None  # passed to the pairing: which modules to analyse
    stacks: tuple[str, ...] | None = None  # and of which stacks (language, vision, encoder, …); None: every one
    layers: tuple[int, int] | None = None
    include: str | None = None
    exclude: str | None = None
    dtype: str = "float32"  # exact for bf16/fp16 checkpoints
    device: str = "cpu"
    seed: int = 0  # randomized paths are deterministic given the seed
    on_nonfinite: str = "error"
    calibration: str | None = None  # data file: adds each row's activation-weighted spectrum (spectra.calibration)
    calibration_epsilon: float = 1e-6  # ridge of C relative to its mean eigenvalue: sets input_rank, not the spectrum
    calibration_examples: int | None = 256  # first examples of the file: C of a 1k-dim layer at a few forwards' cost
    # Is the base's rounding in ΔW? "auto": decided per module from ΔW's residual; "exact": the fine-tune started
    # from the base's stored values (a bf16 release tuned and saved in bf16); "counted": both were rounded from finer
    # weights (two releases trained in fp32). See spectra.linalg.noise.
    base_rounding: str = "auto"

    def __post_init__(self) -> None:
        if self.method not in _METHODS:
            raise ConfigError(f"method: {self.method!r} is not one of {', '.join(_METHODS)}.")
        object.__setattr__(self, "thresholds", _energy_fractions(self.thresholds))
        if self.max_rank is not None and self.max_rank < 1:
            raise ConfigError(f"max_rank: {self.max_rank} must be ≥ 1 (or None for no cap).")
        for name in ("full_below", "base_top_k", "base_top_iter"):  # the one at fault, by its name and value
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: {getattr(self, name)} must be ≥ 0.")
        if not 0 < self.resolve <= 1:
            raise ConfigError(f"resolve: {self.resolve} must be an energy fraction in (0, 1].")
        if self.base_rounding not in metrics.BASE_ROUNDING:
            raise ConfigError(f"base_rounding: {self.base_rounding!r} is not one of "
                              f"{', '.join(metrics.BASE_ROUNDING)}.")
        if self.sketch_dtype not in ("auto", "bfloat16", "float16", "float32"):
            raise ConfigError(f"sketch_dtype: {self.sketch_dtype!r} is not one of auto, bfloat16, float16, float32.")
        object.__setattr__(self, "stacks", parse_stacks(self.stacks))  # "decoder" spelled "language", once
        self.pairing_options()  # validates roles, stacks, layers, filters, dtype, device
        if self.sketch_dtype == "auto" and (self.method in ("auto", "sketch") or self.base_top_k > 0):
            from spectra.linalg.hardware import fast_sketch_dtype

            object.__setattr__(self, "sketch_dtype", fast_sketch_dtype(self.device))
        if self.calibration is not None:
            object.__setattr__(self, "calibration", str(self.calibration))
            if not Path(self.calibration).is_file():
                what = "is a folder, not a file" if Path(self.calibration).is_dir() else "does not exist"
                raise ConfigError(f"calibration: data file {self.calibration} {what}; pass a .txt or .jsonl "
                                  "file of the inputs the model sees.")
            self.calibration_config()  # validates epsilon and examples

    def calibration_config(self):
        from spectra.calibration import CalibrationConfig

        return CalibrationConfig(epsilon=self.calibration_epsilon, max_examples=self.calibration_examples,
                                 device=self.device)

    def pairing_options(self) -> PairingOptions:
        return PairingOptions(roles=self.roles, stacks=self.stacks, layers=self.layers, include=self.include,
                              exclude=self.exclude,
                              dtype=self.dtype, device=self.device, with_weights=True, weights_as_stored=True,
                              on_nonfinite=self.on_nonfinite, low_copy_above=self._sketched_above())

    def sketched_above(self) -> int | None:
        """Short side above which a matrix goes to the energy sketch, in any sketch dtype (None: none does)."""
        return {"auto": self.full_below, "sketch": 0}.get(self.method)

    def _sketched_above(self) -> int | None:
        """Short side above which a matrix goes to the bf16 sketch (None: none does)."""
        return self.sketched_above() if self.sketch_dtype == "bfloat16" else None


def _refuse_an_empty_selection(pairing: Pairing, config: AnalysisConfig) -> None:
    """Refuse, before the stream starts, a selection (roles, stacks, layers, include, exclude) that leaves no weight
    matrix: the run read the whole pair and then failed on an empty report, naming no option."""
    if any(e.kind == "matrix" for e in pairing.entries):
        return

    def typed(name, value):  # as typed on the command line: layers 5-9, roles q,v
        if name == "layers" and isinstance(value, tuple) and len(value) == 2:  # --layers 5 is (5, 5)
            return f"{value[0]}" if value[0] == value[1] else f"{value[0]}-{value[1]}"
        return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)

    chosen = [f"{name}={typed(name, value)}" for name in ("roles", "stacks", "layers", "include", "exclude")
              if (value := getattr(config, name)) is not None]
    if chosen:
        raise ConfigError(f"no weight matrix of {pairing.base.spec} × {pairing.tuned.spec} matches "
                          f"{', '.join(chosen)}; `spectra pairs BASE TUNED` lists every pair with its name, role "
                          "and layer.")


def _energy_fractions(thresholds) -> tuple[float, ...]:
    """``thresholds`` as sorted floats, each an energy fraction in (0, 1]; an error names the values at fault as
    given (``1.5``), not the tuple that holds them."""
    if isinstance(thresholds, (int, float, str)):  # one value where a tuple goes: (0.9,), not 0.9
        raise ConfigError(f"thresholds: {thresholds!r} is one value; pass a tuple of energy fractions in (0, 1], "
                          "e.g. (0.5, 0.9).")
    try:
        values = [(t, float(t)) for t in thresholds]
    except (TypeError, ValueError):
        raise ConfigError(f"thresholds: {thresholds!r} must be numbers: energy fractions in (0, 1].") from None
    if not values:
        raise ConfigError("thresholds: none given; pass at least one energy fraction in (0, 1].")
    bad = [str(t) for t, value in values if not 0 < value <= 1]  # NaN included
    if bad:
        raise ConfigError(f"thresholds: {', '.join(bad)} must be " + ("an energy fraction" if len(bad) == 1 else
                                                                      "energy fractions") + " in (0, 1].")
    return tuple(sorted(value for _, value in values))


@dataclass
class AnalysisResult:
    """Per-module rows plus the run's config, inputs, versions and timings.

    ``modules`` holds plain dicts (the ``analysis.json`` rows), so the result reads the
    same whether it was just computed or loaded from disk.
    """

    config: dict[str, Any]
    base: dict[str, Any]
    tuned: dict[str, Any]
    modules: list[dict[str, Any]]
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    pairing: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] | None = None  # Calibration.describe() of a calibrated run: data, length, notes
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = {"schema_version": self.schema_version, "config": self.config, "base": self.base,
               "tuned": self.tuned, "versions": self.versions, "timings": self.timings,
               "pairing": self.pairing}
        if self.calibration is not None:  # absent without calibration data (and in older files)
            out["calibration"] = self.calibration
        return out | {"modules": self.modules}

    def matrices(self) -> list[dict[str, Any]]:
        return [m for m in self.modules if m["kind"] == "matrix"]

    def module(self, name: str) -> dict[str, Any]:
        for m in self.modules:
            if m["name"] == name:
                return m
        raise KeyError(name)

    def figures(self) -> dict:
        """The report's matplotlib figures by name (decay, cumulative energy, heatmaps, histogram)."""
        from spectra.report.plots import all_figures

        return all_figures(self.to_dict())

    def role_summary(self) -> list[dict[str, Any]]:
        """Statistics of each role of each stack over its modules (median, quartiles, range of each metric):
        one dict per (stack, role), "vision q" apart from the language model's q
        (:func:`~spectra.report.tables.summary_rows`)."""
        from spectra.report.tables import summary_rows

        return summary_rows(self.to_dict())

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``analysis.json`` atomically (temp file, then rename)."""
        from spectra.report.render import analysis_json

        return write_text_atomic(path, analysis_json(self.to_dict()))

    def write_report(self, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """``analysis.json``, ``report.md``, ``report.html`` and figures, written atomically."""
        from spectra.report.render import write_report

        return write_report(self.to_dict(), out_dir, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> AnalysisResult:
        """Read an ``analysis.json`` (or a report directory holding one)."""
        path = Path(path)
        if path.is_dir():
            inside = [] if (path / "analysis.json").exists() else records_in(path)
            if inside:  # a sweep's, a check's folder: named
                raise ConfigError(f"{path} holds no analysis.json but {'; '.join(inside)}: pass the report directory "
                                  "of `spectra analyze` or its analysis.json.")
            path = path / "analysis.json"
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise ConfigError(f"cannot read analysis {path}: {err}. Pass a report directory written by "
                              "`spectra analyze` or its analysis.json.") from err
        other = other_spectra_file(data)  # a plan, a sweep: named, as recommend names it
        if other:
            raise ConfigError(f"{path} is {other}, not an analysis: pass the report directory of `spectra analyze` "
                              "or its analysis.json.")
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version is None and "modules" not in (data if isinstance(data, dict) else {}):  # a config.json, {}
            raise ConfigError(f"{path} is not an analysis spectra wrote (no schema_version): pass the report "
                              "directory of `spectra analyze` or its analysis.json.")
        if version != SCHEMA_VERSION:
            raise ConfigError(f"{path} has schema_version {version!r}; this spectra reads version {SCHEMA_VERSION}.")
        problem = analysis_problem(data)
        if problem:
            raise ConfigError(f"{path} is not an analysis spectra wrote ({problem}); re-run `spectra analyze`.")
        from spectra.groups import model_type_of, rows_with_stacks

        # a row without a stack (a file written before spectra labelled it: an old ViT's, an old SAM's mask decoder)
        # reads with the stack a new run gives it, by its name and the checkpoint's model type
        modules = rows_with_stacks(data["modules"], model_type_of(data), data.get("config"))
        return cls(**{k: data[k] for k in ("config", "base", "tuned")}, modules=modules,
                   versions=data.get("versions", {}), timings=data.get("timings", {}),
                   pairing=data.get("pairing", {}), calibration=data.get("calibration"), schema_version=version)


# ---------------------------------------------------------------------------- one module


def module_spectrum(delta: torch.Tensor, config: AnalysisConfig, *, total_energy: float | None = None,
                    low: torch.Tensor | None = None) -> Spectrum:
    """Spectrum of one ΔW by the configured method ("auto": full when small, else the bf16 energy sketch,
    which takes `low`, ΔW already rounded to bf16, when given)."""
    method = config.method
    if method == "auto":
        method = "full" if min(delta.shape) <= config.full_below else "sketch"
    if method == "sketch":
        total = sketch.squared_norm(delta) if total_energy is None else total_energy
        return sketch.energy_sketch(delta, energy=config.resolve, thresholds=config.thresholds, total_energy=total,
                                    max_rank=config.max_rank, seed=config.seed,
                                    sketch_dtype=getattr(torch, config.sketch_dtype),
                                    low=low if config.sketch_dtype == "bfloat16" else None)
    if method == "full":
        return full_svd(delta)
    if method == "randomized":
        k = min(config.max_rank or 256, min(delta.shape))
        return randomized_svd(delta, k, random_state=config.seed)
    return adaptive_svd(delta, energy=max(config.thresholds), max_rank=config.max_rank, random_state=config.seed,
                        whole_fallback=True)


def analyze_delta(d: DeltaW, config: AnalysisConfig) -> dict[str, Any]:
    """Every metric of one ΔW record, as an ``analysis.json`` row."""
    start = time.perf_counter()
    row: dict[str, Any] = {"name": d.name, "role": d.role}
    if d.stack is not None:  # a vision tower's, an encoder's: absent for the language model's (and in older files)
        row["stack"] = d.stack
    row.update({
        "layer": d.layer, "expert": d.expert, "kind": d.kind,
        "fused_name": d.fused_name, "conv1d": d.conv1d, "shape": list(d.shape),
        "base_dtype": d.base_format or d.base_dtype, "tuned_dtype": d.tuned_format or d.tuned_dtype,
        "base_tensor": d.base_tensor,
    })
    fro2, base2 = squared_norms(d)
    fro, base_fro = math.sqrt(fro2), math.sqrt(base2)
    relative = relative_size(fro, base_fro)  # 0 for unchanged zeros: no update
    row.update(fro_norm=fro, base_fro_norm=base_fro, relative_size=relative)
    if d.added_rows:
        row["added_rows"] = d.added_rows
    if d.kind != "matrix":
        row["seconds"] = time.perf_counter() - start
        return row

    floor = sketch.sampled_noise_floor(  # a quantised side's grid, where pairing gave it (which says when)
        d.base, d.tuned, base_dtype=_dtype(d.base_dtype), tuned_dtype=_dtype(d.tuned_dtype),
        base_grid=None if d.base_spacing is None else (d.base_format, d.base_spacing),
        tuned_grid=None if d.tuned_spacing is None else (d.tuned_format, d.tuned_spacing))
    quantised = d.base_spacing is not None or d.tuned_spacing is not None
    tuned_floor = None  # the fine-tune's rounding alone: the floor when it started from the base's stored values
    if config.base_rounding == "exact" or (config.base_rounding == "auto" and not quantised):
        tuned_floor = noise.tuned_side_floor(floor, d.tuned, tuned_dtype=_dtype(d.tuned_dtype),
                                             tuned_spacing=d.tuned_spacing)
    profile = None  # each side's rounding variance by row and column: auto's choice weighs by it under a large update
    if config.base_rounding == "auto" and not quantised:
        profile = noise.large_update_profile(d.base, d.tuned, base_dtype=_dtype(d.base_dtype),
                                             tuned_dtype=_dtype(d.tuned_dtype), relative=relative)
    d.base_spacing = d.tuned_spacing = None
    d.tuned = None  # not needed any more: free it before the decomposition's workspace
    spec = module_spectrum(d.delta, config, total_energy=fro2, low=d.delta_low)
    values = spec.values.double().cpu()
    ranks = metrics.energy_ranks(spec, config.thresholds, total_energy=spec.total_energy) if fro else {}
    row["energy_rank"] = {_key(t): ranks.get(t, 0) for t in config.thresholds}
    if spec.rank_bounds:  # levels the sketch could not settle: null in energy_rank, an interval here
        row["energy_rank_bounds"] = {_key(t): list(b) for t, b in spec.rank_bounds.items()}
    positive = values[values > 0]
    whole = spec.complete or not fro  # the entropy and the nuclear norm need every σ, not the top ones
    row["effective_rank"] = (metrics.effective_rank(positive) if positive.numel() else 0.0) if whole else None
    row["stable_rank"] = metrics.stable_rank(spec, total_energy=spec.total_energy) if fro else 0.0
    row["participation_ratio"] = metrics.participation_ratio(spec, total_energy=spec.total_energy) if fro else 0.0
    row["nuclear_fro_ratio"] = ((metrics.nuclear_frobenius_ratio(positive) if positive.numel() else 0.0)
                                if whole else None)
    # Singular values below σ₁·max(m, n)·eps(float32) are round-off of the decomposition itself
    # (numpy.linalg.matrix_rank's default tolerance): no threshold may count them as signal.
    numerical = float(values[0]) * max(d.shape) * torch.finfo(torch.float32).eps if values.numel() else 0.0
    floor = noise.settle_floor(config.base_rounding, floor, tuned_floor, spec, tuple(d.shape), total_energy=fro2,
                               numerical=numerical, quantised=quantised, delta=d.delta, seed=config.seed,
                               profile=profile)
    gd = _gavish_donoho(spec, d.shape, floor)
    gd_rank = int((values > max(gd.threshold, numerical)).sum())
    row["gd_rank"] = None if not spec.complete and gd_rank == values.numel() else gd_rank  # else a lower bound
    row["gd"] = {"threshold": gd.threshold, "noise_sigma": gd.noise_sigma, "known_noise": gd.known_noise}
    # above the edge's Tracy–Widom margin: pure noise passes the bare edge in 17–44 % of matrices (noise.rank_above)
    noise_rank = noise.rank_above(values, floor.mp_edge, tuple(d.shape), numerical=numerical)
    if not spec.complete and noise_rank == values.numel():
        noise_rank = None  # every value held is above the floor: the count is a lower bound, not known
    row["noise"] = {"sigma": floor.sigma, "fro": floor.noise_fro, "mp_edge": floor.mp_edge, "rank_above": noise_rank,
                    "base_rounding": floor.base_rounding, "sigma_residual": floor.sigma_residual}
    row["numerical_tolerance"] = numerical
    row["decay"] = _decay(values, noise_rank)
    row["singular_values"] = [float(v) for v in values]
    row["captured_energy"] = spec.captured_fraction
    row["base_top_singular_values"] = _top_values(d.base, config)
    row["method"], row["tolerance"], row["complete"] = spec.method, _finite_or_none(spec.tolerance), spec.complete
    row["seconds"] = time.perf_counter() - start
    return row


def _gavish_donoho(spec: Spectrum, shape, floor) -> metrics.GavishDonoho:
    """Unknown-noise GD from the whole spectrum when we have it and it has at least ``GD_MIN_SHORT_SIDE`` values,
    else known-noise from the dtype floor (a 1×n head or a 3-label classifier: too few values for the median to
    be noise's; on 1×n the unknown form gave 0 whatever the update)."""
    if (spec.complete and spec.k == min(shape) and min(shape) >= metrics.GD_MIN_SHORT_SIDE
            and spec.total_energy > 0):
        return metrics.gavish_donoho(spec, tuple(shape))
    return metrics.gavish_donoho(spec, tuple(shape), sigma=floor.sigma)


def _decay(values: torch.Tensor, noise_rank: int | None) -> dict[str, Any] | None:
    """Power-law fit over the signal part: values above the noise floor (all when there is none)."""
    positive = int((values > 0).sum())
    stop = positive if noise_rank is None else min(positive, noise_rank)  # 0 above the floor: nothing to fit
    if stop < 3:
        return None
    fit = metrics.decay_fit(values, stop=stop)
    return {"exponent": fit.alpha, "r2": fit.r2, "n_points": fit.n_points}


def _top_values(base: torch.Tensor, config: AnalysisConfig) -> list[float]:
    k = min(config.base_top_k, min(base.shape))
    if k == 0:
        return []
    if min(base.shape) <= config.full_below:
        values = full_svd(base).values[:k]
    else:
        values = sketch.top_values(base, k, n_iter=config.base_top_iter, seed=config.seed,
                                   gemm_dtype=torch.bfloat16 if config.sketch_dtype == "bfloat16" else torch.float32)
    return [float(v) for v in values.double().cpu()]


def _key(t: float) -> str:
    return f"{t:g}"


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


# ---------------------------------------------------------------------------- cache


class ModuleCache:
    """Finished modules on disk, keyed by inputs + config, so interrupted runs resume.

    One JSON file per pairing entry, written atomically, and beside them, for a calibrated run, the calibration's
    description (:meth:`calibration`). A changed input (content samples, file sizes and mtimes, config.json, an
    adapter's config), analysis config, calibration data or spectra code (the source of the modules that compute
    rows) gives a different key, i.e. a fresh cache. A cache that cannot be written is given up with a warning; the
    analysis goes on.
    """

    # the calibration's description: no entry's file, each of which ends in "-<digest>.json", has this name
    CALIBRATION_FILE = "calibration.json"

    def __init__(self, root: Path | None, key: str):
        self.dir = None if root is None else Path(root) / key

    @staticmethod
    def default_root() -> Path:
        return Path(os.environ.get("SPECTRA_CACHE", Path.home() / ".cache" / "spectra")) / "analysis"

    def _path(self, entry_name: str) -> Path:
        safe = re.sub(r"[^\w.\-\[\]]", "_", entry_name)
        digest = hashlib.sha1(entry_name.encode()).hexdigest()[:8]
        return self.dir / f"{safe}-{digest}.json"

    def has(self, entry_name: str) -> bool:
        """Whether a file for this entry exists (not read: :meth:`get` still refuses an unreadable one)."""
        return self.dir is not None and self._path(entry_name).is_file()

    def get(self, entry_name: str) -> list[dict] | None:
        if self.dir is None:
            return None
        path = self._path(entry_name)
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        valid = isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows)
        return rows if valid else None  # anything else (an edited or foreign file) is recomputed

    def put(self, entry_name: str, rows: list[dict]) -> None:
        if self.dir is not None:
            self._write(self._path(entry_name), rows)

    def calibration(self) -> dict | None:
        """The description (``Calibration.describe()``, as JSON reads it back) of the calibration the cached rows were
        computed with, or None (none stored, or an unreadable file: collected again)."""
        if self.dir is None:
            return None
        try:
            record = json.loads((self.dir / self.CALIBRATION_FILE).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def put_calibration(self, record: dict) -> None:
        if self.dir is not None:
            self._write(self.dir / self.CALIBRATION_FILE, record)

    def _write(self, path: Path, value) -> None:
        """``value`` as JSON at ``path`` through a temporary sibling and one rename; on failure, no cache from now."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(path, json.dumps(value, allow_nan=True))
        except OSError as err:
            warnings.warn(f"the analysis cache {self.dir} cannot be written ({err}); going on without it "
                          "(--no-cache or SPECTRA_CACHE=elsewhere to choose)", RuntimeWarning, stacklevel=3)
            self.dir = None


def cache_key(base_fp: dict, tuned_fp: dict, config: AnalysisConfig, stamps: list | None = None) -> str:
    """Key of a cache of rows: the inputs' fingerprints and file stamps, the config, and spectra's code."""
    from spectra import __version__

    payload = json.dumps([SCHEMA_VERSION, __version__, _code_digest(), base_fp, tuned_fp, _config_dict(config),
                          stamps or []], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def _code_digest() -> str:
    """Hash of the source that computes rows: rows cached by other code are never reused."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for file in sorted([root / "analysis.py", root / "calibration.py", root / "lora" / "data.py",
                        *root.glob("linalg/*.py"), *root.glob("checkpoints/*.py")]):
        h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()[:16]


def _calibration_digest(data, base) -> str:
    """The calibration data's content and the tokenizer files that cut it into tokens."""
    from spectra.lora.train import model_dir

    h = hashlib.sha256(file_digest(data).encode())
    try:
        folder = model_dir(base)
    except ConfigError:
        return h.hexdigest()[:16]
    for file in sorted(folder.iterdir()):
        if re.match(r"(tokenizer|vocab|merges|special_tokens_map|spiece|sentencepiece)|.*\.model$", file.name):
            h.update(file.name.encode() + file.read_bytes())
    return h.hexdigest()[:16]


def _stamps(*sources) -> list:
    """(name, size, mtime_ns) of every file behind the sources: an in-place rewrite misses the cache."""
    out = []
    for source in sources:
        weights = getattr(source, "weights", source)  # an adapter: its weight file and its config
        files = list(weights.files) + ([source.path / "adapter_config.json"] if weights is not source else [])
        for file in files:
            st = Path(file).stat()
            out.append([Path(file).name, st.st_size, st.st_mtime_ns])
    return out


def _config_dict(config: AnalysisConfig) -> dict[str, Any]:
    out = asdict(config)
    if out["stacks"] is None:  # absent without a stack selection: a run's configuration reads as before it existed
        del out["stacks"]
    for k, v in out.items():
        if isinstance(v, tuple):
            out[k] = list(v)
    return out


# ---------------------------------------------------------------------------- whole model


@frozen_gc
def analyze(base, tuned, config: AnalysisConfig | None = None, *, cache_dir: str | os.PathLike | None | bool = True,
            progress: bool = True, on_module: Callable[[str, list[dict]], None] | None = None,
            read_ahead: int = 2, read_ahead_mb: int = 512, workers: int | None = None) -> AnalysisResult:
    """Analyse every ΔW of a checkpoint pair.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the modules are handed out one at a time to
    whichever rank asks next, each rank reading only the tensors of those it took, and
    every rank returns the whole result (see :mod:`spectra.distributed`); it equals a
    single-process run's. ``timings`` then counts this rank's modules (``modules_computed``,
    and ``modules_cached``: those it read from a cache and reports, its turn of the modules
    its cache holds).

    Parameters
    ----------
    base, tuned : str, path or source
        Pretrained checkpoint, and the fine-tuned one (or a PEFT adapter).
    config : AnalysisConfig, optional
    cache_dir : path, True, False or None
        Where finished modules are cached (True: ``$SPECTRA_CACHE`` or
        ``~/.cache/spectra``; False/None: no cache). A re-run with the same inputs and
        config reads every module back; an interrupted run resumes.
    progress : bool
        Show a tqdm bar (module name and ETA) on stderr (rank 0 only under torchrun).
    on_module : callable, optional
        Called as ``on_module(entry_name, rows)`` after each module is finished.
    read_ahead : int, default 2
        With one worker: entries read (and subtracted) ahead of the one being
        decomposed by a reader thread, so short modules never leave the math waiting on
        the disk. 0 reads in line.
    read_ahead_mb : int, default 512
        Most ΔW data (MB, float32) held by the entries in flight (one always goes); an
        entry that would exceed it waits, so peak memory stays bounded by the largest
        tensors, not by the model. An adapter's LoRA factors held across a module's
        experts (``target_parameters``) come out of it too, as much as the reading
        threads can hold at once, from what it holds beyond room for the largest module
        beside another (two running at once, or one read ahead); what does not fit there
        is held on top of it, with a warning (4 workers on gpt-oss-120b at r = 16 hold
        590 MB), rather than leave the modules to run one at a time.
    workers : int, optional
        Modules analysed at once, each by its own thread that reads and decomposes whole
        entries with ``torch.get_num_threads() // workers`` torch threads. Default: one
        per torch thread up to 4 on the CPU (2 cores: 2 workers × 1 thread, 1.7× faster
        than 1 × 2 on a 1.1B pair, since the work between the GEMMs is serial), 1 on a GPU.
        Results do not depend on it beyond floating-point rounding.

    Returns
    -------
    AnalysisResult
    """
    import tqdm

    from spectra.distributed import all_gather_rows, cached_owners, claims, entry_cost, shard, world

    config = config or AnalysisConfig()
    if read_ahead < 0 or read_ahead_mb < 0:
        raise ConfigError(f"read_ahead={read_ahead} and read_ahead_mb={read_ahead_mb} must be ≥ 0.")
    n_workers, threads = split_workers(workers, config.device)
    t0 = time.perf_counter()
    me = world(config.device)
    if me.distributed:  # every rank sketches in rank 0's dtype, so the rows equal a single process's
        config = replace(config, sketch_dtype=me.broadcast(config.sketch_dtype))
    pairing = Pairing(base, tuned, replace(config.pairing_options(), device=me.device))
    _refuse_an_empty_selection(pairing, config)
    base_fp, tuned_fp = pairing.base.fingerprint(), pairing.tuned.fingerprint()
    root = ModuleCache.default_root() if cache_dir is True else (cache_dir or None)
    calibration_key = "" if config.calibration is None else "-" + _calibration_digest(config.calibration, base)
    cache = ModuleCache(root, cache_key(base_fp, tuned_fp, config, _stamps(pairing.base, pairing.tuned))
                        + calibration_key)

    if not me.distributed:
        found = {entry.name: rows for entry in pairing.entries if (rows := cache.get(entry.name)) is not None}
        cached_anywhere = found  # every module cached anywhere in the job (under torchrun: → the rank reporting it)
    else:  # every rank looks (a node's own cache holds what it computed); one holder of each reads and reports it
        cached_anywhere = cached_owners([e.name for e in pairing.entries if cache.has(e.name)], me)
        mine = [name for name, rank in cached_anywhere.items() if rank == me.rank]
        found = {name: rows for name in mine if (rows := cache.get(name)) is not None}
        unreadable = cached_owners([name for name in mine if name not in found], me)  # (collective) recomputed
        cached_anywhere = {name: rank for name, rank in cached_anywhere.items() if name not in unreadable}
    rows_by_entry: dict[str, list[dict]] = {}
    for name, cached in found.items():
        if cached and all("skipped" in row for row in cached):  # skipped before (NaN/Inf): still skipped
            pairing.skipped_entries[name] = "; ".join(row["skipped"] for row in cached)
        rows_by_entry[name] = [] if name in pairing.skipped_entries else cached
    todo = [entry for entry in pairing.entries if entry.name not in cached_anywhere]  # the job's, on every rank
    source, claimed = todo, None  # what this process computes: under torchrun, claimed from `todo` as it goes
    if me.distributed:
        costs = [entry_cost(entry.shape, config.sketched_above()) for entry in todo]
        # Several workers keep fixed shares: their scheduler picks, from the whole share, the largest module that
        # fits the memory left beside the running ones, which one claimed module at a time cannot offer (on
        # Llama-3-8B shapes, 512 MB: a simulation had 2 workers idle for +26 % per rank on claims). Every rank
        # asks (a collective): claims only where every rank has one worker (thread counts may differ by node)
        claimed = claims([todo[i] for i in sorted(range(len(todo)), key=lambda i: (-costs[i], i))], me,
                         wanted=n_workers == 1)
        source = claimed if claimed is not None else [todo[i] for i in shard(costs, me.size)[me.rank]]
    bar = tqdm.tqdm(total=len(pairing.entries), initial=len(pairing.entries) - len(todo), unit="module",
                    disable=not progress or not me.is_main, desc="analyze", dynamic_ncols=True)
    read_s = compute_s = 0.0
    computed = 0
    calibration, calibration_record = _calibration(base, config, cache, collect=bool(todo),
                                                   progress=progress and me.is_main)
    if n_workers == 1:
        stream = _serial(pairing, source, config, calibration, read_ahead, read_ahead_mb << 20,
                         known=source if claimed is None else todo)
    else:
        stream = _parallel(pairing, source, config, calibration, n_workers, threads, read_ahead_mb << 20)
    with contextlib.closing(stream):  # an error here stops the workers now, not at garbage collection
        try:
            for entry, rows, entry_read_s, entry_compute_s in stream:
                read_s += entry_read_s
                compute_s += entry_compute_s
                computed += 1
                bar.set_postfix_str(entry.name, refresh=False)
                skipped = entry.name in pairing.skipped_entries and not rows
                cache.put(entry.name, [{"name": entry.name, "skipped": pairing.skipped_entries[entry.name]}]
                          if skipped else rows)  # a skip is remembered, so a rerun lists it again
                rows_by_entry[entry.name] = rows
                if on_module is not None:
                    on_module(entry.name, rows)
                if claimed is None:
                    bar.update(1)
                else:  # every rank counts its finished modules in the store: rank 0's bar shows the job's
                    claimed.finish()
                    bar.update(min(bar.total, bar.total - len(todo) + claimed.finished()) - bar.n)
        except KeyboardInterrupt:
            bar.close()
            _interrupted(computed, len(pairing.entries), cache, cached=len(pairing.entries) - len(todo),
                         parallel=n_workers > 1, rank=me.rank if me.distributed else None)
            raise  # closing the stream then waits for the modules in flight (torch cannot be stopped mid-GEMM)
    rows_by_entry = all_gather_rows(rows_by_entry, me)  # (every rank has finished once this returns)
    bar.update(bar.total - bar.n)
    bar.close()
    skipped = all_gather_rows(dict(pairing.skipped_entries), me)  # every rank's (under torchrun)
    pairing.skipped_entries = {e.name: skipped[e.name] for e in pairing.entries if e.name in skipped}
    pairing.skipped = list(pairing.skipped_entries.values())  # in entry order, however the work was spread

    modules = [row for entry in pairing.entries for row in rows_by_entry[entry.name]]
    from spectra import __version__

    return AnalysisResult(
        config=_config_dict(config), base=base_fp, tuned=tuned_fp, modules=modules,
        versions={"spectra": __version__, "torch": torch.__version__, "python": platform.python_version()},
        timings={"total_s": time.perf_counter() - t0, "read_wait_s": read_s, "compute_s": compute_s,
                 "modules_computed": computed, "modules_cached": len(found), "world_size": me.size,
                 "workers": n_workers, "threads_per_worker": threads}
                | ({"shared_by": "claims" if claimed is not None else "fixed shares"} if me.distributed else {}),
        pairing=describe(pairing), calibration=calibration_record,
    )


def _calibration(base, config: AnalysisConfig, cache: ModuleCache, *, collect: bool, progress: bool):
    """(Calibration or None, its description for ``analysis.json`` or None) of a run.

    The activations are collected when modules remain to compute (`collect`), or when the cache holds modules but
    not the description (written before them, so only a lost file does that): a rerun served from the cache
    still reports the data, the token length and the notes (a length cut to the model's positions) it was
    computed with, without running the model again.
    """
    if config.calibration is None:
        return None, None
    cached = cache.calibration()
    if not collect and cached is not None:
        return None, cached
    calibration = collect_calibration(base, config.calibration, config=config.calibration_config(),
                                      progress=progress)
    record = json.loads(json.dumps(calibration.describe()))  # as analysis.json will read back
    cache.put_calibration(record)
    return (calibration if collect else None), record


def _interrupted(finished: int, total: int, cache: ModuleCache, *, cached: int, parallel: bool,
                 rank: int | None = None) -> None:
    """Tell the user what an interrupt keeps, before the wait for the modules in flight: `finished` by this
    process, `cached` before it started (the whole job's), of `total`; under torchrun (`rank`) each rank says its own."""
    where = (f"are cached in {cache.dir}: the same command resumes from there" if cache.dir is not None
             else "were not cached (no cache directory): a rerun starts over")
    wait_note = "; stopping after the modules in flight" if parallel else ""
    count = (f"{cached + finished} of {total} modules finished" if rank is None else
             f"{finished} modules finished on rank {rank} ({cached} were cached before, {total} in all)")
    print(f"\ninterrupted: {count} and {where}{wait_note}.", file=sys.stderr, flush=True)


def _analyze_entry(deltas: list[DeltaW], config: AnalysisConfig, calibration) -> list[dict]:
    rows = [analyze_delta(d, config) for d in deltas]
    if calibration is not None:
        add_activation_rows(rows, deltas, calibration, thresholds=config.thresholds)
    return rows


def _serial(pairing: Pairing, todo, config: AnalysisConfig, calibration, depth: int, budget: int, *,
            known: list | None = None):
    """Yield (entry, rows, read s, compute s) in order, decomposing on this thread (read-ahead aside).
    `todo` may be an iterable that hands entries out as they are asked for (:class:`~spectra.distributed.Claims`);
    `known` then lists every entry it may hand out, for the memory budget."""
    for entry, deltas, waited, lease in _read_ahead(pairing, todo, depth, budget, known=known):
        start = time.perf_counter()
        rows = _analyze_entry(deltas, config, calibration)
        del deltas
        lease.close()
        yield entry, rows, waited, time.perf_counter() - start


def _parallel(pairing: Pairing, todo: list, config: AnalysisConfig, calibration, workers: int, threads: int,
              budget: int):
    """Yield (entry, rows, read s, compute s) as entries finish, from `workers` threads that each
    read and decompose whole entries.

    Each worker runs torch with `threads` threads (thread-local), so the serial work
    around the GEMMs of one module overlaps another module's. Entries start largest
    first (so no big one is left for last while the other workers idle), and the
    running ones hold at most `budget` bytes of ΔW (one always runs; an entry that does not
    fit yet lets the next largest that does go first), so memory stays bounded by a few
    tensors. The factors the workers hold across an adapter module's experts are reserved
    from `budget` first, down to room for the two largest entries at once (:func:`_entry_budget`).
    ΔW goes into buffers reused from entry to entry
    (:class:`~spectra.checkpoints.buffers.BufferPool`: no page faults on fresh memory).
    """
    from spectra.distributed import entry_cost

    budget = _entry_budget(pairing, todo, budget, readers=workers)
    buffers = BufferPool(max_free=2 * workers)

    def task(entry):
        start = time.perf_counter()
        with buffers.lease() as lease:
            deltas = pairing.load(entry, lease=lease)
            loaded = time.perf_counter()
            rows = _analyze_entry(deltas, config, calibration)
            del deltas
        return rows, loaded - start, time.perf_counter() - loaded

    opts = pairing.options
    queue = sorted(todo, key=lambda e: -entry_cost(e.shape, config.sketched_above()))
    sizes = [_entry_bytes(e, opts) for e in queue]  # kept in step with queue
    running: dict = {}  # future -> (entry, its bytes)
    with thread_pool(workers, threads, "spectra-analyze") as pool:
        while queue or running:
            while queue and len(running) < workers:
                busy = sum(size for _, size in running.values()) if running else None
                i = _first_fitting(sizes, busy, budget)
                if i is None:
                    break
                entry = queue.pop(i)
                running[pool.submit(task, entry)] = (entry, sizes.pop(i))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                entry, _ = running.pop(future)
                rows, read_s, compute_s = future.result()
                yield entry, rows, read_s, compute_s


def _first_fitting(sizes: list[int], busy: int | None, budget: int) -> int | None:
    """Index of the first of `sizes` (largest first) that fits beside `busy` bytes within
    `budget`; with nothing running (`busy` None) the first, whatever its size. A worker then
    never idles behind a big entry that waits for memory while a smaller one could run."""
    if busy is None:
        return 0 if sizes else None
    return next((i for i, size in enumerate(sizes) if busy + size <= budget), None)


def _entry_bytes(entry, options: PairingOptions) -> int:
    """Bytes one entry holds once read: ΔW in the compute dtype; the weights stay in the
    memory-mapped files, except an adapter's up-cast base and merged tuned weight (3× then)
    and, on a GPU, both weights as stored, copied onto it; on the CPU the sketch's bf16
    copy of ΔW (``low_copy_above``). A worker's decomposition workspace comes on top, and so
    do an adapter's factors held across a module's experts, which are no one entry's
    (:func:`_held_factors`)."""
    n = math.prod(int(x) for x in entry.shape)
    itemsize = options.torch_dtype.itemsize
    if entry.adapter is not None:
        return 3 * itemsize * n
    if not options.device.startswith("cpu"):
        return (itemsize + entry.base_dtype.itemsize + entry.tuned_dtype.itemsize) * n
    copied = torch.bfloat16.itemsize if options.low_copy(entry.kind, entry.shape) else 0  # the sketch's bf16 ΔW
    return (itemsize + copied) * n


def _entry_budget(pairing: Pairing, todo: list, budget: int, *, readers: int) -> int:
    """Bytes of ΔW the entries in flight may hold, of `budget`, once the LoRA factors that `readers` threads keep
    across an adapter's fused-expert modules (:func:`_held_factors`) are reserved from it.

    The factors come out of what `budget` holds beyond room for the largest entry beside another (one reader: the
    largest read ahead, the one decomposed being outside `budget`; several workers: the two largest at once), or
    out of nothing where `budget` is no larger. Taken from that room they made the analysis serial without a word:
    4 workers on gpt-oss-120b at r = 16 keep 5 × 118 MB, more than the default 512 MB, and no entry ever ran beside
    another. What does not fit is held beyond `budget` (ΔW in flight within the bytes returned, the entry that
    always goes aside, plus the factors), and a warning says so, naming ``--read-ahead-mb``.
    """
    held = _held_factors(pairing, todo, readers=readers)
    if not held:
        return budget
    pair = sum(sorted((_entry_bytes(e, pairing.options) for e in todo), reverse=True)[:1 if readers == 1 else 2])
    room = min(budget, pair)
    if budget - held >= room or room == 0:  # 0: nothing but the entry that always goes, as asked
        return max(0, budget - held)
    mb = 1 << 20
    what = ("the modules in flight" if room < pair else
            "the largest module read ahead" if readers == 1 else "the two largest modules at once")
    warnings.warn(f"read_ahead_mb (--read-ahead-mb) = {budget / mb:.0f} MB cannot hold the {held / mb:.0f} MB of LoRA "
                  f"factors that {readers} reading thread{'s' * (readers > 1)} keep across the adapter's fused-expert "
                  f"modules and still leave {room / mb:.0f} MB for {what}: the factors are held beyond it (memory up "
                  f"to {held / mb:.0f} MB over the budget). --read-ahead-mb {-(-(pair + held) // mb)} counts them in it"
                  + ("; --workers 1 keeps fewer." if readers > 1 else "."), RuntimeWarning, stacklevel=3)
    return room


def _held_factors(pairing: Pairing, todo: list, *, readers: int) -> int:
    """Bytes of an adapter's LoRA factors held across entries while `readers` threads read `todo`.

    The A and B of a module's LoRAs on parameters (fused MoE experts) are read once and held
    for all of its expert entries (:class:`~spectra.checkpoints.adapter._HeldFactors`): ≈118 MB
    per module in float32 on gpt-oss-120b at r = 16. They belong to the reading threads, not
    to entries: every expert entry of a module shares them, and they stay held after its last
    entry is decomposed, until that thread opens another module. Counted per entry they would
    be counted E times for E queued experts of one module, and given back by a finished entry
    while still held. So the schedulers reserve this fixed amount up front, from what their budget
    holds beyond room for the largest entries (:func:`_entry_budget`): the most the threads can hold at once
    (:func:`~spectra.checkpoints.adapter.held_factor_bytes`: ``readers + 1`` modules, one for a
    single reader); 0 without such an adapter.
    """
    adapters = [entry.adapter for entry in todo if entry.adapter is not None]
    if not adapters:
        return 0
    return held_factor_bytes(adapters, pairing.tuned.weights, pairing.options.torch_dtype, readers=readers)


def _read_ahead(pairing: Pairing, todo, depth: int, budget: int, *, known: list | None = None):
    """Yield (entry, ΔW records, seconds waited, lease) in order, reading up to `depth` entries ahead.

    One reader thread (torch releases the GIL while copying and subtracting) runs ahead of
    the math by at most `depth` entries and `budget` bytes of ΔW data; the entry being
    decomposed is not counted, so one entry larger than the budget still goes through; an
    adapter's factors held across a module's experts (one module: one thread reads) are reserved
    from `budget` first, down to room for the largest entry (:func:`_entry_budget`). Each entry's ΔW lives in a
    :class:`~spectra.checkpoints.buffers.Lease` of one pool of reused buffers, which the
    consumer closes once it is done with the records. `todo` may hand entries out as they are
    asked for (:class:`~spectra.distributed.Claims`): the next one is taken when a read-ahead
    slot is free (and waits there, taken but unread, while it does not fit the budget), and
    `known` (every entry it may hand out) sizes the budget.
    """
    buffers = BufferPool(max_free=2 * (depth + 1))
    if depth == 0:
        for entry in todo:
            start = time.perf_counter()
            lease = buffers.lease()
            deltas = pairing.load(entry, lease=lease)
            yield entry, deltas, time.perf_counter() - start, lease
            del deltas
        return
    opts = pairing.options
    if known is None:  # a list of entries sizes the budget itself; entries handed out as asked for need `known`
        known = todo if isinstance(todo, list) else []
    budget = _entry_budget(pairing, known, budget, readers=1)
    pending: deque = deque()  # (entry, future, lease), in order
    source = iter(todo)
    ahead: list = []  # the next entry, taken from `todo` but not read yet (it did not fit the budget)

    def submit(entry):
        lease = buffers.lease()
        pending.append((entry, reader.submit(pairing.load, entry, lease=lease), lease))

    def fill(*, first: bool) -> None:  # read ahead up to `depth` entries within `budget` (first: one always)
        in_flight = sum(_entry_bytes(e, opts) for e, _, _ in pending)
        while len(pending) < depth:
            if not ahead:
                entry = next(source, None)
                if entry is None:
                    return
                ahead.append(entry)
            size = _entry_bytes(ahead[0], opts)
            if not ((first and not pending) or in_flight + size <= budget):
                return
            submit(ahead.pop())
            in_flight += size

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="spectra-read") as reader:
        while True:
            fill(first=True)
            if not pending:
                return
            entry, future, lease = pending.popleft()
            wait = time.perf_counter()
            deltas = future.result()
            waited = time.perf_counter() - wait
            fill(first=False)  # top up the queue before the math starts, so the reader works while we compute
            yield entry, deltas, waited, lease
            del deltas
