"""Does an adapter capture the update a full fine-tune made? Adapter vs ΔW_full, per module.

For every module an adapter adapts, with ``ΔW_full = W_tuned − W_base`` and the
adapter's own update ``ΔW_ad = merged − W₀`` (W₀ the weight the adapter was trained
on: the base, or for QLoRA/QDoRA its NF4 round trip where the 4-bit load stores the module in
NF4, :mod:`spectra.lora.qlora_base`; an embedding table keeps the base), :func:`verify_adapter` pairs
the three checkpoints, takes :mod:`spectra.lora.verify_measures`' measures of each module (captured
and optimal energy, φ, principal angles, amplification, intruder dimensions, QLoRA's
quantisation error) and totals them weighted by ‖ΔW_full‖_F² (:func:`summarize`).

With eval data, the eval loss/accuracy of the base, the full fine-tune, the adapter and
the truncated-SVD adapter at the same ranks (W_base + the rank-r Eckart–Young part of
ΔW_full: what ``extract_adapter`` would write, merged in memory; for a LoRA on fused MoE
experts, per expert, written into the loaded model's fused parameters). A LoRA on a weight that
another module reads too (an input embedding tied to the output head) is evaluated merged, as
``merge_and_unload()`` leaves it and as measured: the shared weight moves for both, as in the full
fine-tune and the truncated-SVD model; PEFT's unmerged model, where the other module keeps the base
weight, is the eval row ``adapter_unmerged``, and a note says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from spectra.checkpoints.pairing import check_device
from spectra.checkpoints.placement import weight_places as _places
from spectra.errors import ConfigError
from spectra.linalg.partial import EXACT_BELOW
from spectra.linalg.subspace import factor_svd, similarity_matrix
from spectra.linalg.svd import Spectrum, frobenius_energy
from spectra.lora.data import check_max_length, check_task
from spectra.lora.qlora_base import bnb_4bit_modules, nf4_round_trip
from spectra.lora.verify_measures import (  # noqa: F401  (delta_decomposition, module_measures: callers)
    delta_decomposition,
    measure_module,
    module_measures,
    storage_noise_rank,
)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class VerifyConfig:
    """Options of :func:`verify_adapter`, written into ``verify.json``.

    Attributes
    ----------
    intruder_k : int
        Top singular vectors of the tuned weight examined for intruders (PEFT's ``top_k``).
    intruder_epsilon : float
        Cosine below which a direction is an intruder (PEFT's default).
    phi_max : int
        Largest j of φ(i, j) kept for the φ heatmaps.
    figure_modules : int
        φ matrices kept in ``verify.json`` for this many modules with the largest ‖ΔW_full‖.
    quantized : bool, optional
        The adapter was trained on an NF4 base; None reads it from ``spectra_train.json``.
    task : {"auto", "causal_lm", "seq_cls", "seq2seq_lm"}
        Task of the eval data; ``auto`` reads the adapter's task type.
    max_length : int, optional
        Tokens per eval example; None: 128, or the base's position limit when shorter (a
        note says so). A length beyond a table of positions (learned, or a fixed sinusoid as
        Marian's) is refused.
    batch_size : int
        Eval examples per forward pass.
    seed : int
        Seed of any head initialised at load (a bare base model has no classifier).
    device : str
        Where the per-module measures (float64 SVDs of ΔW_full, ΔW_adapter and W_base) and
        the evaluations run: ``cpu``, ``cuda`` or ``cuda:N``. Results come back to the CPU.
    exact_below : int
        Modules whose short side is at most this take full float64 SVDs with vectors; larger
        ones take certified partial decompositions (see :func:`module_measures`).
    """

    intruder_k: int = 10  # PEFT reduce_intruder_dimension default (arXiv:2410.21228 uses top 10 too)
    intruder_epsilon: float = 0.5  # PEFT's default threshold
    phi_max: int = 64  # the LoRA paper's largest rank in Fig. 3
    figure_modules: int = 4  # enough to see the pattern, small JSON
    quantized: bool | None = None
    task: str = "auto"
    max_length: int | None = None  # None -> 128 cut to the model's positions, as in training
    batch_size: int = 32  # eval is forward only: larger batches are cheap
    seed: int = 0
    device: str = "cpu"
    exact_below: int = EXACT_BELOW  # full SVDs cost milliseconds up to here; certified partial ones above

    def __post_init__(self) -> None:
        for name, least in (("intruder_k", 1), ("phi_max", 1), ("figure_modules", 0)):  # each with its value
            if getattr(self, name) < least:
                raise ConfigError(f"{name} must be ≥ {least}, got {getattr(self, name)}.")
        if isinstance(self.exact_below, bool) or not isinstance(self.exact_below, int) or self.exact_below < 0:
            raise ConfigError(f"exact_below {self.exact_below!r} must be an int ≥ 0.")
        if not 0.0 < self.intruder_epsilon < 1.0:
            raise ConfigError(f"intruder_epsilon {self.intruder_epsilon} must lie in (0, 1).")
        check_task(self.task, option="VerifyConfig task")
        check_max_length(self.max_length, option="VerifyConfig max_length")
        check_device(self.device)


@dataclass
class VerifyResult:
    """Per-module measures of an adapter against a full fine-tune (see :mod:`spectra.lora.verify_measures`).

    Attributes
    ----------
    modules : list of dict
        One row per adapted module: ``name``, ``role``, ``layer``, ``shape``, ``rank``,
        ``effective_adapter_rank``, ``captured_energy``, ``optimal_energy``, ``phi``, …
        (``verify.json``'s rows).
    summary : dict
        Energy-weighted totals and counts over modules (``rank_deficient``: modules whose
        update uses fewer directions than its rank).
    evals : dict or None
        ``{"base"|"tuned"|"adapter"|"svd": {"loss", "accuracy", …}}`` with eval data, and
        ``adapter_unmerged`` for a LoRA on a tied weight (evaluated merged as ``adapter``).
    phi_matrices : dict
        Module name → φ(ΔW_ad, ΔW_full, i, j) as nested lists (i ≤ r, j ≤ phi_max).
    """

    modules: list[dict]
    summary: dict
    evals: dict | None = None
    phi_matrices: dict = field(default_factory=dict)
    saved_modules: list[dict] = field(default_factory=list)
    sources: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    right_vectors: dict = field(default_factory=dict, repr=False)  # name -> (r, in), not serialised
    # the notes saying TUNED or the adapter may not be of BASE (in `notes` too): every measure against W rests on it
    provenance: list[str] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, **self.sources, "config": self.config, "summary": self.summary,
                "evals": self.evals, "modules": self.modules, "saved_modules": self.saved_modules,
                "phi_matrices": self.phi_matrices, "notes": self.notes}

    def write_report(self, out_dir, *, overwrite: bool = False) -> Path:
        """Write ``verify.json``, ``report.md``, ``report.html`` and figures into ``out_dir`` atomically."""
        from spectra.report.verify import write_verify_report

        return write_verify_report(self.to_dict(), out_dir, overwrite=overwrite)


# ---------------------------------------------------------------------------- whole adapter


def verify_adapter(base, tuned, adapter, *, eval_data=None, config: VerifyConfig | None = None,
                   progress: bool = True, reference_evals: dict | None = None) -> VerifyResult:
    """Measure how much of the full fine-tune ``tuned`` the adapter captures, per module.

    Parameters
    ----------
    base : str or path
        The pretrained checkpoint the adapter and the full fine-tune started from.
    tuned : str or path
        The full fine-tune (a checkpoint, e.g. from ``spectra train --full``).
    adapter : str or path
        A PEFT LoRA/DoRA adapter directory trained on ``base``.
    eval_data : str or path, optional
        Held-out data (``.txt``/``.jsonl``): adds eval loss/accuracy of base, tuned, adapter
        and the truncated-SVD adapter at the same ranks.
    config : VerifyConfig, optional
    progress : bool
        tqdm bar over modules.
    reference_evals : dict, optional
        Already measured ``{"base": …, "tuned": …}`` evals to reuse (rank sweeps).

    Returns
    -------
    VerifyResult

    Raises
    ------
    ConfigError, CheckpointError, PairingError, AdapterError
        Unreadable inputs, an adapter that does not fit the base, no adapted module in
        the pair.
    """
    import tqdm

    from spectra.checkpoints.adapter import PEFT_PREFIX, plan_adapter
    from spectra.checkpoints.pairing import Pairing, PairingOptions
    from spectra.checkpoints.source import AdapterSource, open_checkpoint, recorded_base_note
    from spectra.lora.train import read_train_summary

    config = config or VerifyConfig()
    adapter_src = open_checkpoint(adapter)
    if not isinstance(adapter_src, AdapterSource):
        raise ConfigError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json).")
    pairing = Pairing(base, tuned, PairingOptions(vectors=False, split_fused=False, with_weights=True,
                                                  device=config.device))
    trained = read_train_summary(adapter_src.path) or {}
    quantized = config.quantized if config.quantized is not None else trained.get("method") in ("qlora", "qdora")
    # a head saved whole with TUNED's class count, another than the base's (2 → 3 labels): it fits a model built with
    # num_labels=that count, not the base's tensor; set aside as a head new to the base is, and evaluated on that model
    num_labels, head_notes, other_classes = _saved_head_classes(adapter_src, pairing)
    planned, notes = plan_adapter(_InBase(adapter_src, pairing.base, other_classes), pairing.base, pairing.config)
    recorded = recorded_base_note(adapter_src, pairing.base)  # "adapter … may not be of BASE": --adapter's here
    own = [f"--{recorded}"] if recorded else []
    notes = own + notes
    provenance = own + ([pairing.provenance] if pairing.provenance else [])  # TUNED's is in pairing.notes
    notes += head_notes
    task = _adapter_task(config, adapter_src, trained)
    saved = {p.module: p for p in planned if "full" in p.keys}
    lora = {p.module: p for p in planned if "full" not in p.keys  # an expert of a parameter LoRA: its own row
            and (p.parameter is not None or p.module == p.base_tensor.removesuffix(".weight"))}
    for p in planned:  # a head tied to the embedding (no tensor of its own): measured on the embedding's row
        weight = p.base_tensor.removesuffix(".weight")
        if "full" in p.keys or p.module in lora:
            continue
        if weight in lora:
            notes.append(f"{p.module}: its LoRA acts on the weight it shares with {weight}, whose own LoRA is the "
                         "one measured; not measured")
        else:
            lora[weight] = p
            notes.append(f"{p.module}: tied to {weight}; its LoRA is measured against that weight's ΔW (row {weight})")
    refused = _peft_refused(adapter_src.path, lora.values(), pairing.config, evaluated=eval_data is not None)
    if refused:  # measured all the same: the factors are the adapter's, whatever PEFT does with them
        notes.append(refused)
    notes += [f"{m}: modules_to_save tensor absent from the base (a new head); not measured"
              for m in _InBase.absent(adapter_src, pairing.base)]
    if num_labels is not None:
        notes += [f"{k.removeprefix(PEFT_PREFIX).removesuffix('.weight')}: saved whole with TUNED's {num_labels} "
                  f"classes, {tuple(adapter_src.weights.info(k).shape)} in the adapter against the base's "
                  f"{tuple(pairing.base.info(t).shape)} (a head re-initialised for them, no ΔW); not measured"
                  + ("" if eval_data is None else f", and the eval models are built with num_labels={num_labels}")
                  for k, t in other_classes.items() if k.endswith(".weight")]
    # W₀: the NF4 round trip of W_base where QLoRA's 4-bit loading stores the module in NF4, else W_base itself
    in_4bit = bnb_4bit_modules(lora, pairing.config, task) if quantized else {}
    rows, saved_rows, phis, truncated, right, deficient = [], [], {}, {}, {}, []
    coverage = [0.0, 0.0]  # Σ‖ΔW_full‖² over adapted modules, over all matrices
    for entry in tqdm.tqdm(pairing.entries, desc="verify", unit="module", disable=not progress):
        (d,) = pairing.load(entry)
        energy = frobenius_energy(d.delta)
        coverage[1] += energy
        if d.name in saved:
            merged = saved[d.name].merged(d.base, adapter_src.weights, torch.float32)
            err = frobenius_energy(merged - d.tuned)
            saved_rows.append({"name": d.name, "role": d.role, "relative_error": math.sqrt(err / energy) if energy
                               else None, "fro_norm_full": math.sqrt(energy)})
        if d.name not in lora:
            continue
        coverage[0] += energy
        p = lora[d.name]
        W0 = nf4_round_trip(d.base) if in_4bit.get(d.name) else d.base
        # ΔW = s·col·rowbᵀ: (B, Aᵀ), an embedding's (Aᵀ, B), an expert's share of a parameter's A and B, as stored
        col, rowb = p.factors(adapter_src.weights, d.delta.device, p.dtype)
        # The low-rank update s·col·rowbᵀ from its factors, cut at its numerical rank k ≤ min(r, short side):
        # its U, V span the update's own column and row spaces. Plain LoRA: it is ΔW_ad's SVD, exact; DoRA's
        # ΔW_ad is not low rank (its top r come from ΔW_ad itself in module_measures)
        low = factor_svd(col, rowb, scale=p.scaling)
        rank = col.shape[1]
        if rank > min(d.shape):  # legal in PEFT; ΔW_ad then has rank ≤ the short side: measure at that rank
            notes.append(f"{d.name}: adapter rank {rank} exceeds the module's short side {min(d.shape)}; measured "
                         f"at rank {min(d.shape)}, the most its update can have")
            rank = min(d.shape)
        used = low.values.numel()
        if used < rank:
            deficient.append(f"{d.name} ({used} of {rank})")
        # ΔW_full's rounding: a TUNED checkpoint's is its weights' (the difference of two stored weights), a LoRA
        # adapter as TUNED gives its update exactly
        exact = entry.adapter is not None and entry.adapter.low_rank
        # and a bf16/fp16 pair's: above the rounding floor of its storage dtypes (analyze's noise floor)
        storage = None if exact else storage_noise_rank(d.base, d.tuned, _torch_dtype(d.base_dtype),
                                                        _torch_dtype(d.tuned_dtype))
        measures, phi, vectors, Ff = measure_module(d.delta, W0, p, adapter_src.weights, low, rank, config,
                                                    W_base=d.base, storage_rank=storage,
                                                    rounded_energy=None if exact else frobenius_energy(d.base))
        rows.append({"name": d.name, "role": d.role, "layer": d.layer, "shape": list(d.shape),
                     "scaling": p.scaling, "dora": "magnitude" in p.keys, "effective_adapter_rank": used, **measures}
                    | ({"adapter_module": p.module} if p.module != d.name else {}))
        if phi is not None:
            phis[d.name] = (energy, phi)
            right[d.name] = vectors.cpu()
        if eval_data is not None:  # kept on the CPU: the whole model's worth, written into a model later
            truncated[d.name] = (_truncated_weight(Ff, rank, d.base, d.delta.dtype).cpu(), d.conv1d, p.parameter)
    if not rows:
        raise ConfigError(f"the adapter {adapter} adapts no weight matrix that {base} × {tuned} pairs; check that "
                          "all three belong to the same model.")
    if deficient:
        notes.append(f"rank-deficient adapter factors: the update s·B A uses fewer directions than its rank in "
                     f"{len(deficient)} module(s), k of r: {', '.join(deficient)}. Their captured energy, angles and "
                     "φ are measured in the k directions used (unused ones are zero or dependent columns of B, "
                     "rows of A)")
    keep = sorted(phis, key=lambda n: -phis[n][0])[:config.figure_modules]
    result = VerifyResult(
        modules=rows, summary=summarize(rows, coverage), saved_modules=saved_rows,
        phi_matrices={n: [[round(v, 5) for v in r] for r in phis[n][1]] for n in keep},
        sources={"base": pairing.base.fingerprint(), "tuned": pairing.tuned.fingerprint(),
                 "adapter": adapter_src.fingerprint() | {"method": trained.get("method") or _method(adapter_src),
                                                         "quantized": quantized}},
        config=asdict(config), notes=notes + list(pairing.notes), right_vectors={n: right[n] for n in keep},
        provenance=provenance)
    if eval_data is not None:
        result.evals = evaluate_models(base, tuned, adapter_src, eval_data, truncated, config=config,
                                       quantized=quantized, trained=trained, reference=reference_evals,
                                       notes=result.notes, num_labels=num_labels)
    return result


def summarize(rows: list[dict], coverage: tuple[float, float]) -> dict:
    """Totals over modules, each weighted by its ‖ΔW_full‖_F² (so big updates count more).

    The energy shares (captured, optimal) and φ are averaged over the rows that have them, weighted so: a
    share of the whole update's energy. An untrained module (ΔW_ad = 0) captures 0 of its ΔW_full and counts
    so; it has no φ. The relative error is the whole model's, √(Σ‖E_i‖² / Σ‖ΔW_full,i‖²), E_i the module's
    error: a norm ratio does not average as shares do (weighting each module's ratio by its energy had given
    0.10 where the whole was 0.995, one small module 10× off beside a big one matched).
    """

    def weighted(key: str) -> float | None:
        measured = [r for r in rows if r.get(key) is not None]
        total = sum(r["fro_norm_full"] ** 2 for r in measured)
        return sum(r["fro_norm_full"] ** 2 * r[key] for r in measured) / total if total else None

    def whole(key: str) -> float | None:  # ‖E‖_F/‖ΔW_full‖_F over the modules: ‖E_i‖ = r_i·‖ΔW_full,i‖
        measured = [r for r in rows if r.get(key) is not None]
        total = sum(r["fro_norm_full"] ** 2 for r in measured)
        return math.sqrt(sum(r["fro_norm_full"] ** 2 * r[key] ** 2 for r in measured) / total) if total else None

    return {
        "modules": len(rows), "ranks": sorted({r["rank"] for r in rows}),
        "rank_deficient": sum(r.get("effective_adapter_rank", r["rank"]) < r["rank"] for r in rows),
        "captured_energy": weighted("captured_energy"), "captured_energy_row": weighted("captured_energy_row"),
        "optimal_energy": weighted("optimal_energy"), "phi": weighted("phi"),
        "relative_error": whole("relative_error"),
        # modules whose adapter update is farther from ΔW_full than no update: spaces can agree with the sign wrong
        # (QLoRA: its weight W0 + ΔW_ad farther from W_tuned than W0 alone, whose NF4 error the update may undo)
        "worse_than_none": sum((r.get("relative_error") or 0.0) > r.get("relative_error_none", 1.0) for r in rows),
        "intruders_adapter": sum(r["intruders_adapter"] for r in rows),
        "intruders_full": sum(r["intruders_full"] for r in rows),
        "coverage": coverage[0] / coverage[1] if coverage[1] else None,
        # over the modules QLoRA stores in NF4 (an embedding table's W₀ is W_base: no row of its own says 0)
        "quant_error": (sum(q) / len(q)) if (q := [r["quant_error"] for r in rows if "quant_error" in r]) else None,
    }


def _torch_dtype(name) -> torch.dtype | None:
    """A DeltaW's storage dtype name ("bfloat16") as a torch dtype; None for a format torch has no dtype of."""
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else None


def _adapter_task(config: VerifyConfig, adapter_src, trained: dict) -> str:
    """The task the adapter was trained for: ``config.task``, or on ``auto`` spectra_train.json's task, else the
    adapter's PEFT task_type, else ``causal_lm``."""
    from spectra.lora.train import PEFT_TASKS

    if config.task != "auto":
        return config.task
    adapter_task = {peft: name for name, peft in PEFT_TASKS.items()}.get(adapter_src.config.get("task_type"))
    return trained.get("task") or adapter_task or "causal_lm"


def _truncated_weight(F: Spectrum, rank: int, W_base: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W_base + U_r Σ_r V_rᵀ (out, in): the Eckart–Young rank-r part of a matrix, from its decomposition ``F``,
    rounded to `dtype` and added to the base, a block of ≤ 4 MB float64 rows at a time (no float64 (out, in))."""
    US, Vh = F.U[:, :rank] * F.values[:rank], F.Vh[:rank]  # (out, r), (r, in)
    out = torch.empty(W_base.shape, dtype=torch.promote_types(W_base.dtype, dtype), device=W_base.device)
    rows = max(1, (4 << 20) // (8 * W_base.shape[1]))
    for i in range(0, W_base.shape[0], rows):
        torch.add((US[i:i + rows] @ Vh).to(dtype), W_base[i:i + rows], out=out[i:i + rows])
    return out


def _method(adapter_src) -> str:
    return "dora" if adapter_src.config.get("use_dora") else "lora"


def _saved_head_classes(adapter_src, pairing) -> tuple[int | None, list[str], dict[str, str]]:
    """(the ``num_labels`` the adapter's tensors saved whole need the model built with, None: the base's config as
    it is; notes where none fits; the adapter keys of those tensors that then differ from the base's own → the base's
    tensor). What :func:`~spectra.lora.saved_modules.saved_num_labels` asks of ``extract``'s adapter, asked of this
    one: its keys saved whole matched to TUNED's tensors, against the class TUNED's config names."""
    from spectra.checkpoints.adapter import PEFT_PREFIX
    from spectra.checkpoints.names import match_names
    from spectra.checkpoints.source import AdapterSource
    from spectra.checkpoints.targets import architecture
    from spectra.lora.saved_modules import saved_num_labels

    if isinstance(pairing.tuned, AdapterSource):  # TUNED a PEFT adapter: no model's tensors to match heads against
        return None, [], {}
    full = [k for k in adapter_src.weights.names() if "lora_" not in k and ".base_layer." not in k]
    match = match_names([k.removeprefix(PEFT_PREFIX) for k in full], pairing.tuned.names())
    saved_keys = {PEFT_PREFIX + k: t for k, t in match.pairs.items()}
    resized = frozenset(e.tuned_tensor for e in pairing.entries if e.added_rows)
    num_labels, notes = saved_num_labels(saved_keys, pairing, architecture(getattr(pairing.tuned, "config", None)),
                                         resized)
    if num_labels is None:
        return None, notes, {}
    in_base = match_names([k.removeprefix(PEFT_PREFIX) for k in saved_keys], pairing.base.names()).pairs
    other = {}
    for key in saved_keys:
        base_name = in_base.get(key.removeprefix(PEFT_PREFIX))
        if base_name and tuple(pairing.base.info(base_name).shape) != tuple(adapter_src.weights.info(key).shape):
            other[key] = base_name
    return num_labels, notes, other


class _InBase:
    """An adapter view without modules_to_save tensors the base lacks (a head new to a bare base), nor those
    `other` names (a head saved with another class count than the base's: adapter key → the base's tensor)."""

    def __init__(self, adapter_src, base_src, other: dict[str, str] | None = None):
        self.spec, self.config, self.path = adapter_src.spec, adapter_src.config, adapter_src.path
        absent = [k.removesuffix("weight") for k in self.absent_keys(adapter_src, base_src)]  # with their biases
        drop = {k for k in adapter_src.weights.names() if k.startswith(tuple(absent))} | set(other or ())
        self.weights = _FilteredWeights(adapter_src.weights, drop)

    @staticmethod
    def absent_keys(adapter_src, base_src) -> list[str]:
        from spectra.checkpoints.adapter import PEFT_PREFIX
        from spectra.checkpoints.names import match_names

        full = [k for k in adapter_src.weights.names() if "lora_" not in k and k.endswith(".weight")
                and ".base_layer." not in k]
        match = match_names([k.removeprefix(PEFT_PREFIX) for k in full],
                            [n for n in base_src.names() if n.endswith(".weight")])
        return [PEFT_PREFIX + k for k in match.only_in_base]

    @classmethod
    def absent(cls, adapter_src, base_src) -> list[str]:
        from spectra.checkpoints.adapter import PEFT_PREFIX

        return [k.removeprefix(PEFT_PREFIX).removesuffix(".weight") for k in cls.absent_keys(adapter_src, base_src)]


class _FilteredWeights:
    def __init__(self, weights, drop: set[str]):
        self._weights, self._drop = weights, drop

    def names(self) -> list[str]:
        return [n for n in self._weights.names() if n not in self._drop]

    def info(self, name: str):
        return self._weights.info(name)

    def read(self, name: str) -> torch.Tensor:
        return self._weights.read(name)


# ---------------------------------------------------------------------------- evaluation


def evaluate_models(base, tuned, adapter_src, eval_data, truncated: dict, *, config: VerifyConfig, quantized: bool,
                    trained: dict, reference: dict | None = None, notes: list[str] | None = None,
                    num_labels: int | None = None) -> dict:
    """Eval loss/accuracy of the base, the full fine-tune, the adapter and the truncated-SVD merge.

    Models are loaded one at a time. ``truncated`` maps module name → (W_base + rank-r
    part of ΔW_full (out, in), conv1d, the module's
    :class:`~spectra.checkpoints.adapter.ExpertUpdate` or None); the SVD model also takes the
    tuned task head when the adapter trains one (``modules_to_save``), as ``extract_adapter``
    does. An expert of a LoRA on a parameter (``target_parameters``) is written into its
    slice of the parameter transformers fuses it into on loading (see
    :func:`~spectra.checkpoints.placement.weight_places`). Where a module has no place in the
    loaded model, the SVD model is left out and `notes` says so. The adapter's LoRA layers on a weight that
    another module reads as is (:func:`_tied_loras`) are merged before its eval, and its unmerged eval is
    ``adapter_unmerged``. ``num_labels``: the class count a head saved whole in the adapter needs the models built
    with (:func:`_saved_head_classes`); None: the labels' count (spectra_train.json's, else TUNED's ``id2label``).
    """
    import json

    from spectra.checkpoints.targets import loading_rename
    from spectra.lora.data import prepare_tokenizer, tokenize_file
    from spectra.lora.train import evaluate, load_model, model_dir

    task = _adapter_task(config, adapter_src, trained)
    tuned_config = json.loads((model_dir(tuned) / "config.json").read_text())
    labels = trained.get("label_names")
    if task == "seq_cls" and labels is None and tuned_config.get("id2label"):
        labels = [tuned_config["id2label"][k] for k in sorted(tuned_config["id2label"], key=int)]
    _, max_length, tokenizer = prepare_tokenizer(model_dir(base), task=task, max_length=config.max_length,
                                                 option="VerifyConfig max_length", notes=notes)
    if num_labels is None:  # else the class count the adapter's saved head needs (_saved_head_classes)
        num_labels = len(labels) if task == "seq_cls" and labels else None
    elif labels is not None and len(labels) != num_labels:
        labels = None  # names of another count than the saved head's classes: the data's labels are read as ids
    data = tokenize_file(eval_data, tokenizer, task=task, max_length=max_length, label_names=labels)
    compute = (trained.get("config") or {}).get("compute_dtype", "float32")

    def base_model(quantize: bool = False):
        torch.manual_seed(config.seed)  # a head new to a bare base is initialised from the seed
        return load_model(base, task=task, num_labels=num_labels, quantize=quantize, compute_dtype=compute,
                          label_names=labels, device=config.device, pad_token_id=tokenizer.pad_token_id, notes=notes)

    def svd_model():
        model = base_model()
        # each checkpoint name renamed as transformers' loader renames its tensor (Qwen2-VL's hub model.layers.N…)
        places, unplaced = _places(truncated, dict(model.named_parameters()), rename=loading_rename(model))
        if unplaced:
            if notes is not None:
                notes.append(f"eval: the truncated-SVD model is left out: {len(unplaced)} adapted module(s) match no "
                             f"parameter of the loaded {type(model).__name__} (by name, up to a prefix) and are no "
                             f"expert of a LoRA on one of its parameters (target_parameters), or match one of another "
                             f"shape, so spectra cannot write them into it: {', '.join(unplaced[:3])}"
                             + (", …" if len(unplaced) > 3 else ""))
            return None
        return _set_weights(model, truncated, places, tuned, adapter_src.config.get("modules_to_save"))

    builders = {
        "base": base_model,
        "tuned": lambda: load_model(tuned, task=task, device=config.device, pad_token_id=tokenizer.pad_token_id,
                                    complete=True, notes=notes),
        "adapter": lambda: _load_adapter(base_model(quantized), adapter_src.path),
        "svd": svd_model,
    }
    evals = {k: v for k, v in (reference or {}).items() if k in ("base", "tuned")}
    for name, build in builders.items():
        if name not in evals:
            model = build()
            if model is None:
                continue
            if name == "adapter" and (tied := _tied_loras(model)):  # as merged, as measured; unmerged beside it
                unmerged = evaluate(model, data, batch_size=config.batch_size)
                for layer in tied.values():
                    layer.merge()  # W += ΔW in the shared Parameter, as merge_and_unload() does: the head moves too
                evals[name] = evaluate(model, data, batch_size=config.batch_size)
                evals["adapter_unmerged"] = unmerged
                if notes is not None:
                    notes.append(_tied_eval_note(tied))
            else:
                evals[name] = evaluate(model, data, batch_size=config.batch_size)
            del model
    return evals


def _tied_loras(model) -> dict[tuple[str, tuple[str, ...]], torch.nn.Module]:
    """The LoRA layers of a PeftModel whose weight other modules read as is: (layer, the modules that share its
    weight) → layer.

    A LoRA on an input embedding tied to the output head (``tie_word_embeddings``), or on that head, adapts one
    module of two that hold the same Parameter. Unmerged, PEFT adds its update to that module's output only, and
    the other keeps reading the base weight; ``merge_and_unload()`` adds it to the shared weight, which moves both,
    as the full fine-tune moved both. A sharer that carries a LoRA layer of its own (PEFT's ``ensure_weight_tying``
    puts the embedding's LoRA on the head, transposed), or sits unused in a ``modules_to_save`` wrapper, does not
    read the base weight, and makes no entry.
    """
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)}
    wrapped = {id(m.get_base_layer()) for m in layers.values()}
    owners: dict[int, list[tuple[str, torch.nn.Module]]] = {}  # id(Parameter) -> the modules holding it directly
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), []).append((name, module))

    def shown(name: str) -> str:
        return name.removeprefix("base_model.model.").replace(".base_layer", "")

    out = {}
    for name, layer in layers.items():
        base = layer.get_base_layer()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        readers = [shown(n) for n, m in owners.get(id(weight), []) if m is not base and id(m) not in wrapped
                   and ".original_module" not in f".{n}."]
        if readers:
            out[(shown(name), tuple(readers))] = layer
    return out


_TIED_EVAL = "eval: a LoRA on a tied weight"  # how _tied_eval_note begins: rank_sweep carries that note over


def _tied_eval_note(tied: dict) -> str:
    pairs = "; ".join(f"{layer}'s LoRA on the weight {', '.join(readers)} reads too" for layer, readers in tied)
    return (f"{_TIED_EVAL} ({pairs}): the 'adapter' row is the adapter with that LoRA merged, as "
            "merge_and_unload() leaves the model: the shared weight moves for every module that reads it, as in the "
            "full fine-tune, the 'svd' row and the per-module measures. 'adapter_unmerged' is PEFT's unmerged model, "
            "where the LoRA acts on its own module only and the others keep the base weight (what serving the "
            "adapter unmerged gives). Saving the embedding whole (extract --modules-to-save) is exact both ways")


def _peft_refused(path, planned, model_config: dict | None, *, evaluated: bool) -> str | None:
    """What to say of an adapter (at ``path``) with a LoRA on a module PEFT refuses
    (:func:`~spectra.checkpoints.targets.peft_refusal`: a Mamba mixer's ``out_proj`` and ``conv1d``, by the base's
    model type): a note, as its factors are still measured, or, where the adapter is to be evaluated
    (``evaluated``: ``PeftModel.from_pretrained`` would raise), a refusal before any model is loaded."""
    from spectra.checkpoints.targets import peft_refusal

    model_type = (model_config or {}).get("model_type")
    refused = {p.module: why for p in planned if p.parameter is None
               and (why := peft_refusal(p.module, model_type)) is not None}
    if not refused:
        return None
    names = ", ".join(list(refused)[:3]) + (f" and {len(refused) - 3} more" if len(refused) > 3 else "")
    why = next(iter(refused.values()))
    if evaluated:
        raise ConfigError(f"--adapter {path}: it holds a LoRA on {names}, and {why}, so the adapter cannot be loaded "
                          "to evaluate it. Verify it without eval_data (its factors are measured all the same), or "
                          "extract one without those modules (`spectra extract` leaves them out).")
    return (f"the adapter holds a LoRA on {names}: {why}, so PEFT cannot load it; its factors are measured all the "
            "same")


def _load_adapter(model, path):
    from peft import PeftModel

    from spectra.lora.train import model_device, quiet_peft

    with quiet_peft(model, path):  # and PEFT's note on the rank_pattern keys of target_parameters, which it applies
        return PeftModel.from_pretrained(model, str(path), torch_device=str(model_device(model)))


def _set_weights(model, weights: dict, places: dict, tuned, heads) -> torch.nn.Module:
    """Write checkpoint-named (out, in) weights into their `places` in ``model`` (see
    :func:`~spectra.checkpoints.placement.weight_places`), and the tuned checkpoint's heads."""
    from spectra.checkpoints.names import match_names
    from spectra.checkpoints.source import open_checkpoint

    params = dict(model.named_parameters())
    tuned_src = open_checkpoint(tuned)
    head_tensors = [n for n in tuned_src.names() if heads and any(
        n.removesuffix(".weight").removesuffix(".bias").endswith(h) for h in heads)]
    head_match = match_names(head_tensors, list(params))
    with torch.no_grad():
        for name, (W, conv1d, _) in weights.items():
            places[name].copy_(W.T if conv1d else W)
        for tensor, key in head_match.pairs.items():
            params[key].copy_(tuned_src.read(tensor))
    return model


# ---------------------------------------------------------------------------- rank sweep


@dataclass
class RankSweepResult:
    """Adapters trained at several ranks (and methods), each verified against the full fine-tune.

    Attributes
    ----------
    runs : list of dict
        One per (method, rank): captured vs optimal energy, φ, eval metrics, adapter path,
        ``step_median_s`` (:func:`~spectra.lora.train.steady_step_time`).
    reference_evals : dict
        Eval of the base and the full fine-tune (the lines the curves are read against).
    phi_between_ranks : list of dict
        φ(A_low, A_high, i, j) between the smallest- and largest-rank adapters of each
        method on the modules with the largest updates (LoRA §7, Fig. 3).
    recommended_rank : int or None
        The rank ``spectra recommend`` chose, marked in the figures.
    """

    runs: list[dict]
    reference_evals: dict
    phi_between_ranks: list[dict]
    recommended_rank: int | None
    sources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema_version": SCHEMA_VERSION, "kind": "sweep", **self.sources,
                "recommended_rank": self.recommended_rank, "reference_evals": self.reference_evals,
                "runs": self.runs, "phi_between_ranks": self.phi_between_ranks}

    def write_report(self, out_dir, *, overwrite: bool = False) -> Path:
        """Write ``sweep.json``, ``report.md``, ``report.html`` and figures into ``out_dir`` atomically."""
        from spectra.report.verify import write_sweep_report

        return write_sweep_report(self.to_dict(), out_dir, overwrite=overwrite)

    def figures(self) -> dict:
        """The sweep figures by name (``sweep_energy``, ``sweep_eval``, ``sweep_phi``) as matplotlib Figures."""
        from spectra.report.verify import sweep_figures

        return sweep_figures(self.to_dict())


def _refuse_failing_runs(base, planned: dict) -> None:
    """Refuse the whole sweep where train would refuse one of its runs for what ``base``'s config.json tells
    (:func:`spectra.lora.train.refuse_before_loading`: a rank above min(d_in, d_out) of a targeted module, QLoRA where
    nothing quantises, DoRA/QLoRA/dropout on parameter targets), before any run trains: such a run had stopped the
    sweep partway, after the runs before it had trained. Names each refused run, the first one's reason (for a rank:
    the module and the largest rank every target takes) and the runs that pass."""
    from spectra.lora.train import model_dir, refuse_before_loading

    folder = model_dir(base)
    refused = {}
    for (method, rank), config in planned.items():
        try:
            refuse_before_loading(folder, config, option="rank (--sweep)")
        except ConfigError as err:
            refused[(method, rank)] = str(err)
    if not refused:
        return

    def runs(keys) -> str:
        return ", ".join(f"{method} r{rank}" for method, rank in keys)

    (method, rank), reason = next(iter(refused.items()))
    fine = [key for key in planned if key not in refused]
    methods, ranks = list(dict.fromkeys(m for m, _ in fine)), list(dict.fromkeys(r for _, r in fine))
    if not fine:
        rest = " No run of the sweep passes these checks."
    else:
        flags = f"--sweep {','.join(map(str, ranks))}"  # where the runs that pass are every method × every rank
        flags += "" if len(methods) == len({m for m, _ in planned}) else f" --method {','.join(methods)}"
        flags = f" ({flags})" if len(fine) == len(methods) * len(ranks) else ""
        rest = f" The runs {runs(fine)} pass them: sweep those{flags}, or change what the others are refused for."
    raise ConfigError(f"the sweep trains nothing: train would refuse {len(refused)} of its {len(planned)} runs "
                      f"({runs(refused)}) before they train. {method} r{rank}: {reason}{rest}")


def rank_sweep(base, tuned, data, *, ranks, methods=("lora",), adapters_dir, train_config=None, eval_data=None,
               verify_config: VerifyConfig | None = None, recommended_rank: int | None = None,
               overwrite: bool = False, progress: bool = True) -> RankSweepResult:
    """Train an adapter per (method, rank) on ``data`` and verify each against ``tuned``.

    Parameters
    ----------
    base, tuned : str or path
        The pretrained checkpoint and its full fine-tune.
    data : str or path
        Training data (the full fine-tune's task; with ``train_config.teacher`` set to
        ``tuned``, the adapters are distilled from it instead).
    ranks : sequence of int
    methods : sequence of {"lora", "dora", "qlora", "qdora"}
    adapters_dir : str or path
        Where the adapters go, one sub-directory ``{method}-r{rank}`` each.
    train_config : TrainConfig, optional
        Everything but method and rank (which the sweep sets).
    eval_data : str or path, optional
        Eval loss/accuracy per run, of the base and of the full fine-tune.
    verify_config : VerifyConfig, optional
    recommended_rank : int, optional
        Marked in the figures (the rank from ``spectra recommend``).
    """
    from dataclasses import replace

    from spectra.lora.train import TrainConfig, steady_step_time, train_adapter

    ranks = sorted({int(r) for r in ranks})
    methods = tuple(dict.fromkeys(methods))
    if not ranks or ranks[0] < 1:
        raise ConfigError(f"--sweep {ranks}: give positive ranks, e.g. 1,2,4,8.")
    if "full" in methods:
        raise ConfigError("a rank sweep trains adapters; method 'full' has no rank (use lora, dora, qlora, qdora).")
    train_config = train_config or TrainConfig()
    # every run's options are checked before the first trains: a bad method fails now, not after hours
    planned = {(method, rank): replace(train_config, method=method, rank=rank, plan=None,  # QLoRA's compute dtype
                                       **({} if method in ("qlora", "qdora") else {"compute_dtype": "float32"}))
               for method in methods for rank in ranks}  # is the k-bit layers': LoRA/DoRA train in float32
    from spectra.files import refuse_replacing_others

    for method, rank in planned:  # each run replaces its folder whole: all checked before the first trains
        refuse_replacing_others(Path(adapters_dir) / f"{method}-r{rank}", command="train", overwrite=overwrite,
                                option="adapters_dir")
    _refuse_failing_runs(base, planned)  # every run checked before the first trains: none stops the sweep partway
    runs, reference, vectors, notes = [], None, {}, []
    for method in methods:
        for rank in ranks:
            folder = Path(adapters_dir) / f"{method}-r{rank}"
            cfg = planned[(method, rank)]
            trained = train_adapter(base, data, cfg, folder, eval_data=eval_data, overwrite=overwrite,
                                    progress=progress)
            notes += [n for n in trained.notes if n not in notes]  # the same data decisions in every run
            result = verify_adapter(base, tuned, folder, eval_data=eval_data, config=verify_config,
                                    progress=False, reference_evals=reference)
            reference = {k: result.evals[k] for k in ("base", "tuned")} if result.evals else None
            unmerged = (result.evals or {}).get("adapter_unmerged")  # a LoRA on a tied weight: eval is it merged
            notes += [f"{n} (in the sweep's runs: 'eval' is the 'adapter' row, 'eval_unmerged' the "
                      "'adapter_unmerged' one)" for n in result.notes if n.startswith(_TIED_EVAL)
                      and not any(m.startswith(n) for m in notes)]
            s = result.summary
            runs.append({"method": method, "rank": rank, "adapter": str(folder),
                         "trainable_params": trained.trainable_params, "steps": trained.steps,
                         "final_train_loss": trained.losses[-1] if trained.losses else None,
                         "step_median_s": steady_step_time(trained.step_times),
                         **{k: s[k] for k in ("captured_energy", "captured_energy_row", "optimal_energy", "phi",
                                              "relative_error", "intruders_adapter", "intruders_full")},
                         "eval": (result.evals or {}).get("adapter"), "svd_eval": (result.evals or {}).get("svd"),
                         **({} if unmerged is None else {"eval_unmerged": unmerged})})
            vectors[(method, rank)] = result.right_vectors
    phi_pairs = []
    for method in methods:
        low, high = vectors[(method, ranks[0])], vectors[(method, ranks[-1])]
        for name in [n for n in high if n in low][:2] if len(ranks) > 1 else []:
            matrix = similarity_matrix(low[name].T, high[name].T)  # (r_low, r_high)
            phi_pairs.append({"module": name, "method": method, "ranks": [ranks[0], ranks[-1]],
                              "matrix": [[round(v, 5) for v in r] for r in matrix.tolist()]})
    sources = {"base": str(base), "tuned": str(tuned), "data": str(data), "methods": list(methods), "ranks": ranks,
               "eval_data": None if eval_data is None else str(eval_data), "train_config": asdict(train_config),
               "notes": notes}
    return RankSweepResult(runs=runs, reference_evals=reference or {}, phi_between_ranks=phi_pairs,
                       recommended_rank=recommended_rank, sources=sources)


