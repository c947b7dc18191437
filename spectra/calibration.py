"""Activation-weighted spectra: the update ΔW as the data sees it.

A module computes ``y = W x``; over the N tokens of some calibration data its inputs form
``X`` (in, N) with second moment ``C = E[x xᵀ] = X Xᵀ / N`` (in, in). What the update does
to those outputs is ``ΔW X``, and

    ‖(ΔW − ΔW_r) X‖_F² = N · ‖(ΔW − ΔW_r) C^{1/2}‖_F²,

so the rank-r ``ΔW_r`` that best preserves the outputs on the data is not the Eckart–Young
truncation of ΔW but ``ΔW_r = [ΔW C^{1/2}]_r C^{-1/2}``, the truncated SVD taken in whitened
coordinates (the "truncation-aware whitening" of SVD-LLM, arXiv:2403.07378; ASVD,
arXiv:2312.05821, scales by activation magnitudes for the same reason). The spectrum of
``ΔW C^{1/2}`` is the update's spectrum weighted by how much the data excites each input
direction: directions the inputs never visit carry no energy there, however large they are
in ‖ΔW‖_F.

The spectrum is taken with C's own root (its eigenvalues at float64 rounding read as 0), so
its energy is exactly E‖ΔW x‖² over the calibration tokens. Inputs often span a subspace
(padding-free text never fills every dimension, LayerNorm outputs have a few dead
directions), so C^{-1/2} need not exist: the truncation regularises C to
``C_ε = C + ε·(tr C / in)·I``, a ridge of ε times C's mean eigenvalue. ΔW_r then minimises
``‖(ΔW − ΔW_r) X‖_F² + ε·(tr C / in)·N·‖ΔW − ΔW_r‖_F²`` exactly, which keeps it defined and
close to the plain truncation on directions the data never saw, and perturbs the data term
by O(ε). The ridge stays out of the spectrum: there it would give an update the data never
sees an energy of ε·(tr C / in)·‖ΔW‖_F².

Moments are accumulated by forward pre-hooks on the base model's Linear/Conv1D modules,
in float64, padding excluded, as sums plus token counts, so any chunking of the data gives
the same C. Modules fed the same tensor (q, k and v) share one accumulation.

An encoder–decoder (T5, BART) is calibrated on ``{"source", "target"}`` pairs run as in
training (the decoder reads the target shifted right): its encoder's modules, and the
decoder's cross-attention keys and values (which read the encoder's output), see the
source's tokens; every other decoder module sees the target's.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from spectra.checkpoints.architectures import fused_roles
from spectra.checkpoints.pairing import check_device
from spectra.errors import ConfigError
from spectra.linalg import metrics
from spectra.linalg.svd import CONVERGED_TOL, Spectrum, full_svd, randomized_svd
from spectra.lora.data import check_max_length, check_task



@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration moments are collected and regularised. Written into reports.

    Attributes
    ----------
    epsilon : float
        Ridge of ``C_ε = C + ε·(tr C / in)·I``, relative to C's mean eigenvalue, where C's inverse root
        is needed (whitening, the data-optimal truncation of extract and sweep); ``input_rank`` counts
        C's eigenvalues above it. The activation-weighted spectrum uses C itself, so ε leaves it unchanged.
    max_examples : int or None
        Examples of the data file used (the first ones); None uses all.
    max_length : int, optional
        Tokens per example (longer text is truncated, a ``.txt`` stream cut in blocks); None:
        128, or the model's position limit when shorter (a note says so). A length beyond a
        table of positions (learned, or a fixed sinusoid as Marian's) is refused.
    batch_size : int
        Examples per forward pass.
    task : {"auto", "causal_lm", "seq_cls", "seq2seq_lm"}
        Decides tokenisation and the model class; ``auto`` reads ``seq2seq_lm`` for an
        encoder–decoder (its records are source/target pairs), else ``seq_cls`` when every
        record has a ``label``.
    seed : int
        Seed of any classification head initialised at load (its outputs are not used).
    device : str
        Where the model runs and the float64 moments accumulate (``cpu``, ``cuda``,
        ``cuda:N``); they come back to the CPU when collected. The moments take
        8·in² bytes per input group — q/k/v share one, gate/up another — so a GPU must
        hold them beside the model.
    """

    epsilon: float = 1e-6  # small enough to leave the data term exact to ~1e-6, large enough to invert C in float64
    max_examples: int | None = 256  # 256 × 128 tokens estimate a 1k-dim C many times over at a few forward passes' cost
    max_length: int | None = None  # None -> 128 cut to the model's positions, as training and verify tokenise
    batch_size: int = 16  # forward only, and float64 moments per batch stay small
    task: str = "auto"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and 0 < self.epsilon < 1):
            raise ConfigError(f"calibration_epsilon {self.epsilon!r} must lie in (0, 1): it is a ridge relative to "
                              "C's mean eigenvalue (e.g. 1e-6).")
        if self.max_examples is not None and self.max_examples < 1:
            raise ConfigError(f"calibration max_examples {self.max_examples} must be ≥ 1 (or None for all).")
        check_max_length(self.max_length, option="calibration max_length")
        if self.batch_size < 1:
            raise ConfigError(f"calibration batch_size {self.batch_size} must be ≥ 1.")
        check_task(self.task, option="calibration task")
        check_device(self.device)


# ---------------------------------------------------------------------------- moments


class SecondMoments:
    """Streaming sums Σ x xᵀ (float64) and token counts, per key.

    ``add`` may be called with any split of the tokens; ``covariance`` is the same up to
    float64 summation order, because only sums and counts are kept.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # key -> (in, in) float64 Σ x xᵀ
        self.tokens: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        """Accumulate the rows of ``x`` (..., in) as tokens of ``key``."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)  # (n, in)
        gram = x.T @ x  # (in, n) @ (n, in) -> (in, in)
        if key in self.sums:
            self.sums[key] += gram
            self.tokens[key] += int(x.shape[0])
        else:
            self.sums[key] = gram
            self.tokens[key] = int(x.shape[0])

    def covariance(self, key: str) -> torch.Tensor:
        """C = Σ x xᵀ / N, (in, in) float64."""
        n = self.tokens[key]
        if n == 0:
            raise ConfigError(f"calibration: module {key} saw no token; give more calibration data.")
        return self.sums[key] / n


@dataclass
class Calibration:
    """Input second moments of a model's weight matrices on calibration data.

    Attributes
    ----------
    moments : SecondMoments
        Keyed by *group*; modules fed the same tensor share a group.
    groups : dict
        Checkpoint weight name (as the base checkpoint names it, e.g.
        ``encoder.layer.0.attention.self.query.weight``) → group key.
    config : CalibrationConfig
    source : dict
        Data file, examples, tokens per example (``max_length``), model and task, for reports.
    notes : list of str
        What collecting decided for the user (e.g. examples cut to the model's positions).
    """

    moments: SecondMoments
    groups: dict[str, str]
    config: CalibrationConfig = field(default_factory=CalibrationConfig)
    source: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def covariance(self, tensor_name: str) -> torch.Tensor | None:
        """C (in, in) float64 of the module owning ``tensor_name``, or None when it was not hooked."""
        key = self.groups.get(tensor_name)
        return None if key is None else self.moments.covariance(key)

    def tokens(self, tensor_name: str) -> int:
        key = self.groups.get(tensor_name)
        return 0 if key is None else self.moments.tokens[key]

    def describe(self) -> dict:
        return {**self.source, "config": asdict(self.config), "modules": len(self.groups), "notes": self.notes}


# ---------------------------------------------------------------------------- whitening


def _eigen(C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(λ, Q) of C = Q diag(λ) Qᵀ, float64, eigenvalues at C's float64 rounding set to 0.

    λ ≤ in·eps·λ_max is C's rounding, not data (the tolerance of numpy's ``matrix_rank``):
    eigh gives a null direction of C such a value, of either sign.
    """
    C = C.to(torch.float64)
    lam, Q = torch.linalg.eigh(C)  # (in,), (in, in)
    floor = C.shape[0] * torch.finfo(torch.float64).eps * float(lam.abs().max())
    return torch.where(lam > floor, lam, torch.zeros_like(lam)), Q


def covariance_root(C: torch.Tensor) -> torch.Tensor:
    """C^{1/2} (in, in), float64 on C's device: the PSD square root of an activation second moment C (in, in), with
    no ridge added.

    C's eigenvalues at its float64 rounding are read as 0, as :func:`whitened_spectrum` reads them, so a direction
    the inputs never visit adds nothing: for the tokens X (in, N) of C = X Xᵀ / N, ‖M·C^{1/2}‖_F = ‖M X‖_F / √N,
    the RMS output change per token of an update M (out, in) (SVD-LLM, arXiv:2403.07378). :func:`whitening`
    gives the ridged root C_ε^{1/2}, which the data-optimal truncation needs to invert.

    Raises
    ------
    ConfigError
        C is not a square (in, in) matrix.
    """
    if C.dim() != 2 or C.shape[0] != C.shape[1]:
        raise ConfigError(f"calibration: a covariance must be a square (in, in) matrix, got shape {tuple(C.shape)}.")
    lam, Q = _eigen(C)
    return (Q * lam.sqrt()) @ Q.T  # (in, in)


def _ridge(C: torch.Tensor, epsilon: float) -> float:
    ridge = epsilon * float(torch.diagonal(C).sum()) / C.shape[0]
    if not ridge > 0:
        raise ConfigError("calibration: the inputs of a module are all zero (tr C = 0); nothing to weight by.")
    return ridge


def whitening(C: torch.Tensor, *, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``C_ε^{1/2}`` and ``C_ε^{-1/2}`` (in, in) float64, with C_ε = C + ε·(tr C / in)·I.

    Returns
    -------
    root, inverse_root : torch.Tensor, shape (in, in)
    input_rank : int
        Eigenvalues of C above the ridge ε·(tr C / in): the input directions the data
        really visits.
    """
    ridge = _ridge(C, epsilon)
    lam, Q = _eigen(C)
    rank = int((lam > ridge).sum())
    lam = lam + ridge
    root = (Q * lam.sqrt()) @ Q.T  # (in, in)
    inverse_root = (Q * lam.rsqrt()) @ Q.T  # (in, in)
    return root, inverse_root, rank


def whitened_spectrum(delta: torch.Tensor, C: torch.Tensor, *, epsilon: float) -> tuple[Spectrum, int]:
    """Singular values of ``ΔW·C^{1/2}`` (float64) and C's input rank (see :func:`whitening`).

    ‖ΔW C^{1/2}‖_F² = tr(ΔW C ΔWᵀ) = E‖ΔW x‖², the mean squared output change per token
    (SVD-LLM, arXiv:2403.07378), so its energy ranks count the directions the data needs.
    C^{1/2} is C's own PSD root, without the ridge ε (which only sets ``input_rank``): a
    direction the inputs never visit adds nothing. Singular values at the float64 rounding
    of the product, ≤ max(out, in)·eps·‖ΔW‖_F·λ_max(C)^{1/2}, read as 0, so an update the
    data never sees has no energy and energy ranks 0.
    """
    ridge = _ridge(C, epsilon)
    lam, Q = _eigen(C.to(delta.device))  # C is collected on the CPU
    delta = delta.to(torch.float64)
    root = (Q * lam.sqrt()) @ Q.T  # (in, in) C^{1/2}
    spec = full_svd(delta @ root)  # (out, in) @ (in, in)
    eps = torch.finfo(torch.float64).eps
    # the float64 rounding of ΔW·C^{1/2}: values at or below it are not resolved from 0
    floor = max(delta.shape) * eps * float(torch.linalg.norm(delta)) * math.sqrt(float(lam.max()))
    values = torch.where(spec.values > floor, spec.values, torch.zeros_like(spec.values))
    spec = replace(spec, values=values, total_energy=float((values.double() ** 2).sum()))
    return spec, int((lam > ridge).sum())


def truncation_factors(delta: torch.Tensor, rank: int, *, covariance: torch.Tensor | None = None,
                       epsilon: float = 1e-6, full_below: int = 1024, seed: int = 0,
                       roots: tuple[torch.Tensor, torch.Tensor] | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Spectrum]:
    """Top-``rank`` factors with ``ΔW_r = U diag(S) Vw``: Eckart–Young, or data-optimal given C.

    Without ``covariance`` this is the truncated SVD of ΔW (best in ‖ΔW − ΔW_r‖_F). With it,
    the SVD of ``M = ΔW·C_ε^{1/2}`` is truncated and mapped back, ``Vw = V_rᵀ C_ε^{-1/2}``, which
    minimises ‖(ΔW − ΔW_r) C_ε^{1/2}‖_F: the output error on the calibration data (SVD-LLM,
    arXiv:2403.07378, Theorem 1).

    Parameters
    ----------
    delta : torch.Tensor, shape (out, in)
    rank : int
        1 ≤ rank ≤ min(out, in).
    covariance : torch.Tensor, shape (in, in), optional
        Input second moment C of the module.
    epsilon : float
        Ridge of C (see :func:`whitening`).
    full_below : int
        Exact SVD when min(out, in) ≤ this, else the block Krylov top-``rank``, converged to 1e-4.
    roots : (C_ε^{1/2}, C_ε^{-1/2}), optional
        :func:`whitening` of ``covariance`` when the caller has it already (on ΔW's device).

    Returns
    -------
    U : (out, rank), S : (rank,), Vw : (rank, in), all float64
    spectrum : Spectrum
        Of the matrix decomposed (ΔW, or ΔW·C_ε^{1/2}); its tail beyond ``rank`` is the error
        in the norm minimised.
    """
    if not 1 <= rank <= min(delta.shape):
        raise ConfigError(f"rank {rank} must lie in [1, {min(delta.shape)}] for a {tuple(delta.shape)} update.")
    M = delta.to(torch.float64)
    inverse_root = None
    if covariance is not None:
        root, inverse_root = roots or whitening(covariance.to(delta.device), epsilon=epsilon)[:2]
        M = M @ root  # (out, in)
    if min(M.shape) <= full_below:
        spec = full_svd(M, compute_vectors=True, dtype=torch.float64)
        U, S, Vh = spec.U[:, :rank], spec.values[:rank], spec.Vh[:rank]
    else:
        spec = randomized_svd(M, rank, compute_vectors=True, random_state=seed, tol=CONVERGED_TOL)  # block Krylov, converged
        U, S, Vh = spec.U, spec.values, spec.Vh
    U, S, Vh = (x.to(torch.float64) for x in (U, S, Vh))
    Vw = Vh if inverse_root is None else Vh @ inverse_root  # (r, in) @ (in, in)
    return U, S, Vw, spec


def data_optimal_truncation(delta: torch.Tensor, C: torch.Tensor, rank: int, *, epsilon: float = 1e-6
                            ) -> torch.Tensor:
    """The rank-r ΔW_r minimising ‖(ΔW − ΔW_r) C_ε^{1/2}‖_F (float64, shape (out, in)).

    With C = XXᵀ/N this is the rank-r update that best reproduces ΔW's outputs on the
    data X (SVD-LLM, arXiv:2403.07378); rank 0 gives zeros.
    """
    if rank == 0:
        return delta.new_zeros(delta.shape, dtype=torch.float64)
    U, S, Vw, _ = truncation_factors(delta, rank, covariance=C, epsilon=epsilon, full_below=min(delta.shape))
    return (U * S) @ Vw  # (out, r) @ (r, in)


def activation_row(delta: torch.Tensor, C: torch.Tensor, *, tokens: int, epsilon: float,
                   thresholds: tuple[float, ...]) -> dict:
    """The ``activation`` sub-dict of an ``analysis.json`` row: the whitened spectrum and its ranks.

    ``rms_output_change`` is √(E‖ΔW x‖²) = ‖ΔW C^{1/2}‖_F over the calibration tokens, and
    ``energy_rank`` the energy ranks of ΔW·C^{1/2} (0 when the data sees no change).
    """
    spec, input_rank = whitened_spectrum(delta, C, epsilon=epsilon)
    values = spec.values.double().cpu()
    ranks = metrics.energy_ranks(spec, thresholds) if spec.total_energy > 0 else {t: 0 for t in thresholds}
    return {"tokens": tokens, "epsilon": epsilon, "input_rank": input_rank,
            "rms_output_change": math.sqrt(spec.total_energy),
            "energy_rank": {f"{t:g}": ranks.get(t, 0) for t in thresholds},
            "singular_values": [float(v) for v in values]}


# ---------------------------------------------------------------------------- collecting


def collect_calibration(model_spec, data, *, config: CalibrationConfig | None = None, model=None,
                        progress: bool = False, max_length_option: str = "calibration max_length") -> Calibration:
    """Run a model on calibration data and accumulate every weight matrix's input C = E[x xᵀ].

    Parameters
    ----------
    model_spec : str or path
        The checkpoint whose activations are used. spectra passes the base, the model the
        truncated update is added to (as ASVD/SVD-LLM calibrate the model they compress).
        Needs a model directory with config.json.
    data : str or path
        ``.txt``, or ``.jsonl`` of ``{"text"}`` / ``{"text", "label"}`` records, or ``.csv``/``.tsv`` with those header
        columns; for an encoder–decoder, ``{"source", "target"}`` records (or columns).
    config : CalibrationConfig, optional
    model : torch.nn.Module, optional
        An already loaded model of ``model_spec`` (skips loading it again).
    progress : bool
        tqdm bar over batches.
    max_length_option : str
        How the user set ``config.max_length``, for its error and notes (a sweep's
        ``--max-length`` cuts its eval data and its calibration data alike).

    Returns
    -------
    Calibration
        Keyed by the checkpoint's weight names (what ``DeltaW.base_tensor`` holds).

    Raises
    ------
    ConfigError
        Unreadable data or model, or a model with no Linear/Conv1D weight in its checkpoint.
    """
    import tqdm
    from transformers.pytorch_utils import Conv1D

    from spectra.checkpoints.architectures import module_info
    from spectra.checkpoints.source import open_checkpoint
    from spectra.checkpoints.targets import loading_rename, names_by_key
    from spectra.lora.data import batches, model_inputs, read_records
    from spectra.lora.train import load_model, model_device, to_device

    config = config or CalibrationConfig()
    notes: list[str] = []
    task, tokens = _tokenized(model_spec, data, config, read_records, notes=notes, option=max_length_option)
    if model is None:
        torch.manual_seed(config.seed)  # a classifier head new to a bare checkpoint; its outputs are unused
        model = load_model(model_spec, task=task, device=config.device, notes=notes)
    modules = {name: m for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    # checkpoint names as transformers loads them (Qwen2-VL's hub model.layers.N… is model.language_model.layers.N…)
    stored = names_by_key([n for n in open_checkpoint(model_spec).names() if n.endswith(".weight")],
                          [f"{name}.weight" for name in modules], loading_rename(model))
    hooked = {key.removesuffix(".weight"): name for key, name in stored.items()}  # module name -> checkpoint name
    if not hooked:
        raise ConfigError(f"calibration: no Linear/Conv1D module of {model_spec} matches a weight of its checkpoint.")

    moments = SecondMoments()
    groups: dict[str, str] = {}
    unmasked: dict[str, tuple[int, ...]] = {}  # module -> an input layout whose padding could not be told apart
    state: dict = {"batch": None, "last": (None, None)}  # this batch; last input and its group
    # the padding mask over each module's inputs: the source's, but for a decoder module reading the decoder's stream
    model_config = model.config.to_dict()
    mask_of = {name: _mask_key(name, module_info(name, model_config)) if task == "seq2seq_lm" else "attention_mask"
               for name in hooked}

    def hook(module_name: str):
        def pre_hook(_module, args):
            x = args[0]  # (B, T, in) or (N, in)
            last, group = state["last"]
            if x is not last:  # q, k, v (gate, up) are called one after another on the same tensor
                group = module_name
                state["last"] = (x, group)
                x = _unpadded(x, state["batch"][mask_of[module_name]].bool(), module_name, unmasked)
                moments.add(group, x)
            groups[hooked[module_name]] = group
        return pre_hook

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in hooked]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n_batches = -(-len(tokens) // config.batch_size)
            for batch in tqdm.tqdm(batches(tokens, config.batch_size), total=n_batches, desc="calibrate",
                                   unit="batch", disable=not progress, leave=False):
                batch = to_device(batch, model_device(model))
                state["batch"], state["last"] = batch, (None, None)
                model(**model_inputs(batch, model))
    finally:
        for handle in handles:
            handle.remove()
        state["last"] = (None, None)
        model.train(was_training)
    if unmasked:
        shown = ", ".join(f"{name} {tuple(shape)}" for name, shape in sorted(unmasked.items())[:4])
        notes.append(f"calibration: padding counted in the activations of {len(unmasked)} module(s) whose input is "
                     f"laid out otherwise than the batch's tokens (e.g. {shown}); examples of one length pad nothing "
                     "(or, from Python, CalibrationConfig(batch_size=1))")
    moments.sums = {key: total.cpu() for key, total in moments.sums.items()}  # a Calibration lives on the CPU
    source = {"data": str(data), "data_sha256": file_digest(data), "model": str(model_spec), "task": task,
              "examples": len(tokens), "max_length": tokens.max_length}
    return Calibration(moments=moments, groups=groups, config=config, source=source, notes=notes)


def _unpadded(x: torch.Tensor, mask: torch.Tensor, module: str, unmasked: dict) -> torch.Tensor:
    """The rows of a module's input `x` (…, in) at the batch's real tokens, `mask` (B, T) bool.

    The input holds one row per token in (B, T) order: (B, T, in) as the blocks run, (B·T, in) where a module reads
    the stream flattened (Qwen2-MoE's shared expert), (B, 1, T, in) with a head axis of one (DeepSeek's kv_b_proj
    under MLA). Any other layout (a routed expert's gathered tokens) is taken whole, padding included, and
    `module` recorded in `unmasked` where the batch pads."""
    lead = tuple(x.shape[:-1])
    if lead == tuple(mask.shape):
        return x[mask]  # (n_tokens, in): padding never counts
    if tuple(d for d in lead if d != 1) in (tuple(mask.shape), (mask.numel(),)):
        return x.reshape(-1, x.shape[-1])[mask.reshape(-1)]
    if not bool(mask.all()):
        unmasked.setdefault(module, lead)
    return x


def _mask_key(name: str, info) -> str:
    """The batch key of the padding mask over a module's inputs in an encoder–decoder: the encoder's modules and the
    decoder's cross-attention keys and values read the source (``attention_mask``), the rest the target. A fused
    key/value of no fused role (GPT-2's ``crossattention.c_attn``, role other, rows xk and xv) reads the source too."""
    if info.stack == "encoder" or info.role in ("xk", "xv") or fused_roles(name) & {"xk", "xv"}:
        return "attention_mask"
    return "decoder_attention_mask"


def _tokenized(model_spec, data, config: CalibrationConfig, read_records, *, notes: list[str], option: str):
    """(task, TokenizedData) of the calibration file, labels ignored, first ``max_examples`` kept."""
    from spectra.lora.data import prepare_tokenizer, read_model_config, resolve_task, tokenize
    from spectra.lora.train import model_dir

    folder = model_dir(model_spec)
    model_config = read_model_config(folder)
    # seq2seq_lm for an encoder-decoder, refused for another model; the records are read as this decides
    task = resolve_task(config.task, model_config, None, data=data, model=model_spec)
    # texts, labels unchecked (a classifier's are not needed), or an encoder-decoder's source/target pairs
    reading = "seq2seq_lm" if task == "seq2seq_lm" else "causal_lm"
    records = read_records(data, task=reading)
    if task == "auto":
        # Not resolve_task's records[0]: that follows training's read (task auto), which refuses a file where some
        # records are labelled and others not, so there the first record speaks for all. Read as texts here, the
        # labels went unchecked and such a file passed: a classifier's head is loaded only when every record is
        # labelled; a partly labelled file is calibrated as text (its labels are not needed for activations).
        task = "seq_cls" if all("label" in r for r in records) else "causal_lm"
    _, max_length, tokenizer = prepare_tokenizer(folder, task=task, max_length=config.max_length, option=option,
                                                 notes=notes)
    tokens = tokenize(records, tokenizer, task=reading, max_length=max_length)  # no labels needed
    if config.max_examples is not None:
        tokens = tokens.first(config.max_examples)
    return task, tokens


def file_digest(path) -> str:
    """First 16 hex digits of the SHA-256 of a data file (cache keys, reports)."""
    h = hashlib.sha256()
    with open(Path(path), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def add_activation_rows(rows: list[dict], deltas: list, calibration: Calibration, *,
                        thresholds: tuple[float, ...]) -> None:
    """Add the ``activation`` sub-dict to the matrix rows of one pairing entry, in place.

    ``deltas`` are the entry's DeltaW records, in the order of ``rows``. A module the
    calibration did not hook (an embedding, an MoE expert slice) gets no sub-dict.
    """
    for row, d in zip(rows, deltas):
        if row.get("kind") != "matrix" or d.delta is None:
            continue
        C = calibration.covariance(d.base_tensor)
        if C is None or C.shape[0] != d.delta.shape[1]:
            continue
        row["activation"] = activation_row(d.delta, C, tokens=calibration.tokens(d.base_tensor),
                                           epsilon=calibration.config.epsilon, thresholds=thresholds)
