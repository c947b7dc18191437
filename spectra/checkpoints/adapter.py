"""A PEFT LoRA/DoRA adapter as the tuned side: ΔW exactly as PEFT merges it.

For a Linear (or Conv1D) module with ``A = lora_A.weight`` (r, in) and
``B = lora_B.weight`` (out, r), in the ``(out, in)`` orientation:

- LoRA (Hu et al. 2021, arXiv:2106.09685): ``W' = W₀ + s·B@A``, ``s = α/r``;
- rsLoRA (Kalajdzievski 2023, arXiv:2312.03732): ``s = α/√r``;
- DoRA (Liu et al. 2024, arXiv:2402.09353): ``W' = m ⊙ (W₀ + s·B@A) / ‖W₀ + s·B@A‖_row``
  with the norm per output row (PEFT's layout), ``m = lora_magnitude_vector`` (out,).

Embedding modules carry ``lora_embedding_A`` (r, vocab) and ``lora_embedding_B``
(dim, r): ``ΔW = s·(B@A)ᵀ`` on the ``(vocab, dim)`` weight. Whole tensors saved for
``modules_to_save`` replace the base tensor. ``α`` comes from ``alpha_pattern`` when a
key matches the module name as a suffix (PEFT's rule), else ``lora_alpha``; ``r`` is
read from A's shape, which is what PEFT builds the layer with.

An adapter names modules as the model class does, the base checkpoint as it stores them:
the two are matched by dot-suffix, and else through transformers' loading renames
(:func:`_renamed_modules`: Gemma 3's multimodal ``language_model.model.…``, PhiMoE's router,
GPT-NeoX's ``embed_out``). ΔW is reported under the stored name.

A LoRA on a parameter (PEFT's ``target_parameters``: fused MoE experts, a router's
weight) is read per expert, under the names the base checkpoint stores those experts by
(see :class:`ExpertUpdate` and :func:`_plan_parameters`); each parameter's A and B are read
once for all of its experts (:class:`_HeldFactors`).
"""

from __future__ import annotations

import math
import re
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from spectra.checkpoints.architectures import conv1d_by_shape, is_conv1d, module_info
from spectra.checkpoints.names import match_names
from spectra.checkpoints.placement import PlacementError, held_in_out, parameter_sources, split_sources
from spectra.checkpoints.targets import architecture, meta_model, resolve_name
from spectra.errors import AdapterError
from spectra.scaling import rank_scale

PEFT_PREFIX = "base_model.model."
_LORA_SUFFIXES = {
    ".lora_A.weight": "A", ".lora_B.weight": "B",
    ".lora_embedding_A": "emb_A", ".lora_embedding_B": "emb_B",
    ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",
    ".base_layer.weight": "base_layer",
}


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """Value for ``module`` from a PEFT ``rank_pattern``/``alpha_pattern``.

    PEFT (``peft.utils.other.get_pattern_key``) takes the first key ``k`` such that
    ``re.match(rf"(.*\\.)?({k})$", module)`` matches: keys match whole dot-suffixes.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return patterns[key]
    return default


@dataclass(frozen=True)
class ExpertUpdate:
    """One base tensor's share of a LoRA on a parameter (PEFT's ``target_parameters``, ``lora.ParamWrapper``).

    PEFT adapts a parameter W of shape (E, d₁, d₂) (E experts; a 2-D parameter is E = 1) with
    ``A = lora_A.weight`` (r·E, in) and ``B = lora_B.weight`` (out, r·E). Expert e's update is
    ``s·B_e@A_e`` with ``A_e = A[e·r:(e+1)·r]`` (A's rows are expert-major: PEFT reshapes A to
    (E, r, in)) and ``B_e = B[:, e::E]`` (B's columns are expert-minor: B is reshaped to
    (out, r, E)). It is added to W[e] as is, (out, in) = (d₁, d₂), unless the model stores W[e]
    as (in, out) and says so (``is_transposed``, gpt-oss): then its transpose.
    ``stored_transposed`` is the base's layout, not the model's: the base stores W[e] transposed,
    and transformers transposes it on loading (Qwen3-VL-MoE's hub experts).
    """

    parameter: str  # the model's parameter (model.layers.0.mlp.experts.gate_up_proj), as its class names it
    expert: int  # e
    experts: int  # E
    transposed: bool  # W[e] is (in, out): PEFT adds (s·B_e@A_e)ᵀ
    rows: tuple[int, int] | None = None  # rows of W[e] this base tensor holds (Mixtral's w1 or w3, fused on loading)
    stored_transposed: bool = False  # the base tensor stores W[e]ᵀ (placement.ParameterSlice's)

    def factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(col, row) with this base tensor's update ``s·col@rowᵀ`` in the parameter's stored layout
        (W[e]'s (d₁, d₂), or its `rows`): col (d₁ or len(rows), r), row (d₂, r)."""
        rank = a.shape[0] // self.experts
        a_e = a[self.expert * rank:(self.expert + 1) * rank]  # (r·E, in) -> (r, in)
        b_e = b[:, self.expert::self.experts]  # (out, r·E) -> (out, r)
        col, row = (a_e.T, b_e) if self.transposed else (b_e, a_e.T)  # W[e] (in, out): (s·B_e@A_e)ᵀ = s·A_eᵀ@B_eᵀ
        return (col, row) if self.rows is None else (col[self.rows[0]:self.rows[1]], row)

    @property
    def holder(self) -> str:
        """The module holding the parameter (``model.layers.0.mlp.experts``), whose LoRAs PEFT nests."""
        return self.parameter.rpartition(".")[0]


class _HeldFactors:
    """The A and B of a module's LoRAs on parameters, read once for all of its experts.

    Expert e's factors are a slice of its parameter's A (r·E, in) and B (out, r·E), whose
    columns e, e+E, … run across all of B's rows: read per expert, a parameter of E experts
    was read and converted E times (Mixtral's gate_up_proj 2E: w1 and w3 are separate base
    tensors); a bf16 adapter up-cast, or one copied to a GPU, copied ~E× its factors per
    parameter, hundreds of GB on a 128-expert, 48-layer model. The pairing names a module's
    experts one after another, its parameters interleaved (``experts.0.w1``, ``experts.0.w2``,
    ``experts.0.w3``, ``experts.1.w1``, …), so the tensors of a holder module are held as
    a whole: every A and B of its parameters, as converted for the caller (one rank-r·E LoRA
    per parameter of one module at most). Expert slices of them are what
    :meth:`AdapterDelta.factors` returns (views: never change them in place).

    Which modules are held: the one each reading thread read last and, once several threads
    read, the one opened before the newest. Analysis workers (``--workers``) split a module's
    experts between them and reach the next module at different times, and where the memory
    budget (``read_ahead_mb``) holds back the next expert, a smaller entry of another module
    runs in between. With one module held for all threads they took its tensors from each
    other, and each switch read a module's factors again: 16 factor tensors read 36–58 times
    on a 4-layer gpt-oss adapter (4 workers, 16 MB budget), Mixtral's 8 up to 16 times with
    the default budget; now 16 and 8. Memory: a module's factors per thread that reads, plus
    one (the read-ahead thread alone: one module, as before); :func:`held_factor_bytes` gives
    that bound, which the analysis reserves from its memory budget.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._last: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # thread -> its last module
        self._opened: list[tuple] = []  # the two modules opened last, newest last
        # module (id(weights), holder) -> (weights, {(key, device, dtype): tensor}); holding `weights` keeps its id
        self._tensors: dict[tuple, tuple[Any, dict[tuple, torch.Tensor]]] = {}

    def read(self, weights, holder: str, key: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """``weights.read(key).to(device=device, dtype=dtype)``, read once while `holder`'s tensors are held."""
        module = (id(weights), holder)
        with self._lock:
            thread = threading.current_thread()
            if self._last.get(thread) != module:
                self._last[thread] = module
                if module not in self._opened[-1:]:
                    self._opened = [*self._opened[-1:], module]
                kept = set(self._last.values())
                if len(self._last) > 1:  # a worker may still be on the previous module's last experts
                    kept.update(self._opened)
                self._tensors = {m: held for m, held in self._tensors.items() if m in kept}
            _, held = self._tensors.setdefault(module, (weights, {}))
            found = (key, torch.device(device), dtype)
            if found not in held:
                held[found] = weights.read(key).to(device=device, dtype=dtype)
            return held[found]


def held_factor_bytes(deltas, weights, dtype: torch.dtype, *, readers: int) -> int:
    """Most bytes :class:`_HeldFactors` holds while `readers` threads read `deltas`' ΔW.

    One module's held tensors are the A (r·E, in) and B (out, r·E) of each of its targeted
    parameters that `deltas` use, in the compute `dtype` (≈118 MB in float32 for a
    gpt-oss-120b experts module at r = 16). One reading thread holds one module; several hold
    one each plus the one opened before the newest: ``readers + 1`` modules, each counted as
    the largest. Plain LoRA modules read their factors per entry and hold nothing: 0 then.

    Parameters
    ----------
    deltas : iterable of AdapterDelta
        The entries that will be read (those of other modules are never held).
    weights : CheckpointSource
        The adapter's tensors (metadata only is read).
    dtype : torch.dtype
        The dtype the factors are converted to (the pairing's compute dtype).
    readers : int
        Threads that read entries at once (analysis workers, or 1 with a read-ahead thread).
    """
    modules: dict[str, dict[str, int]] = {}  # holder module -> {A or B key: elements}
    for d in deltas:
        if d.parameter is not None:
            held = modules.setdefault(d.parameter.holder, {})
            for part in "AB":
                held[d.keys[part]] = math.prod(weights.info(d.keys[part]).shape)
    largest = max((sum(held.values()) for held in modules.values()), default=0)
    return (readers + 1 if readers > 1 else 1) * largest * dtype.itemsize


@dataclass(frozen=True)
class AdapterDelta:
    """How to rebuild one module's tuned weight from an adapter (metadata only)."""

    module: str  # module name in the base checkpoint, without .weight
    base_tensor: str  # base checkpoint tensor name
    shape: tuple[int, int]  # (out, in) orientation
    dtype: torch.dtype  # storage dtype of the adapter tensors
    conv1d: bool
    keys: dict[str, str]  # part ("A", "B", "magnitude", "emb_A", "emb_B", "base_layer", "full") -> adapter key
    scaling: float
    embedding: bool
    parameter: ExpertUpdate | None = None  # a LoRA on a parameter (target_parameters): this tensor's share
    base_expert: int | None = None  # slice of a 3-D base tensor (experts stored fused, as the model holds them)
    held: _HeldFactors | None = field(default=None, compare=False, repr=False)  # a parameter's A, B; one per plan

    def merged(self, base: torch.Tensor, weights, dtype: torch.dtype) -> torch.Tensor:
        """W_tuned in ``(out, in)`` orientation, given the upcast base weight ``base`` (out, in)."""

        def read(part: str) -> torch.Tensor:
            return weights.read(self.keys[part]).to(device=base.device, dtype=dtype)

        if "full" in self.keys:  # modules_to_save: the adapter stores the whole tuned tensor
            full = read("full")
            return full.T if self.conv1d else full.reshape(self.shape)  # a convolution's (out, in, k…) flattened
        w0 = base
        if "base_layer" in self.keys:
            stored = read("base_layer")
            w0 = stored.T if self.conv1d else stored.reshape(self.shape)
        col, row = self.factors(weights, base.device, dtype)
        # W0 + s·col@rowᵀ in one (out, in) allocation, (out, r) @ (r, in), the same operations in the same order as
        # w0 + s·(col @ rowᵀ) (bit for bit): a separate update and sum held two more copies of ΔW
        combined = (col @ row.T).mul_(self.scaling)
        combined = combined.add_(w0) if combined.dtype == torch.promote_types(combined.dtype, w0.dtype) else w0 + combined
        if "magnitude" not in self.keys:
            return combined
        magnitude = read("magnitude").reshape(-1)  # (out,); a convolution's as PEFT holds it, (1, out, 1…)
        # PEFT's DoRA normalises each output row (an embedding: each row of the (dim, vocab) view): m·W/‖W‖, in place
        view = combined.T if self.embedding else combined
        norms = view.norm(dim=1, keepdim=True)
        view.mul_(magnitude[:, None]).div_(norms)
        return combined

    @property
    def low_rank(self) -> bool:
        """Whether the update is the LoRA product s·col@rowᵀ alone (no DoRA magnitude, no weight saved whole)."""
        return not {"full", "base_layer", "magnitude"} & set(self.keys)

    def update(self, weights, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """ΔW = s·col@rowᵀ (out, in) of a :attr:`low_rank` update, as :meth:`merged` forms it before adding W0.

        Taken from the factors, it holds no rounding of W0 + ΔW: merged − W0 in float32 carried
        ~6e-8·|W0| of full-rank noise, whose directions filled ΔW's singular vectors past r.
        """
        col, row = self.factors(weights, device, dtype)
        return (col @ row.T).mul_(self.scaling)

    def factors(self, weights, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(col, row) with the LoRA update ``ΔW = scaling·col@rowᵀ`` in the ``(out, in)`` orientation.

        col (out, r), row (in, r): ``(B, Aᵀ)`` for a Linear or Conv1D, ``(Aᵀ, B)`` for an
        embedding (``ΔW = s·(B@A)ᵀ``), expert e's share of A and B for a parameter. DoRA's
        update is this one, renormalised: see :meth:`merged`.
        """

        def read(part: str) -> torch.Tensor:
            return weights.read(self.keys[part]).to(device=device, dtype=dtype)

        if self.embedding:
            return read("emb_A").T, read("emb_B")  # (vocab, r), (dim, r)
        if self.parameter is None:  # a convolution's B (out, r, 1…) and A (r, in, k…) flattened: ΔW (out, in·k…)
            b, a = read("B"), read("A")
            return b.reshape(b.shape[0], b.shape[1]), a.reshape(a.shape[0], -1).T  # (out, r), (in, r)
        a, b = (self.held.read(weights, self.parameter.holder, self.keys[part], device, dtype) for part in "AB")
        col, row = self.parameter.factors(a, b)  # the parameter's layout, (in, out) where it holds the matrix so
        return (row, col) if held_in_out(self.conv1d, self.parameter.stored_transposed) else (col, row)


@dataclass(frozen=True)
class UnpairedTensor:
    """A tensor an adapter saves whole that :func:`plan_adapter` pairs with no ΔW: a trained bias (PEFT's
    ``bias="lora_only"``/``"all"``, or the bias of a module saved whole) or the weight of a module saved whole
    (``modules_to_save``) that the base lacks (a ``score`` head of a SEQ_CLS adapter on a causal-LM base)."""

    key: str  # the adapter's key
    name: str  # as the adapter's model names it, PEFT's prefix and ``base_layer`` dropped: ``…q_proj.bias``
    base_tensor: str | None  # the base's tensor it replaces on loading; None where the base lacks it


def plan_adapter(adapter, base, config: dict[str, Any] | None) -> tuple[list[AdapterDelta], list[str]]:
    """Group an adapter's tensors by module and check each against the base.

    Parameters
    ----------
    adapter : AdapterSource
    base : CheckpointSource
    config : dict or None
        The base model's ``config.json``: Conv1D detection, and the model class that says
        how a LoRA on ``target_parameters`` lies in the base's tensors.

    Returns
    -------
    deltas : list of AdapterDelta
    notes : list of str

    Raises
    ------
    AdapterError
        Unknown adapter keys, missing A/B halves, modules absent from the base, or shapes
        that do not fit the base (an adapter trained on another model); a LoRA on a parameter
        (``target_parameters``) whose layout in the base checkpoint cannot be read exactly.
    """
    deltas, notes, _ = _plan(adapter, base, config)
    return deltas, notes


def unpaired_tensors(adapter, base, config: dict[str, Any] | None) -> list[UnpairedTensor]:
    """The tensors the adapter saves whole that :func:`plan_adapter` leaves out of its ΔWs (trained biases, modules
    saved whole that the base lacks), each with the base tensor it replaces on loading, if any.

    Whether such a bias differs from the base's is for the caller to read (PEFT saves every bias of its LoRA
    layers under ``bias="lora_only"``, trained or not). Costs what :func:`plan_adapter` costs (the tensors' headers,
    a tied head's factors), no ΔW.
    """
    return _plan(adapter, base, config)[2]


def _plan(adapter, base, config) -> tuple[list[AdapterDelta], list[str], list[UnpairedTensor]]:
    """:func:`plan_adapter`'s deltas and notes, and :func:`unpaired_tensors`."""
    cfg = adapter.config
    biases: dict[str, str] = {}  # the adapter's name of a trained bias -> its key
    notes: list[str] = []
    modules: dict[str, dict[str, str]] = {}
    for key in adapter.weights.names():
        name = key.removeprefix(PEFT_PREFIX)
        if name == key:
            notes.append(f"adapter key {key} lacks the '{PEFT_PREFIX}' prefix PEFT writes; read it as is")
        for suffix, part in _LORA_SUFFIXES.items():
            if name.endswith(suffix):
                modules.setdefault(name.removesuffix(suffix), {})[part] = key
                break
        else:
            if not name.endswith(".weight"):
                if name.endswith(".bias"):
                    notes.append(f"adapter tensor {key}: trained bias, reported as not analysed")
                    biases[name.replace(".base_layer.", ".")] = key  # a LoRA layer's: …q_proj.base_layer.bias
                    continue
                raise AdapterError(f"adapter {adapter.spec}: tensor {key} is not a LoRA/DoRA tensor spectra "
                                   "understands (lora_A/lora_B/lora_embedding_A/B/lora_magnitude_vector or a "
                                   "modules_to_save weight).")
            modules.setdefault(name.removesuffix(".weight"), {})["full"] = key

    on_parameters = bool(cfg.get("target_parameters"))
    model = meta_model(config) if on_parameters else None  # built once, for the names below too
    deltas = _plan_parameters(adapter, base, config, modules, model) if on_parameters else []
    base_weights = [n for n in base.names() if n.endswith(".weight")]
    match = match_names([m + ".weight" for m in modules], base_weights)
    base_tensors = {m.removesuffix(".weight"): t for m, t in match.pairs.items()}  # adapter module -> base tensor
    # Two adapter modules whose names both end one base tensor's (layers.0.mlp.up_proj and 0.mlp.up_proj): no guess.
    twice = [n.removesuffix(".weight") for key, names in match.ambiguous.items()
             if key.removesuffix(".weight") not in modules for n in names]
    if twice:
        raise AdapterError(f"adapter {adapter.spec}: modules {', '.join(twice[:5])} all match one tensor of the base "
                           f"{base.spec} (names compared up to a leading prefix). Name the adapter's modules as "
                           "the base model names them.")
    missing = [m for m in modules if m not in base_tensors]  # unmatched, or matching two base tensors
    if missing:
        model = meta_model(config) if model is None else model
        base_tensors |= _renamed_modules(missing, base_weights, model)
        missing = [m for m in missing if m not in base_tensors]
    tied_to = _tied_heads(adapter, modules, missing, match, base_weights, config, notes)
    missing = [m for m in missing if m in modules and m not in tied_to]
    unpaired = []
    for module in [m for m in missing if set(modules[m]) == {"full"}]:
        # a modules_to_save head the base lacks (a classifier on a bare encoder): new, not an update
        notes.append(f"adapter module {module}: saved whole (modules_to_save) and absent from the base; "
                     "a new module has no ΔW, not analysed")
        unpaired.append(UnpairedTensor(modules[module]["full"], f"{module}.weight", None))
        del modules[module]
        missing.remove(module)
    if missing:
        raise AdapterError(f"adapter {adapter.spec} targets module(s) absent from the base {base.spec}: "
                           f"{', '.join(missing[:5])}. Was it trained on another model? Pass the adapter's own base.")
    layouts = None
    if not (config or {}).get("model_type"):
        layouts = conv1d_by_shape({n.removesuffix(".weight"): tuple(base.info(n).shape) for n in base.names()
                                   if n.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight",
                                                  ".q_attn.weight"))})[0]
    alpha_default = cfg.get("lora_alpha", 8)
    alpha_pattern = cfg.get("alpha_pattern") or {}
    _check_alphas(adapter, alpha_default, alpha_pattern)
    for adapter_module, parts in modules.items():
        base_tensor = tied_to.get(adapter_module) or base_tensors[adapter_module]
        module = adapter_module if adapter_module in tied_to else base_tensor.removesuffix(".weight")
        info = base.info(base_tensor)
        if len(info.shape) < 2:
            raise AdapterError(f"adapter module {adapter_module}: base tensor {base_tensor} is {len(info.shape)}-D; "
                               "spectra reads adapters on Linear, Conv1D, Embedding and convolution modules only.")
        # a convolution's kernel (out, in, k…) is read flattened, (out, in·k…), as pairing reads it; PEFT's LoRA on
        # it holds A as a convolution of that kernel (r, in, k…) and B as a 1×…×1 one (out, r, 1…)
        kernel = tuple(info.shape[2:])
        if (config or {}).get("model_type") or layouts is None:
            conv1d = not kernel and (is_conv1d(module, config)
                                     or bool(cfg.get("fan_in_fan_out") and is_conv1d(module, None)))
        else:  # no model type: GPT-2-named weights by their shapes (GPT-BigCode's nn.Linear), as the pairing reads them
            conv1d = not kernel and layouts.get(module, is_conv1d(module, None))
        shape = (info.shape[1], info.shape[0]) if conv1d else (info.shape[0], math.prod(info.shape[1:]))
        embedding = "emb_A" in parts
        scaling, dtype = 1.0, info.dtype
        if "full" not in parts:
            a_key, b_key = ("emb_A", "emb_B") if embedding else ("A", "B")
            if a_key not in parts or b_key not in parts:
                raise AdapterError(f"adapter {adapter.spec}: module {adapter_module} has only "
                                   f"{', '.join(sorted(parts))}; a LoRA module needs both A and B.")
            a_info, b_info = adapter.weights.info(parts[a_key]), adapter.weights.info(parts[b_key])
            rank = a_info.shape[0]
            if not rank:
                raise AdapterError(f"adapter {adapter.spec}: module {adapter_module} has rank 0 (A {tuple(a_info.shape)}"
                                   f", B {tuple(b_info.shape)}): it holds no update and α/r is undefined. Save the "
                                   "adapter again without it.")
            # A (r, in), B (out, r); an embedding's A is (r, vocab) and B (dim, r), i.e. transposed roles
            want_a, want_b = ((rank, shape[0]), (shape[1], rank)) if embedding else (
                (rank, *info.shape[1:]), (shape[0], rank, *(1,) * len(kernel))) if kernel else (
                (rank, shape[1]), (shape[0], rank))
            if tuple(a_info.shape) != want_a or tuple(b_info.shape) != want_b:
                raise AdapterError(
                    f"adapter {adapter.spec}: module {adapter_module} has A {tuple(a_info.shape)} and B "
                    f"{tuple(b_info.shape)}, which do not fit the base weight {base_tensor} of (out, in) shape "
                    f"{shape}. The adapter was trained on a different base model; pass its own base.")
            alpha = pattern_value(alpha_pattern, adapter_module, alpha_default)
            scaling = alpha / rank_scale(rank, bool(cfg.get("use_rslora")))
            dtype = a_info.dtype
            _check_dora_parts(adapter, adapter_module, parts, shape, tuple(info.shape), embedding)
        else:
            full_shape = tuple(adapter.weights.info(parts["full"]).shape)
            if full_shape != tuple(info.shape):
                raise AdapterError(f"adapter {adapter.spec}: saved module {adapter_module} has shape {full_shape} "
                                   f"but the base's {base_tensor} is {tuple(info.shape)}.")
        deltas.append(AdapterDelta(module=module, base_tensor=base_tensor, shape=shape, dtype=dtype, conv1d=conv1d,
                                   keys=parts, scaling=scaling, embedding=embedding))
    return deltas, notes, unpaired + _paired_biases(biases, base, base_tensors)


def _check_alphas(adapter, alpha, pattern) -> None:
    """Refuse an ``adapter_config.json`` whose ``lora_alpha`` or an ``alpha_pattern`` value is no finite number."""
    if not isinstance(pattern, dict):
        raise AdapterError(f"adapter {adapter.spec}: alpha_pattern in adapter_config.json must map module names to "
                           f"numbers, got {type(pattern).__name__}. Fix the config or save the adapter again.")
    for key, value in [("lora_alpha", alpha)] + [(f"alpha_pattern[{k!r}]", v) for k, v in pattern.items()]:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AdapterError(f"adapter {adapter.spec}: {key} in adapter_config.json is {value!r}; it must be a "
                               "number (LoRA's α, the update's scale α/r). Fix the config or save the adapter again.")


def _check_dora_parts(adapter, module: str, parts: dict[str, str], shape: tuple[int, int], stored: tuple[int, ...],
                      embedding: bool) -> None:
    """Refuse a DoRA magnitude of another length than the rows it rescales (PEFT's ``(out,)``, a convolution's
    ``(1, out, 1…)``; an embedding's: its dim) and a saved ``base_layer`` of another shape than the base weight
    (`stored`, as the base holds it): one magnitude element had broadcast to every row, ΔW 38× too large."""
    if "magnitude" in parts:
        got = tuple(adapter.weights.info(parts["magnitude"]).shape)
        want = shape[1] if embedding else shape[0]
        if math.prod(got) != want:
            raise AdapterError(f"adapter {adapter.spec}: module {module}'s DoRA magnitude "
                               f"{parts['magnitude']} has shape {got}, but it rescales {want} rows of the base weight "
                               f"(out, in) {shape}. The adapter is damaged or of another model; save it again.")
    if "base_layer" in parts:
        got = tuple(adapter.weights.info(parts["base_layer"]).shape)
        if got != stored:
            raise AdapterError(f"adapter {adapter.spec}: module {module}'s saved base weight {parts['base_layer']} has "
                               f"shape {got}, but the base's is {stored}. The adapter is of another model.")


def _paired_biases(biases: dict[str, str], base, base_tensors: dict[str, str]) -> list[UnpairedTensor]:
    """The adapter's trained biases (its name -> key), each with the base's bias it replaces: matched by name as
    the weights are, else through its module's matched weight (a module the base stores renamed), else None."""
    base_biases = [n for n in base.names() if n.endswith(".bias")]
    pairs = match_names(list(biases), base_biases).pairs
    out = []
    for name, key in biases.items():
        found = pairs.get(name)
        if found is None and name.removesuffix(".bias") in base_tensors:
            renamed = base_tensors[name.removesuffix(".bias")].removesuffix(".weight") + ".bias"
            found = renamed if renamed in base_biases else None
        out.append(UnpairedTensor(key, name, found))
    return out


def _renamed_modules(modules: list[str], base_weights: list[str], model) -> dict[str, str]:
    """Adapter module → the base tensor its weight loads from, for modules whose name the base stores otherwise.

    An adapter names modules as the model class does (PEFT wraps the loaded model), and transformers
    renames some checkpoint tensors on loading: Gemma 3's multimodal checkpoints store
    ``language_model.model.layers.N…`` for the model's ``model.language_model.layers.N…``, PhiMoE its
    router ``block_sparse_moe.gate`` for ``mlp.router``, GPT-NeoX its head ``embed_out`` for
    ``lm_head``. The base's names are renamed as on loading
    (:func:`~spectra.checkpoints.placement.parameter_sources`, which :func:`_plan_parameters` reads
    too) and ``module.weight`` is looked up among them. A weight fused from several tensors (no one
    base tensor) or a model that cannot be built from the config (``model`` None) leaves the module
    out.
    """
    if model is None:
        return {}
    sources = parameter_sources(model, base_weights, [m + ".weight" for m in modules])
    return {weight.removesuffix(".weight"): found[0].tensor for weight, found in sources.items()
            if len(found) == 1 and found[0].converter is None}


def _plan_parameters(adapter, base, config, modules: dict[str, dict[str, str]], model) -> list[AdapterDelta]:
    """The LoRAs on parameters (``target_parameters``), one AdapterDelta per base tensor and expert.

    A saved key does not name the parameter its LoRA adapts: PEFT wraps the module holding the
    targeted parameters (``…mlp.experts``) once per parameter, in the order the module registers
    them, each wrapper around the previous one, so the last parameter's LoRA is saved as
    ``…experts.lora_A.weight`` and the one before as ``…experts.base_layer.lora_A.weight``. The
    model class, built from the base's ``config.json`` on the meta device, gives that order, each
    parameter's shape and layout (``is_transposed``), and how the base's tensors load into it
    (:func:`~spectra.checkpoints.placement.split_sources`). The wrappers' modules are removed
    from `modules`; the other modules are plain LoRA modules. `model` is that class
    (:func:`~spectra.checkpoints.targets.meta_model`), None when it cannot be built.
    """
    targets = list(adapter.config["target_parameters"])
    if model is None:
        raise _unreadable(adapter, ", ".join(targets), f"the base {base.spec}'s config.json names no model class "
                          "this transformers can build, and the class alone tells which saved LoRA adapts which "
                          "parameter, laid out how")
    holders = _targeted_parameters(model, targets)
    if not holders:
        raise AdapterError(f"adapter {adapter.spec}: its target_parameters ({', '.join(targets[:3])}) match no "
                           f"parameter of {architecture(config)}, the base {base.spec}'s model class. Was it trained "
                           "on another model? Pass the adapter's own base.")
    sources = parameter_sources(model, base.names(), {f"{h}.{p}" for h, ps in holders.items() for p in ps})
    alpha_default = adapter.config.get("lora_alpha", 8)
    alpha_pattern = adapter.config.get("alpha_pattern") or {}
    _check_alphas(adapter, alpha_default, alpha_pattern)
    held = _HeldFactors()  # each parameter's A and B read once for all of its experts
    deltas = []
    for name in list(modules):
        holder, depth = name, 0
        while holder.endswith(".base_layer"):  # one level of nesting per parameter wrapped before
            holder, depth = holder.removesuffix(".base_layer"), depth + 1
        model_holder = resolve_name(holder, holders)
        if model_holder is None:
            continue  # a LoRA on a module (target_modules)
        parts = modules.pop(name)
        wrapped = holders[model_holder]  # registration order: the first is the innermost wrapper
        if depth >= len(wrapped) or set(parts) != {"A", "B"}:
            raise AdapterError(f"adapter {adapter.spec}: module {name} holds {', '.join(sorted(parts))} at nesting "
                               f"depth {depth}, but {model_holder} has {len(wrapped)} targeted parameter(s) "
                               f"({', '.join(wrapped)}), each a LoRA A and B. Was it trained on another model?")
        leaf = wrapped[len(wrapped) - 1 - depth]
        parameter = f"{model_holder}.{leaf}"
        a_info, b_info = adapter.weights.info(parts["A"]), adapter.weights.info(parts["B"])
        shape = tuple(model.get_parameter(parameter).shape)
        experts = shape[0] if len(shape) == 3 else 1
        transposed = len(shape) == 3 and bool(getattr(model.get_submodule(model_holder), "is_transposed", False))
        in_features, out_features = (shape[-2], shape[-1]) if transposed else (shape[-1], shape[-2])
        rank = a_info.shape[0] // experts
        if not rank or tuple(a_info.shape) != (rank * experts, in_features) or \
                tuple(b_info.shape) != (out_features, rank * experts):
            raise AdapterError(f"adapter {adapter.spec}: the LoRA on {parameter} has A {tuple(a_info.shape)} and B "
                               f"{tuple(b_info.shape)}, which do not fit the parameter {shape} of {experts} expert(s) "
                               f"(A (r·{experts}, {in_features}), B ({out_features}, r·{experts})). The adapter was "
                               "trained on a different base model; pass its own base.")
        alpha = pattern_value(alpha_pattern, f"{holder}.{leaf}", alpha_default)  # PEFT's key: module.parameter
        scaling = alpha / rank_scale(rank, bool(adapter.config.get("use_rslora")))
        if parameter not in sources:
            raise AdapterError(f"adapter {adapter.spec} adapts {parameter}, which no tensor of the base {base.spec} "
                               "loads into. Was it trained on another model? Pass the adapter's own base.")
        try:
            slices = split_sources(base, parameter, shape, sources[parameter], config, label="base")
        except PlacementError as err:
            if err.mismatch:
                raise AdapterError(f"adapter {adapter.spec} adapts {parameter} of shape {shape}, but {err.reason}. "
                                   "The adapter was trained on a different base model; pass its own base.") from None
            raise _unreadable(adapter, parameter, err.reason) from None
        for s in slices:
            deltas.append(AdapterDelta(
                module=s.module, base_tensor=s.tensor, shape=s.shape, dtype=a_info.dtype, conv1d=s.conv1d, keys=parts,
                scaling=scaling, embedding=False, base_expert=s.stored_expert,
                parameter=ExpertUpdate(parameter, s.place.expert, experts, transposed, s.place.rows,
                                       s.place.stored_transposed), held=held))
    return deltas


def _targeted_parameters(model, targets: list[str]) -> dict[str, list[str]]:
    """Module name → its parameters that ``target_parameters`` match, in registration order.

    PEFT's rule (``BaseTuner._inject_parameters``): ``module.param`` matches a target equal to
    it or a dot-suffix of it; parameters are wrapped in the order the module registers them.
    """
    holders: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}"
            if module_name and any(key == t or key.endswith("." + t) for t in targets):
                holders.setdefault(module_name, []).append(param_name)
    return holders


def _unreadable(adapter, parameter: str, why: str) -> AdapterError:
    return AdapterError(f"adapter {adapter.spec} adapts {parameter} through PEFT's target_parameters, and spectra "
                        f"cannot read it exactly: {why}. Merge it (PeftModel.from_pretrained(...).merge_and_unload()"
                        ".save_pretrained(DIR)) and pass DIR as TUNED instead.")


def _tied_heads(adapter, modules: dict, missing: list[str], match, base_weights: list[str], config, notes) -> dict:
    """Output heads with a LoRA whose base weight is the tied input embedding (no tensor of their own).

    A tied base stores the embedding only (``tie_word_embeddings``, transformers' default).
    PEFT's ``ensure_weight_tying`` gives the head a LoRA tied to the embedding's (A_h = B_eᵀ,
    B_h = A_eᵀ: the same ΔW), which is dropped here and analysed once, under the embedding;
    a head's own LoRA (no embedding LoRA, or an untied one) is read against the embedding's
    weight. Returns {head module: the embedding's base tensor} for the latter; removes the
    former from `modules`.
    """
    if (config or {}).get("tie_word_embeddings", True) is False:
        return {}
    embeds = [n for n in base_weights if module_info(n.removesuffix(".weight")).role == "embed"]
    heads = [m for m in missing if module_info(m).role == "head" and {"A", "B"} <= set(modules[m])]
    if len(embeds) != 1 or not heads:
        return {}
    (embed_tensor,) = embeds
    embed_module = next((m for m, t in match.pairs.items() if t == embed_tensor), None)
    out = {}
    for head in heads:
        parts = modules[head]
        embed_parts = modules.get(embed_module.removesuffix(".weight")) if embed_module else None
        if embed_parts and {"emb_A", "emb_B"} <= set(embed_parts):
            read = adapter.weights.read
            if (torch.equal(read(parts["A"]), read(embed_parts["emb_B"]).T)
                    and torch.equal(read(parts["B"]), read(embed_parts["emb_A"]).T)):
                notes.append(f"adapter module {head}: its LoRA is tied to {embed_module.removesuffix('.weight')}'s "
                             "(PEFT's ensure_weight_tying), the same ΔW; reported once, under the embedding")
                del modules[head]
                continue
        notes.append(f"adapter module {head}: tied to {embed_tensor} in the base (it has no weight of its own); "
                     "its ΔW is read against that weight")
        out[head] = embed_tensor
    return out

