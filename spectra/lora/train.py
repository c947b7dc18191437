"""Train LoRA, DoRA, rsLoRA, QLoRA and QDoRA adapters (or a full fine-tune) with PEFT.

One loop for every method; a method only changes how the model is loaded and wrapped:

- LoRA (Hu et al. 2021, arXiv:2106.09685): ``W₀x + s·BAx``, ``s = α/r``; rsLoRA
  (Kalajdzievski 2023, arXiv:2312.03732) scales by ``α/√r``.
- DoRA (Liu et al. 2024, arXiv:2402.09353): ``m ⊙ (W₀ + sBA)/‖W₀ + sBA‖_row``
  (PEFT's ``use_dora``).
- QLoRA (Dettmers et al. 2023, arXiv:2305.14314): the base is stored as 4-bit NF4 with
  double quantisation (bitsandbytes, which also runs on CPU) and computes in
  ``compute_dtype``; QDoRA is DoRA on the same 4-bit base.
- ``full``: every parameter trains, and the result is a normal checkpoint directory
  that pairs with the base for ``spectra analyze``/``verify``.

Training runs on ``device`` (cpu, cuda, cuda:N: the model, the teacher and every batch);
it is deterministic on CPU for a given seed (same seed → same adapter bytes), not on CUDA,
whose kernels may sum in a different order from run to run.
Each step's loss goes to ``training_log.jsonl``; the run's summary to
``spectra_train.json``; the output directory appears only when training succeeded.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import numbers
import re
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

# what an adapter targets, shared with spectra memory; role_targets, target_modules and BLOCK_ROLES are also
# spectra.lora.train's names for its callers
from spectra.checkpoints.adapted import (  # noqa: F401
    TEXT_STACKS,
    _fit_method,
    _peft_targets,
    peft_targets,
    role_targets,
    target_modules,
)
from spectra.checkpoints.architectures import parse_stacks
from spectra.checkpoints.pairing import check_device
from spectra.checkpoints.roles import BLOCK_ROLES, check_roles  # noqa: F401
from spectra.checkpoints.targets import bnb_skip_modules, head_modules  # noqa: F401  (head_modules for callers)
from spectra.errors import ConfigError
from spectra.files import refuse_replacing_others, staged_directory
from spectra.lora.data import (
    IGNORE_INDEX,
    TokenizedData,
    batches,
    check_max_length,
    check_task,
    model_inputs,
    predicted_targets,
    prepare_data,
)
from spectra.scaling import rank_scale

METHODS = ("lora", "dora", "qlora", "qdora", "full")
_KINDS = {"seq_cls": "sequence classification", "causal_lm": "causal language model",
          "seq2seq_lm": "sequence-to-sequence language model"}  # transformers' Auto classes, by task
PEFT_TASKS = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM", "seq2seq_lm": "SEQ_2_SEQ_LM"}  # PEFT's task_type, by task
_COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_RANK = 8  # the LoRA paper's typical rank; small models need no more
_MAX_DIM = 2**63 - 1  # torch's sizes are int64
# the command-line option of each TrainConfig field that some combination ignores (None: library only)
_OPTIONS = {"rank": "--rank", "alpha": "--alpha", "rslora": "--rslora", "plan": "--plan",
            "roles": "--roles", "stacks": "--stacks", "target_modules": None, "lora_dropout": None,
            "compute_dtype": "--compute-dtype"}
TRAIN_SUMMARY = "spectra_train.json"
TRAIN_LOG = "training_log.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Written into ``spectra_train.json`` so a run can be repeated.

    Options that the method or the plan would ignore are refused, naming both: ``full``
    trains every weight, so it takes none of ``rank``, ``alpha``, ``rslora``, ``plan``,
    ``roles``, ``target_modules`` or ``lora_dropout``; a plan none of ``rank``, ``alpha``,
    ``roles`` or ``target_modules``; ``roles`` and ``target_modules`` exclude each other;
    ``compute_dtype`` is only for the 4-bit methods.

    Attributes
    ----------
    method : {"lora", "dora", "qlora", "qdora", "full"}
    rank : int, optional
        LoRA rank of every targeted module; None: 8 (see :attr:`lora_rank`).
    alpha : float, optional
        LoRA α; None gives update scale 2, the common choice: ``2·rank``, or ``2·√rank``
        with ``rslora`` (as ``spectra extract`` and ``recommend`` choose it).
    rslora : bool
        Scale by α/√r (rsLoRA) instead of α/r.
    plan : str, optional
        A plan file from ``spectra recommend``: per-module ranks, alphas and targets, so
        it takes no ``rank``, ``alpha``, ``roles`` or ``target_modules``; its analysis must
        be of this base (see :meth:`~spectra.ranks.RankPlan.check_base`).
    roles : tuple of str, optional
        Roles to target (:data:`BLOCK_ROLES`: ``q, k, v, o, qkv``, MLA's ``q_a, q_b, kv_a, kv_b``, DeepSeek-V4's
        ``kv, o_a, o_b``, cross-attention's ``xq, xk, xv, xo``, ``gate, up, down, gate_up``, a multimodal
        projector's ``projector``); None or (): all of them (stored as None), ``projector`` only where ``stacks``
        name the projector (:func:`~spectra.checkpoints.roles.default_roles`). A role takes the modules that hold it
        (:func:`~spectra.checkpoints.architectures.role_selected`): ``q`` DeepSeek's ``q_a_proj`` and ``q_b_proj``,
        ``k`` or ``v`` its ``kv_a_proj_with_mqa`` and ``kv_b_proj`` (V4's ``kv_proj``), as GPT-2's ``c_attn``, ``o``
        V4's ``o_a_proj`` (through its weight: PEFT cannot wrap it) and ``o_b_proj``. An MoE's fused
        expert parameters are taken by ``gate``/``up`` (``gate_up_proj``) and ``down`` (``down_proj``), through
        PEFT's ``target_parameters`` (see :func:`role_targets` and :func:`peft_targets`).
    stacks : tuple of str, optional
        Stacks whose modules of those roles are targeted (``language``, ``encoder``, ``vision``,
        …; see :func:`~spectra.checkpoints.architectures.parse_stacks`). None: the stacks text
        runs through (the language model, an encoder–decoder's encoder): training batches are
        text, so a vision tower's adapter would get no gradient (see :func:`target_modules`).
    target_modules : tuple of str, optional
        Module names to target instead of roles (as ``model.named_modules()`` names them).
    task : {"auto", "causal_lm", "seq_cls", "seq2seq_lm"}
        ``auto``: ``seq2seq_lm`` for an encoder–decoder (config.json's ``is_encoder_decoder``:
        T5, BART), else classification when every record has a ``label``, language modelling
        when none has; a file where some records lack one is refused (see ``read_records``).
        ``seq2seq_lm`` trains on ``{"source", "target"}`` records: the loss is the mean
        cross-entropy over target tokens.
    max_length : int, optional
        Tokens per example (``seq2seq_lm``: per source and per target); None: 128, or the
        model's position limit when shorter (noted in ``spectra_train.json``). A length beyond
        a table of positions (BERT's ``max_position_embeddings``, GPT-2's ``n_positions``,
        BART's: learned; Marian's: a fixed sinusoid) is refused, naming the limit and the table.
    batch_size, epochs, max_steps, lr, weight_decay, warmup_ratio, grad_clip
        The optimisation (AdamW, linear warm-up then linear decay to 0). Warm-up lasts
        ``ceil(warmup_ratio · total steps)`` steps, as Hugging Face's
        ``TrainingArguments.get_warmup_steps`` counts them: a short run still warms up.
        A ``batch_size`` above the number of training examples takes them all in each step
        (as PyTorch's ``DataLoader`` and Hugging Face's ``Trainer`` do), and a note says so.
    group_by_length : bool
        Batch examples of similar length together (sorted within runs of 8 batches, then
        the batches shuffled): about half the padded tokens on short texts of mixed
        length, so about half the step time; batches are a little less random.
    lora_dropout : float
    eval_fraction : float
        Share of the data held out for evaluation when no eval data is passed (0: none):
        ``round(eval_fraction · n)`` examples, at least 1 and at most ``n − 1``; data of one
        example is refused unless this is 0.
    eval_every : int, optional
        Also evaluate every this many steps, a positive integer (default: at the end of each
        epoch only).
    compute_dtype : {"float32", "bfloat16", "float16"}
        QLoRA/QDoRA compute dtype of the 4-bit layers.
    teacher : str, optional
        A checkpoint whose outputs the model learns (KL distillation) instead of the labels,
        e.g. the full fine-tune: then a rank-r adapter is fitted to the full update's function.
    device : str
        Where the model trains: ``cpu``, ``cuda`` or ``cuda:N``. The adapter is written the
        same way from any device.
    seed : int
    """

    method: str = "lora"
    rank: int | None = None  # None -> DEFAULT_RANK (lora_rank); left unset so a full fine-tune can refuse a rank
    alpha: float | None = None  # None -> 2·rank (2·√rank with rslora): update scale 2 whatever the rank
    rslora: bool = False  # α/r is PEFT's default
    plan: str | None = None
    roles: tuple[str, ...] | None = None  # None -> every block linear, as QLoRA recommends
    stacks: tuple[str, ...] | None = None  # None -> the stacks text reaches: a tower's adapter would not train
    target_modules: tuple[str, ...] | None = None
    task: str = "auto"
    max_length: int | None = None  # None -> 128 (data.DEFAULT_MAX_LENGTH), cut to what the model's positions cover
    batch_size: int = 16  # fits a small model on 2 CPU cores at a step rate that shows progress
    epochs: int = 1
    max_steps: int | None = None  # caps the steps over all epochs
    lr: float | None = None  # None -> 5e-4 for adapters, 1e-4 for full (small models, few epochs)
    weight_decay: float = 0.0  # adapters start at zero update; decay would pull them back
    warmup_ratio: float = 0.06  # RoBERTa/LoRA-paper GLUE recipe
    grad_clip: float = 1.0
    lora_dropout: float = 0.0  # no dropout: the update stays a deterministic function of the data
    eval_fraction: float = 0.1  # a held-out tenth when no eval data is given
    eval_every: int | None = None
    compute_dtype: str = "float32"  # exact on any CPU; bfloat16 is faster where AMX exists
    teacher: str | None = None
    gradient_checkpointing: bool = False  # trades compute for memory; off for small models
    group_by_length: bool = False  # Hugging Face's default: uniformly random batches
    device: str = "cpu"  # reproducible bit for bit; a GPU is what a model of real size needs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method {self.method!r} is not one of {', '.join(METHODS)}.")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        object.__setattr__(self, "roles", check_roles(self.roles))  # () reads as None: every block role
        if self.stacks is not None:
            object.__setattr__(self, "stacks", parse_stacks(self.stacks, option="stacks (--stacks)"))
        check_task(self.task, option="task (--task)")
        for name in ("rank", "batch_size", "epochs", "max_steps", "eval_every"):  # rank, max_steps, eval_every: None
            value = getattr(self, name)  # a bool is an int to Python: True was taken as 1, eval_every 0 as no eval
            if value is None and name in ("rank", "max_steps", "eval_every"):
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}.")
            object.__setattr__(self, name, int(value))  # numpy's np.int64(5), as a plain int
        if self.rank is not None and self.rank > _MAX_DIM:  # torch sizes are int64: 10**30 was a traceback of empty()
            raise ConfigError(f"rank (--rank) {self.rank!r} is more than any weight has rows or columns (torch's "
                              "sizes stop at 2**63 - 1); give at most min(d_in, d_out) of the modules it adapts.")
        check_max_length(self.max_length, option="max_length (--max-length)")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr}.")
        if self.alpha is not None and not self.alpha > 0:  # α = 0 trains nothing, α < 0 flips the update
            raise ConfigError(f"alpha (--alpha) must be positive, got {self.alpha}.")
        for name, value in (("lr", self.lr), ("alpha (--alpha)", self.alpha)):  # > 0 lets +inf through: an
            if value is not None and not math.isfinite(value):  # infinite step or scale makes every weight NaN
                raise ConfigError(f"{name} must be finite, got {value}.")
        for name in ("eval_fraction", "warmup_ratio", "lora_dropout"):  # each named with its value (--eval-fraction)
            if not 0.0 <= getattr(self, name) < 1.0:  # NaN and ±inf fail too; dropout 1 zeroes every LoRA input
                raise ConfigError(f"{name} must lie in [0, 1), got {getattr(self, name)}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):  # < 0 pushes weights away from 0
            raise ConfigError(f"weight_decay must be a finite number ≥ 0, got {self.weight_decay}.")
        if not (math.isfinite(self.grad_clip) and self.grad_clip >= 0):  # NaN clipped every gradient to NaN
            raise ConfigError(f"grad_clip must be a finite number ≥ 0 (0: no clipping), got {self.grad_clip}.")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype {self.compute_dtype!r} is not one of {', '.join(_COMPUTE_DTYPES)}.")
        self._refuse_ignored_options()
        check_device(self.device)

    def _refuse_ignored_options(self) -> None:
        """Refuse an option that the method or the plan would ignore, naming it and what overrides it."""
        given = {"rank": self.rank is not None, "alpha": self.alpha is not None, "rslora": self.rslora,
                 "plan": self.plan is not None, "roles": self.roles is not None, "stacks": self.stacks is not None,
                 "target_modules": self.target_modules is not None, "lora_dropout": self.lora_dropout != 0}
        if self.method == "full":
            ignored = [name for name, set_ in given.items() if set_]
            if ignored:
                raise ConfigError(f"method full (--full) trains every weight, so {_ignored(ignored)}; "
                                  f"drop {'it' if len(ignored) == 1 else 'them'}, or train an adapter (method lora, "
                                  "dora, qlora or qdora).")
        elif self.plan is not None:
            ignored = [name for name in ("rank", "alpha", "roles", "stacks", "target_modules") if given[name]]
            if ignored:
                raise ConfigError(f"plan (--plan) sets every module's rank, α and target, so {_ignored(ignored)}. "
                                  "Plan other ranks or roles with `spectra recommend` (e.g. --roles q,v), "
                                  "or train without a plan.")
        elif given["target_modules"] and (given["roles"] or given["stacks"]):
            which = " and ".join(name for name in ("roles", "stacks") if given[name])
            raise ConfigError(f"target_modules names the modules to adapt, so {which} would be ignored; pass one "
                              "of them.")
        if self.compute_dtype != "float32" and not self.quantized:
            raise ConfigError(f"compute_dtype (--compute-dtype) {self.compute_dtype} is the compute dtype of the "
                              f"4-bit layers of qlora and qdora; method {self.method} trains in float32, so it would "
                              "be ignored. Drop it, or train with method qlora or qdora.")

    @property
    def lora_rank(self) -> int:
        """The rank of every targeted module: ``rank``, else :data:`DEFAULT_RANK`."""
        return self.rank if self.rank is not None else DEFAULT_RANK

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.method == "full" else 5e-4)

    @property
    def quantized(self) -> bool:
        return self.method in ("qlora", "qdora")


def _ignored(fields: list[str]) -> str:
    """``--rank, --alpha would be ignored (rank, alpha)``: fields as the command line, then Python, names them."""
    options = [_OPTIONS.get(f) or f for f in fields]
    return f"{', '.join(options)} would be ignored" + ("" if options == fields else f" ({', '.join(fields)})")


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes
    ----------
    out_dir : Path
        The adapter directory (PEFT format) or, for ``full``, the checkpoint directory.
    task, method : str
    steps : int
    trainable_params : int
    losses : list of float
        Training loss per step (also in ``training_log.jsonl``).
    evals : list of dict
        ``{"step", "loss", "accuracy", ...}`` after each evaluation.
    step_times : list of float
        Seconds per optimiser step (forward, backward, update).
    label_names : list of str or None
    notes : list of str
        What the run decided for the user (e.g. examples cut to the model's positions); also
        in ``spectra_train.json``.
    """

    out_dir: Path
    task: str
    method: str
    steps: int
    trainable_params: int
    losses: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def final_eval(self) -> dict | None:
        return self.evals[-1] if self.evals else None


# ---------------------------------------------------------------------------- models


def model_dir(spec) -> Path:
    """The local directory of a checkpoint (hub ids resolved); training needs config.json."""
    from spectra.checkpoints.source import AdapterSource, open_checkpoint

    source = open_checkpoint(spec)
    if isinstance(source, AdapterSource):
        raise ConfigError(f"{spec} is a PEFT adapter, not a model: training starts from the model it adapts (its "
                          "base), and a sweep or an evaluation needs a whole checkpoint (merge the adapter first: "
                          "PeftModel.from_pretrained(...).merge_and_unload().save_pretrained(DIR)).")
    folder = source.path if source.path.is_dir() else source.path.parent
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{spec}: training and evaluation need a model directory with config.json, "
                          "not a bare weight file.")
    return folder


def load_model(spec, *, task: str, num_labels: int | None = None, quantize: bool = False,
               compute_dtype: str = "float32", label_names: list[str] | None = None, device: str = "cpu",
               pad_token_id: int | None = None, complete: bool = False, notes: list[str] | None = None):
    """Load a checkpoint as a causal LM, sequence classifier or seq2seq LM in float32 (or NF4 4-bit) on ``device``.

    A missing or resized classification head is initialised from the current torch
    seed, so seed first for a reproducible head — unless ``complete``: a model whose
    function is measured (a sweep's fine-tune, a teacher, verify's references) must be the
    checkpoint's own, so a weight the checkpoint lacks or holds at another size is refused.
    ``pad_token_id``: the id the batches are padded with (the tokenizer's), set in the
    model's config — a classifier pools at the last token before it, so the two must agree.
    A vision-language model with no causal-LM class loads for ``causal_lm`` through its
    image-text-to-text class (see :func:`loads_as_image_text_to_text`), and ``notes`` (once)
    says that its batches are text alone.
    """
    import transformers as tf

    check_device(device)  # before anything is read
    folder = model_dir(spec)
    kwargs: dict = {"dtype": torch.float32}
    if task == "seq_cls":
        auto = tf.AutoModelForSequenceClassification
        if num_labels is not None:
            kwargs.update(num_labels=num_labels, ignore_mismatched_sizes=True)
        if label_names is not None and not all(n == str(i) for i, n in enumerate(label_names)):
            kwargs.update(id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)})
    elif task == "seq2seq_lm":
        auto = tf.AutoModelForSeq2SeqLM
    elif loads_as_image_text_to_text(model_config := json.loads((folder / "config.json").read_text())):
        auto = tf.AutoModelForImageTextToText  # a VLM's language model and head, run on text alone
        note = VLM_NOTE.format(model_type=model_config["model_type"])
        if notes is not None and note not in notes:
            notes.append(note)
    else:
        auto = tf.AutoModelForCausalLM
    try:
        if quantize:  # bitsandbytes quantises while loading, on the device named here; the saved head stays whole
            skip = None
            if task == "seq_cls":  # transformers' keep list and the head PEFT trains a copy of
                skeleton = _skeleton(auto, folder)
                skip = bnb_skip_modules(skeleton, qlora_kept_modules(skeleton, task))
            kwargs.update(device_map={"": str(torch_device(device))},
                          quantization_config=nf4_config(compute_dtype, skip_modules=skip))
        with quiet_loading():
            model, info = auto.from_pretrained(str(folder), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as err:
        if "Unrecognized configuration class" in str(err):  # its text goes on to name every config class: ~200
            config = json.loads((folder / "config.json").read_text())
            nor = " (nor a decoder-only image-text-to-text one)" if task == "causal_lm" else ""
            raise ConfigError(f"cannot load {spec} as a {task} model: transformers has no {_KINDS[task]} class{nor} "
                              f"for its model_type {config.get('model_type')!r}. spectra trains causal language "
                              "models, sequence classifiers and text-to-text encoder-decoders (--task causal_lm, "
                              "seq_cls or seq2seq_lm)" + (f"; {spec} is an encoder-decoder: train it with --task "
                                               'seq2seq_lm on {"source": ..., "target": ...} records (auto picks it)'
                                               if config.get("is_encoder_decoder") and task != "seq2seq_lm"
                                               else "") + ".") from err
        raise ConfigError(f"cannot load {spec} as a {task} model: {err}") from err
    if complete:
        _check_loaded_whole(spec, info, task, num_labels)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if quantize and compute_dtype == "float32":
        _keep_4bit_float32(model)
    return model if quantize else model.to(torch_device(device))


def _keep_4bit_float32(model) -> None:
    """Keep bitsandbytes' CPU 4-bit layers on their float32 path (dequantise, then a float32 matmul).

    On a CPU with AVX512-BF16, bitsandbytes (0.50 here) repacks a layer's weight the first time it
    runs in eval mode without gradients and computes in bfloat16 from then on, in training too:
    the first eval would silently turn ``compute_dtype`` float32 into bfloat16 (bitsandbytes' ``Linear4bit.forward``
    checks ``support_avx512bf16_for_cpu``; measured here: QLoRA eval losses ~5e-4 relative off a float32 reference,
    tests/lora/test_seq2seq_qlora.py).
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def loads_as_image_text_to_text(model_config: dict) -> bool:
    """Whether a causal LM of this config.json loads through ``AutoModelForImageTextToText``.

    transformers 5 gives many vision-language models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL(-MoE),
    LLaVA, Mistral 3, Idefics 3, PaliGemma, InternVL, …) an image-text-to-text class and no
    causal-LM one. Their forward takes text alone (``input_ids``, ``attention_mask``,
    ``labels``; no ``pixel_values``): the language model and its head, the vision tower not
    run. An encoder–decoder of that kind (Florence-2, Pix2Struct) is no causal LM: False.
    """
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    model_type = model_config.get("model_type")
    text = model_config.get("text_config") or {}
    return (model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
            and model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
            and not (model_config.get("is_encoder_decoder") or text.get("is_encoder_decoder")))


VLM_NOTE = ("model_type {model_type} loaded as image-text-to-text (transformers has no causal-LM class for it); "
            "text-only batches: its vision tower is not evaluated")


def _check_loaded_whole(spec, info: dict, task: str, num_labels: int | None) -> None:
    """Refuse a load that left weights at random (``from_pretrained``'s missing or resized keys)."""
    missing = sorted(info.get("missing_keys") or [])
    resized = sorted(f"{k[0]} (stored {tuple(k[1])}, needed {tuple(k[2])})" if isinstance(k, tuple) and len(k) == 3
                     else str(k) for k in info.get("mismatched_keys") or [])
    if not (missing or resized):
        return
    if task == "seq_cls":
        what = "sequence classifier" + (f" of {num_labels} classes" if num_labels else "")
    else:
        what = "causal LM" if task == "causal_lm" else "seq2seq LM"
    found = "; ".join(([f"it has no {', '.join(missing[:3])}"] if missing else [])
                      + ([f"it holds {', '.join(resized[:3])}"] if resized else []))
    raise ConfigError(f"{spec} as a {what}: {found}. Those weights would start at random, and the function "
                      "measured would not be the checkpoint's. Give data of the task it was trained for "
                      "(labelled .jsonl for a classifier, plain text for a causal LM, source/target records for a "
                      "seq2seq LM) with labels its head knows.")


def _check_4bit_widths(model, spec) -> None:
    """bitsandbytes' 4-bit layers need at least 64 input features (its blocks of 64); a narrower one fails in
    the first forward pass with a bare reshape error, so it is refused before training.

    Only the layers text runs through (:data:`TEXT_STACKS`) are checked. A VLM's vision tower and projector are
    stored in 4 bits as well (transformers quantises them, and spectra's memory estimate counts them so), but text
    batches never run them, so a narrow one cannot fail; leaving them in float32 instead would only cost memory."""
    import bitsandbytes as bnb

    from spectra.checkpoints.architectures import module_stack

    model_config = model.config.to_dict()  # an encoder-decoder's encoder is a stack of its own, which text runs
    narrow = [(name, m.in_features) for name, m in model.named_modules()
              if isinstance(m, bnb.nn.Linear4bit) and m.in_features < 64
              and module_stack(name, model_config) in TEXT_STACKS]
    if narrow:
        name, width = narrow[0]
        raise ConfigError(f"{spec}: {name} has {width} input features; 4-bit (QLoRA/QDoRA) layers need at least 64 "
                          f"({len(narrow)} layer(s) are narrower). Train this model with --method lora or dora.")


@contextlib.contextmanager
def quiet_loading():
    """No transformers "Loading weights" bar inside spectra's own."""
    import transformers as tf

    bar = tf.utils.logging.is_progress_bar_enabled()
    tf.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        if bar:
            tf.utils.logging.enable_progress_bar()


def torch_device(device: str) -> torch.device:
    """``cpu``, ``cuda`` (the current GPU) or ``cuda:N`` as a ``torch.device`` with its index."""
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def model_device(model) -> torch.device:
    """Where a model's parameters are (its batches go there); the CPU for a model without any."""
    param = next(model.parameters(), None)
    return torch.device("cpu") if param is None else param.device


def to_device(batch: dict, device: torch.device) -> dict:
    """A batch of tensors moved to ``device`` (no copy where it is already)."""
    return {k: v.to(device) for k, v in batch.items()}


def nf4_config(compute_dtype: str = "float32", *, skip_modules: list[str] | None = None):
    """QLoRA's storage: NF4 4-bit, blocks of 64, double quantisation (arXiv:2305.14314). ``skip_modules``
    (``llm_int8_skip_modules``, :func:`spectra.checkpoints.targets.bnb_skip_modules`): the modules left
    unquantised, which replace transformers' own keep list; None keeps that list."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=_COMPUTE_DTYPES[compute_dtype],
                              llm_int8_skip_modules=skip_modules)


def qlora_kept_modules(model, task: str) -> list[str]:
    """The modules of ``model`` (the class loaded for ``task``; on the meta device will do) that QLoRA's load keeps
    out of 4 bits besides transformers' own keep list: those PEFT trains a copy of in full for the task
    (:func:`spectra.ranks.plan.task_modules`: a classifier's head), which it cannot do of a 4-bit layer (only
    floating-point tensors can require gradients). Empty for a causal or seq2seq LM, whose load keeps transformers'
    rule as it is. The load passes them to :func:`spectra.checkpoints.targets.bnb_skip_modules`; verify's W₀ and
    ``spectra memory`` to :func:`spectra.checkpoints.targets.bnb_4bit_linears`."""
    from spectra.ranks.plan import task_modules

    return [m.name for m in task_modules(model, PEFT_TASKS.get(task))]


def _skeleton(auto, folder: Path):
    """The class ``auto`` loads from ``folder``, built from its config.json on the meta device (names and shapes,
    no weights): what transformers' keep list is asked of before loading."""
    import transformers as tf

    with torch.device("meta"):
        return auto.from_config(tf.AutoConfig.from_pretrained(str(folder)))


def lora_config(model, config: TrainConfig, *, task: str, notes: list[str] | None = None):
    """The PEFT ``LoraConfig`` for ``model``: from the plan, or one rank on the role targets."""
    from peft import LoraConfig

    from spectra.ranks import load_plan

    if config.plan is not None:
        # Resolved on the model itself, as its class loaded the checkpoint: transformers-5
        # Mixtral's experts.N.w1/w3/w2 live in fused parameters, adapted via target_parameters.
        plan = load_plan(config.plan)
        plan = plan.with_rslora() if config.rslora else plan  # α re-derived: the plan's scale is kept
        fields = plan.to_peft_config(model=model, lora_dropout=config.lora_dropout)
        fields = {k: fields[k] for k in ("r", "lora_alpha", "target_modules", "target_parameters", "rank_pattern",
                                         "alpha_pattern", "use_rslora", "fan_in_fan_out", "lora_dropout")
                  if k in fields}
        if fields.get("target_parameters") and (config.method != "lora" or config.quantized):
            raise ConfigError(f"the plan adapts {fields['target_parameters'][0]} (a parameter {type(model).__name__} "
                              f"holds no module for) through PEFT's target_parameters, which method "
                              f"{config.method!r} does not support: train with method lora, or plan without "
                              "these modules' roles (spectra recommend --roles q,k,v,o).")
        _refuse_peft_refused_plan(fields.get("target_modules") or [], model, config.plan)
        fields = _outside_saved_modules(fields, model, task, notes)
        _note_unreached_plan_modules(plan, model, notes)
        if plan.policy.use_dora != (config.method in ("dora", "qdora")):
            warnings.warn(f"the plan {config.plan} was made for {'DoRA' if plan.policy.use_dora else 'plain LoRA'} "
                          f"(recommend {'--dora' if plan.policy.use_dora else 'without --dora'}); training method "
                          f"{config.method} as asked", stacklevel=3)
    else:
        from spectra.ranks import check_peft_conversion

        targets, parameters = peft_targets(model, config, notes=notes)
        targets = _peft_allowed(targets, parameters, model, config, notes)
        rank = config.lora_rank
        scale_2 = 2.0 * rank_scale(rank, config.rslora)
        fields = {"r": rank, "lora_alpha": config.alpha if config.alpha is not None else scale_2,
                  "target_modules": targets, "use_rslora": config.rslora, "lora_dropout": config.lora_dropout,
                  "fan_in_fan_out": _has_conv1d(model, targets)}
        if parameters:  # an expert's [gate; up] at rank r, as any fused module (GPT-2's c_attn, Phi-3's)
            fields["target_parameters"] = parameters
        fields = _outside_saved_modules(fields, model, task, notes)
        check_peft_conversion(fields, model)  # PEFT wraps exactly these, or the run is refused
        _refuse_rank_beyond_targets(rank, model, fields)
    return LoraConfig(**fields, use_dora=config.method in ("dora", "qdora"), bias="none",
                      task_type=PEFT_TASKS[task],
                      modules_to_save=head_modules(model, notes) if task == "seq_cls" else None)


def _peft_refused(targets: list[str], model) -> dict[str, str]:
    """Each of ``targets`` (module names of ``model``) PEFT puts no LoRA on → why
    (:func:`~spectra.checkpoints.targets.peft_refusal`: a Mamba mixer's ``out_proj`` and ``conv1d``, a grouped
    convolution)."""
    from spectra.checkpoints.targets import peft_refusal

    model_type, modules = getattr(model.config, "model_type", None), dict(model.named_modules())
    refused = {}
    for name in targets:
        why = peft_refusal(name, model_type, modules.get(name))
        if why is not None:
            refused[name] = why
    return refused


def _named(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _peft_allowed(targets: list[str], parameters: list[str], model, config: TrainConfig,
                  notes: list[str] | None) -> list[str]:
    """``targets`` without the modules PEFT puts no LoRA on (:func:`_peft_refused`), which roles take (``o`` takes a
    Mamba mixer's ``out_proj``), with a note naming them; else ``get_peft_model`` raised on them after the model and
    data were loaded. Refused where ``target_modules`` names one, or where no target is left: naming the Linears
    PEFT would adapt instead."""
    refused = _peft_refused(targets, model)
    if not refused:
        return targets
    names, why = list(refused), next(iter(refused.values()))
    if config.target_modules:
        raise ConfigError(f"target_modules names {_named(names)}: {why}. Leave {'it' if len(names) == 1 else 'them'} "
                          "out.")
    kept = [t for t in targets if t not in refused]
    if not kept and not parameters:
        from transformers.pytorch_utils import Conv1D

        layers = list(dict.fromkeys(n.rpartition(".")[2] for n, m in model.named_modules()
                                    if isinstance(m, (torch.nn.Linear, Conv1D)) and re.search(r"\.\d+\.", n)
                                    and n not in refused and not _peft_refused([n], model)))
        raise ConfigError(f"every LoRA target of the roles ({_named(names)}) is one PEFT puts no LoRA on: {why}. "
                          + (f"Name other modules (target_modules: the full names of e.g. its {', '.join(layers[:4])}"
                             " modules), or train a plan of `spectra recommend`, which leaves these out."
                             if layers else "Train a plan of `spectra recommend`, which leaves these out."))
    if notes is not None:
        notes.append(f"no LoRA on {len(names)} module(s) the roles take ({_named(names)}): {why}")
    return kept


def _refuse_peft_refused_plan(targets: list[str], model, plan) -> None:
    """Refuse a plan whose ``target_modules`` name a module PEFT puts no LoRA on (:func:`_peft_refused`; a plan of an
    older ``spectra recommend``, which did not leave them out), naming them, rather than PEFT's error after loading."""
    refused = _peft_refused(list(targets), model)
    if refused:
        names = list(refused)
        raise ConfigError(f"the plan {plan} names {_named(names)}: {next(iter(refused.values()))}. Drop "
                          f"{'it' if len(names) == 1 else 'them'} from the plan (`spectra recommend` leaves such "
                          "modules out).")


def _target_dims(model, fields: dict) -> dict[str, tuple[int, int]]:
    """Each LoRA target of ``fields`` → (d_out, d_in) of the matrix its rank-r update adds to: a Linear's (a 4-bit
    one's as it was before packing), GPT-2's Conv1D's (stored (in, out)), an Embedding's (rows, width), a
    convolution's (out, in·kernel), an expert parameter's per expert (stored (experts, ·, ·))."""
    dims = {}
    for name in fields.get("target_modules") or []:
        try:
            module = model.get_submodule(name)
        except AttributeError:  # not a module name (check_peft_conversion has refused what PEFT would miss)
            continue
        if hasattr(module, "out_features") and hasattr(module, "in_features"):
            dims[name] = (int(module.out_features), int(module.in_features))
        elif hasattr(module, "nf") and hasattr(module, "nx"):  # transformers' Conv1D
            dims[name] = (int(module.nf), int(module.nx))
        elif isinstance(module, torch.nn.Embedding):
            dims[name] = (module.num_embeddings, module.embedding_dim)
        elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() >= 2:
            dims[name] = (int(module.weight.shape[0]), math.prod(module.weight.shape[1:]))
    for name in fields.get("target_parameters") or []:
        weight = model.get_parameter(name)
        if weight.dim() >= 2:
            dims[name] = tuple(int(d) for d in weight.shape[-2:])
    return dims


def _refuse_rank_beyond_targets(rank: int, model, fields: dict, *, option: str = "rank (--rank)") -> None:
    """Refuse a uniform ``rank`` above min(d_in, d_out) of a module it adapts, naming the module and the largest rank
    every target takes, as ``spectra extract``, ``memory`` and ``recommend`` refuse it: a rank-r product B·A of that
    matrix has rank at most min(d_in, d_out), so the rest only costs parameters (PEFT takes any rank; 10**30 was
    torch's traceback). ``option``: how the user gave the rank (``rank (--sweep)`` for a rank sweep's)."""
    dims = _target_dims(model, fields)
    over = {name: (d_out, d_in) for name, (d_out, d_in) in dims.items() if rank > min(d_out, d_in)}
    if not over:
        return
    name, (d_out, d_in) = next(iter(over.items()))
    largest = min(min(d) for d in dims.values())
    more = f" and {len(over) - 1} more target(s)" if len(over) > 1 else ""
    raise ConfigError(f"{option} {rank!r} exceeds min(d_in, d_out) = {min(d_out, d_in)} of {name} "
                      f"({d_out}×{d_in}){more}; the largest rank every targeted module takes is {largest}: lower "
                      "it, or target other modules (--roles).")


def _outside_saved_modules(fields: dict, model, task: str, notes: list[str] | None) -> dict:
    """``fields`` without the LoRA targets that lie in a module PEFT trains and saves in full for the task
    (:func:`spectra.ranks.plan.task_modules`: PEFT's own head names and the rest of the head this trains,
    :func:`head_modules`), with a note naming them: BART's ``classification_head`` holds ``out_proj``, of role o,
    which the default roles take. PEFT wraps no LoRA inside a module it saves whole, so such a target trained nothing
    and was listed in the adapter's config all the same; ``spectra extract`` likewise puts no LoRA inside a module it
    saves whole (it refuses one asked for there), and ``spectra memory`` and ``recommend`` count none there. Their
    ``rank_pattern``/``alpha_pattern`` keys go with them. Refused where every target lies in the head."""
    from spectra.ranks.plan import inside_saved, task_modules

    saved = [m.name for m in task_modules(model, PEFT_TASKS[task])]
    targets = fields.get("target_modules") or []
    inside = inside_saved(targets, saved)
    if not inside:
        return fields
    kept = [t for t in targets if t not in inside]
    holders = ", ".join(dict.fromkeys(inside.values()))
    if not kept and not fields.get("target_parameters"):
        raise ConfigError(f"every LoRA target ({', '.join(inside)}) lies in {holders}, which PEFT trains and saves "
                          f"in full for task {task} (modules_to_save): the adapter would hold no LoRA. Choose roles "
                          "of the base model's blocks (--roles q,v) or a plan of them.")
    keys = {"^" + re.escape(t) for t in inside} | {re.escape(t) for t in inside} | set(inside)
    fields = fields | {"target_modules": kept} | {
        p: {k: v for k, v in fields[p].items() if k not in keys} for p in ("rank_pattern", "alpha_pattern")
        if fields.get(p)}
    note = (f"no LoRA on {', '.join(inside)}: it lies in {holders}, which PEFT trains and saves in full for task "
            f"{task} (modules_to_save), and PEFT wraps no LoRA inside a module it saves")
    if notes is not None and note not in notes:
        notes.append(note)
    return fields


def _refuse_parameter_methods_early(model, config: TrainConfig) -> None:
    """:func:`_fit_method`'s refusal of DoRA, QLoRA or dropout on parameter targets, on the model built from its
    config.json on the meta device (``model()`` builds it: None where transformers cannot): before the data and
    weights are loaded. Anything else it cannot tell there (a class transformers cannot build so, a name of another
    class) waits for the loaded model."""
    if config.plan is not None:  # the plan's own rule: DoRA (`recommend --dora`) or dropout on its parameter targets
        from spectra.ranks import load_plan

        plan = load_plan(config.plan)
        if not (plan.policy.use_dora or config.lora_dropout) or (built := model()) is None:
            return
        try:
            parameters = plan.parameter_targets(built)
        except ConfigError:
            return  # refused for another reason: said, with the loaded model's names, after loading
        plan.refuse_parameter_methods(parameters, built, config.lora_dropout)
        return
    if config.method == "lora" and not config.lora_dropout:
        return
    model = model()
    if model is None:
        return
    try:
        modules, weights, experts = _peft_targets(model, config)
    except ConfigError:
        return  # refused for another reason: said, with the loaded model's names, after loading
    _fit_method(type(model).__name__, modules, weights + experts, config)


def _refuse_rank_early(model, config: TrainConfig, *, option: str = "rank (--rank)") -> None:
    """:func:`_refuse_rank_beyond_targets` on the model built from its config.json on the meta device, with the
    targets :func:`lora_config` gives it: before the data and weights are loaded. A target inside a classifier's
    head is left out as a ``seq_cls`` run leaves it out (:func:`_outside_saved_modules`; the class of another task
    has no such head). A plan's ranks are checked by the plan; anything else it cannot tell there (a class
    transformers cannot build so, targets refused for another reason) waits for the loaded model. ``model()``
    builds the model (None where transformers cannot)."""
    if config.plan is not None or config.method == "full":
        return
    model = model()
    if model is None:
        return
    try:
        targets, parameters = peft_targets(model, config)
    except ConfigError:
        return  # refused for another reason: said, with the loaded model's names, after loading
    targets = _peft_allowed(targets, parameters, model, config, None)  # its refusal: before loading, too
    try:
        fields = _outside_saved_modules({"target_modules": targets, "target_parameters": parameters}, model,
                                        "seq_cls", None)
    except ConfigError:
        return  # refused for another reason: said, with the loaded model's names, after loading
    _refuse_rank_beyond_targets(config.lora_rank, model, fields, option=option)


def refuse_before_loading(folder: Path, config: TrainConfig, *, option: str = "rank (--rank)") -> None:
    """Every refusal of ``config`` that :func:`train_adapter` can make from the model directory ``folder``'s
    config.json alone (the class it names, built on the meta device), before the data and weights are read: DoRA,
    QLoRA or dropout on parameter targets, QLoRA where nothing would be quantised, a rank above min(d_in, d_out) of
    a target (``option`` names the rank's option in that message). ``rank_sweep`` asks it of every (method, rank)
    before the first run trains. A class transformers cannot build so is checked on the loaded model only.

    Raises
    ------
    ConfigError
        Naming the module, the rank or the method at fault.
    """
    from spectra.checkpoints.targets import meta_model

    built = []

    def model():  # one meta build for the checks that leave it as it is (the 4-bit one converts its own)
        if not built:
            built.append(meta_model(json.loads((folder / "config.json").read_text())))
        return built[0]

    _refuse_parameter_methods_early(model, config)
    _refuse_unquantised_early(folder, config)
    _refuse_rank_early(model, config, option=option)


def _unquantised_fix(config: TrainConfig) -> str:
    lora = "dora" if config.method == "qdora" else "lora"
    return (f". Train it with --method {lora}: a 16-bit base with a "
            f"{'DoRA' if lora == 'dora' else 'LoRA'} adapter is what this load would train.")


def _refuse_unquantised_early(folder: Path, config: TrainConfig) -> None:
    """Refuse QLoRA/QDoRA on a model whose load would store nothing in 4 bits (Falcon, whose linears are
    ``FalconLinear``, an ``nn.Linear`` subclass transformers' bitsandbytes path leaves alone), asked of the class
    config.json names, built on the meta device: before the data and weights are loaded, by the rule ``spectra
    memory`` refuses the same run by (:func:`spectra.checkpoints.targets.qlora_unquantised`), or with a 4-bit layer
    narrower than bitsandbytes' blocks (:func:`_check_4bit_widths`, on the layers that conversion made). A class that
    cannot be built so is checked on the loaded model (:func:`_check_quantised`, :func:`_check_4bit_widths`)."""
    from spectra.checkpoints.targets import meta_model, qlora_unquantised

    if not config.quantized:
        return
    model = meta_model(json.loads((folder / "config.json").read_text()))
    if model is None:
        return
    if reason := qlora_unquantised(model):
        raise ConfigError(f"{folder}: {reason}" + _unquantised_fix(config))
    if any(type(m).__name__ == "Linear4bit" for m in model.modules()):  # converted in place, as the load would store it
        _check_4bit_widths(model, folder)


def _check_quantised(model, spec, config: TrainConfig) -> None:
    """Refuse a QLoRA/QDoRA load that stored no module in 4 bits (no ``Linear4bit``): the run would train an adapter
    on an unquantised base and record it as quantised. The loaded model's own check, after
    :func:`_refuse_unquantised_early`'s on its class."""
    import bitsandbytes as bnb

    if any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()):
        return
    left = {type(m).__name__: name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear}
    what = (f"its linears are {', '.join(f'{c} (e.g. {n})' for c, n in left.items())}, a subclass of nn.Linear, "
            "which it leaves in 16 bits") if left else "none of its modules is an nn.Linear it converts"
    raise ConfigError(f"{spec}: QLoRA's load (transformers' bitsandbytes path, which converts exactly nn.Linear "
                      f"modules) stored nothing in 4 bits: {what}" + _unquantised_fix(config))


def _note_unreached_plan_modules(plan, model, notes: list[str] | None) -> None:
    """Note a plan's modules in a stack text never reaches (a VLM's vision tower, planned from its analysis): trained
    on text-only batches, their adapters get no gradient and stay at zero."""
    from spectra.checkpoints.architectures import module_info

    model_config = model.config.to_dict()
    unreached = {m.name: module_info(m.name, model_config).stack for m in plan.modules}
    unreached = {name: stack for name, stack in unreached.items() if stack not in TEXT_STACKS}
    if unreached and notes is not None:
        name, stack = next(iter(unreached.items()))
        notes.append(f"the plan adapts {len(unreached)} module(s) of the {', '.join(sorted(set(unreached.values())))} "
                     f"stack(s) (e.g. {name}, {stack}), which text-only batches never reach: their adapters get no "
                     "gradient and stay at zero (plan the stacks text reaches: spectra recommend --stacks language)")


def _has_conv1d(model, names: list[str]) -> bool:
    from transformers.pytorch_utils import Conv1D

    modules = dict(model.named_modules())
    return any(isinstance(modules[n], Conv1D) for n in names)


@contextlib.contextmanager
def quiet_peft(model=None, adapter=None):
    """Silence transformers' own ``is_gradient_checkpointing`` deprecation, raised inside PEFT; with the `model` and
    the `adapter` PEFT is about to put on it (a ``LoraConfig``, or a saved adapter's directory), also PEFT's
    warning that rank_pattern / alpha_pattern keys "did not match any targeted module", where every key it lists
    is one PEFT applies to a parameter the adapter targets (:func:`parameter_pattern_keys`).

    PEFT 0.21 checks those keys against the targeted *modules* only, so the keys of ``target_parameters`` (an
    MoE's fused experts; the ``.*\\.gate_up_proj`` its conversion of transformers-5 MoE configs writes itself) are
    listed although PEFT applies them (tests/lora/test_train.py's plan over Mixtral's experts checks the ranks). A
    warning that lists any other key (one naming nothing, in PEFT's case-sensitive match; one an earlier key
    overrides), and every other warning, is shown as before.
    """
    keys = parameter_pattern_keys(model, adapter) if model is not None and adapter is not None else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        for pattern, applied in keys.items():
            if not applied:
                continue
            # the message PEFT writes, listing sorted(unmatched) as a Python list: only these keys in it. The
            # warnings module matches `message` ignoring case; PEFT's keys are matched with it: (?-i:…)
            key = "|".join(re.escape(repr(k)) for k in applied)
            warnings.filterwarnings("ignore", category=RuntimeWarning,
                                    message=rf"(?-i:The following {pattern} keys did not match any targeted module "
                                            rf"and were ignored: \[(?:{key})(?:, (?:{key}))*\]\.$)")
        yield


def parameter_pattern_keys(model, adapter) -> dict[str, list[str]]:
    """``"rank_pattern"`` / ``"alpha_pattern"`` → the keys of `adapter` (a ``LoraConfig`` or a saved adapter's
    directory), as PEFT will hold them on `model` (after its ``convert_peft_config_for_transformers``), that PEFT
    applies to a parameter among its ``target_parameters``: the first key of the field, in the config's order, that
    matches the parameter's full name (PEFT's ``get_pattern_key``, as
    :func:`~spectra.checkpoints.peft_match.config_targets` reads it). A key that matches a parameter only after an
    earlier key is not applied there."""
    from peft import LoraConfig

    from spectra.checkpoints.peft_match import config_targets

    config = copy.deepcopy(adapter) if isinstance(adapter, LoraConfig) else LoraConfig.from_pretrained(str(adapter))
    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

        convert_peft_config_for_transformers(config, model=model, conversions=None)
    except (ImportError, ValueError):  # a PEFT without the conversion, or a config it refuses (PEFT says so itself)
        pass
    patterns = ("rank_pattern", "alpha_pattern")
    on_parameters = {"target_parameters": list(getattr(config, "target_parameters", None) or ())}
    on_parameters |= {p: dict(getattr(config, p, None) or {}) for p in patterns}
    try:
        found = config_targets(on_parameters, [], parameter_names=[n for n, _ in model.named_parameters()])
    except re.error:  # a key that is no regex: PEFT fails on it itself
        return {p: [] for p in patterns}
    return {p: sorted({found.applied[p][n] for n in found.parameters if n in found.applied[p]}) for p in patterns}


def wrap_model(model, config: TrainConfig, *, task: str, notes: list[str] | None = None):
    """Attach the adapter (PEFT) to a loaded model; a full fine-tune is returned as is.

    ``gradient_checkpointing`` checkpoints every block (transformers' non-reentrant
    checkpointing, which needs no input that requires grad); QLoRA's goes through PEFT's
    ``prepare_model_for_kbit_training``, as before. It had taken effect for QLoRA only.
    """
    if config.gradient_checkpointing and not config.quantized:
        enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5.x's name
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.method == "full":
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    with quiet_peft():
        if config.quantized:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
        peft_config = lora_config(model, config, task=task, notes=notes)
    with quiet_peft(model, peft_config):
        model = get_peft_model(model, peft_config)
    adapter = model.peft_config["default"]
    if adapter.modules_to_save:  # PEFT's classifier appends its own head names ("classifier", "score") to ours
        adapter.modules_to_save = list(dict.fromkeys(adapter.modules_to_save))  # once each, in order
    return model


# ---------------------------------------------------------------------------- loop


def train_adapter(base, data, config: TrainConfig | None = None, out_dir=None, *, eval_data=None,
                  overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Train an adapter (or a full fine-tune) of ``base`` on ``data`` and save it atomically.

    Parameters
    ----------
    base : str or path
        Model directory (or hub id) with config.json and weights.
    data : str or path
        ``.txt`` (language modelling), ``.jsonl`` of ``{"text"}`` / ``{"text", "label"}`` /
        ``{"source", "target"}`` (an encoder–decoder), or ``.csv``/``.tsv`` whose header
        names the columns ``text`` (and ``label``), or ``source`` and ``target``.
    config : TrainConfig, optional
    out_dir : str or path
        Directory to create: a PEFT adapter (``adapter_config.json``,
        ``adapter_model.safetensors``) or, for ``method="full"``, a checkpoint
        (``config.json``, ``model.safetensors``); both also hold ``training_log.jsonl``
        and ``spectra_train.json`` (with the ``pad_token_id`` batches were padded with, which
        a classifier loaded with the adapter needs in its config).
    eval_data : str or path, optional
        Held-out data (same format); default: ``config.eval_fraction`` of ``data``.
    overwrite : bool
        Replace an existing ``out_dir``.
    progress : bool
        Show a tqdm progress bar.

    Returns
    -------
    TrainResult

    Raises
    ------
    ConfigError
        Bad data, options, a plan made from an analysis of another base, or an existing
        ``out_dir`` without ``overwrite``.
    """
    config = config or TrainConfig()
    if out_dir is None:
        raise ConfigError("train_adapter needs out_dir, the directory to write the adapter into.")
    out = Path(out_dir)
    refuse_replacing_others(out, command="train", overwrite=overwrite, option="out_dir")  # before loading anything
    folder = model_dir(base)
    if config.plan is not None:  # per-module names and ranks of another model would adapt this one in part
        from spectra.checkpoints.source import open_checkpoint
        from spectra.ranks import load_plan

        load_plan(config.plan).check_base(open_checkpoint(base))
    refuse_before_loading(folder, config)
    notes: list[str] = []
    task, train, held_out, label_names, tokenizer = prepare_data(
        folder, data, task=config.task, max_length=config.max_length, eval_data=eval_data,
        eval_fraction=config.eval_fraction, seed=config.seed, notes=notes)
    if config.batch_size > len(train):  # batches are slices of the shuffled examples: the one batch holds them all
        notes.append(f"batch_size {config.batch_size} is more than the {len(train)} training examples: each step "
                     f"takes all {len(train)} (one step per epoch), as a batch_size of {len(train)} would")
    torch.manual_seed(config.seed)  # head initialisation and LoRA's A init draw from it
    model = load_model(base, task=task, num_labels=len(label_names) if label_names else None,
                       quantize=config.quantized, compute_dtype=config.compute_dtype, label_names=label_names,
                       device=config.device, pad_token_id=tokenizer.pad_token_id, notes=notes)
    if config.quantized:
        _check_quantised(model, base, config)
        _check_4bit_widths(model, base)
    model = wrap_model(model, config, task=task, notes=notes)
    teacher = None
    if config.teacher is not None:
        teacher = load_model(config.teacher, task=task, num_labels=len(label_names) if label_names else None,
                             device=config.device, pad_token_id=tokenizer.pad_token_id, complete=True).eval()
    with staged_directory(out, command="train", overwrite=overwrite) as staging:  # appears whole, or not at all
        result = _train(model, teacher, train, held_out, config, task, staging, progress)
        result.label_names, result.notes = label_names, notes
        _save(model, tokenizer, config, result, staging, base=base, data=data, eval_data=eval_data,
              max_length=train.max_length)
    result.out_dir = out
    return result


def _train(model, teacher, train: TokenizedData, held_out: TokenizedData | None, config: TrainConfig, task: str,
           folder: Path, progress: bool) -> TrainResult:
    import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    device = model_device(model)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    per_epoch = math.ceil(len(train) / config.batch_size)
    total = min(config.max_steps or per_epoch * config.epochs, per_epoch * config.epochs)
    warmup = warmup_steps(config.warmup_ratio, total)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    result = TrainResult(out_dir=folder, task=task, method=config.method, steps=0,
                         trainable_params=sum(p.numel() for p in params))
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm.tqdm(total=total, unit="step", desc=f"train {config.method}", disable=not progress, leave=False)
    with open(folder / TRAIN_LOG, "w", encoding="utf-8") as log:
        for epoch in range(config.epochs):
            for batch in batches(train, config.batch_size, generator=generator, by_length=config.group_by_length):
                if result.steps >= total:
                    break
                start = time.perf_counter()
                model.train()
                loss = _loss(model, teacher, to_device(batch, device), task)
                loss.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                rate = optimizer.param_groups[0]["lr"]  # the rate this step uses (the schedule moves on below)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(loss.detach())
                result.step_times.append(time.perf_counter() - start)
                result.losses.append(value)
                result.steps += 1
                log.write(json.dumps({"step": result.steps, "epoch": epoch, "loss": value,
                                      "lr": rate}) + "\n")
                bar.update()
                bar.set_postfix(loss=f"{value:.4f}")
                if held_out is not None and config.eval_every and result.steps % config.eval_every == 0:
                    _record_eval(model, held_out, config, result, epoch, log)
            if held_out is not None and not (config.eval_every and result.steps % config.eval_every == 0):
                _record_eval(model, held_out, config, result, epoch, log)
            if result.steps >= total:
                break
    bar.close()
    return result


def warmup_steps(ratio: float, total: int) -> int:
    """Linear warm-up steps of a run of ``total`` steps: ``ceil(ratio · total)``.

    Rounded up, as transformers' ``TrainingArguments.get_warmup_steps`` does, so any
    ratio > 0 warms up for at least one step (truncation gave short runs none).
    """
    return math.ceil(ratio * total)


def _record_eval(model, held_out, config, result: TrainResult, epoch: int, log) -> None:
    metrics = {"step": result.steps, "epoch": epoch, **evaluate(model, held_out, batch_size=config.batch_size)}
    result.evals.append(metrics)
    log.write(json.dumps({"eval": metrics}) + "\n")


def _loss(model, teacher, batch: dict, task: str) -> torch.Tensor:
    if teacher is None:
        return model(**batch).loss
    inputs = model_inputs(batch, model)  # an encoder-decoder's decoder reads the labels, shifted right
    logits = model(**inputs).logits  # (B, T, V) or (B, C)
    with torch.no_grad():
        target = teacher(**inputs).logits
    mask = {"causal_lm": batch["attention_mask"], "seq2seq_lm": batch["labels"] != IGNORE_INDEX}.get(task)
    return distill_loss(logits, target, mask)


def distill_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean KL(teacher ‖ student) over positions (Hinton et al. 2015, arXiv:1503.02531, T = 1).

    Parameters
    ----------
    logits, teacher_logits : torch.Tensor, shape (B, T, V) or (B, C)
    mask : torch.Tensor, shape (B, T), optional
        1 for positions that count.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    log_q = torch.log_softmax(teacher_logits.float(), dim=-1)
    kl = (log_q.exp() * (log_q - log_p)).sum(-1)  # (B, T) or (B,)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


@torch.no_grad()
def evaluate(model, data: TokenizedData, *, batch_size: int = 32) -> dict:
    """Mean loss and accuracy of ``model`` on ``data`` (token-level for causal and seq2seq LM).

    For language modelling, loss is the mean next-token cross-entropy over every target
    token (not a mean of batch means) and accuracy is top-1 next-token accuracy; for
    ``seq2seq_lm`` the same over the target's tokens, each predicted by the decoder from
    the source and the target tokens before it. Examples are batched in length order (sums
    do not depend on the order; padding does).
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches(data, batch_size, by_length=True):
        batch = to_device(batch, device)
        logits = model(**model_inputs(batch, model)).logits.float()  # (B, T, V) or (B, C)
        labels = batch["labels"]
        if data.task != "seq_cls":  # causal: position t predicts token t+1; seq2seq: decoder position t, token t
            logits, labels = predicted_targets(logits, batch)
        flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        keep = flat_labels != IGNORE_INDEX
        loss_sum += float(torch.nn.functional.cross_entropy(flat_logits[keep], flat_labels[keep], reduction="sum"))
        correct += int((flat_logits[keep].argmax(-1) == flat_labels[keep]).sum())
        count += int(keep.sum())
    model.train(was_training)
    if count == 0:
        raise ConfigError("the eval data holds no target (no example of at least 2 tokens); add or lengthen text.")
    unit = "examples" if data.task == "seq_cls" else "tokens"
    return {"loss": loss_sum / max(count, 1), "accuracy": correct / max(count, 1), unit: count}


# ---------------------------------------------------------------------------- saving


def _save(model, tokenizer, config: TrainConfig, result: TrainResult, folder: Path, *, base, data, eval_data,
          max_length: int) -> None:
    import peft
    import transformers

    model.save_pretrained(folder)  # PEFT: adapter files only; full: config.json + model.safetensors
    if hasattr(tokenizer, "save"):
        tokenizer.save(folder)
    times = result.step_times
    summary = {
        "schema_version": 1, "base": str(base), "data": str(data),
        "eval_data": None if eval_data is None else str(eval_data),
        "task": result.task, "method": config.method,  # the length and rank trained (a default is None in TrainConfig)
        "config": dataclasses.asdict(config) | {"max_length": max_length}
                  | ({} if config.method == "full" or config.plan else {"rank": config.lora_rank}),
        "tokenizer": getattr(tokenizer, "name", type(tokenizer).__name__), "label_names": result.label_names,
        # the id batches were padded with, set as the model's config.pad_token_id (a classifier pools at the last
        # token before it); a PEFT adapter has no config of its own to carry it, so a loader must set it again
        "pad_token_id": tokenizer.pad_token_id,
        "steps": result.steps, "trainable_params": result.trainable_params,
        "final_train_loss": result.losses[-1] if result.losses else None, "evals": result.evals,
        "timings": {"step_median_s": steady_step_time(times), "train_s": sum(times)}, "notes": result.notes,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        # every file saved here (the record too): what --overwrite may replace on a rerun, and nothing else
        "files": sorted({p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} | {TRAIN_SUMMARY}),
    }
    (folder / TRAIN_SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def read_train_summary(folder) -> dict | None:
    """``spectra_train.json`` of an adapter or checkpoint directory, if it has one."""
    path = Path(folder) / TRAIN_SUMMARY
    return json.loads(path.read_text()) if path.is_file() else None


def steady_step_time(step_times: list[float]) -> float | None:
    """Median seconds per optimiser step, the first step left out: it pays the warm-up (allocations, kernel choice,
    lazy initialisation), which made a run of two or three steps read 2 s a step where the others took 23 ms.
    A run of one step gives that step; none, None."""
    if not step_times:
        return None
    return statistics.median(step_times[1:] or step_times)
