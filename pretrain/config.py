"""The run configuration: one typed dataclass tree, loaded from a JSON/YAML file plus dotted overrides.

Split of responsibilities (DESIGN.md: "no value is set in two places"):

* this tree (``--config run.json`` + ``--section.key=value``) owns *what* is trained and *how it
  learns*: model preset / init, data, every optimisation hyper-parameter (dense and value learning
  rates, the one warmup/decay schedule both follow, weight decay, clipping), and the run itself;
* the DeepSpeed JSON (``--deepspeed_config``) owns the *engine*: batch sizes (micro-batch,
  accumulation), ZeRO stage, precision (bf16/fp16/fp32), offload, communication settings.

The DeepSpeed JSON therefore must not carry "optimizer", "scheduler" or "gradient_clipping":
``pretrain.main`` writes those blocks from ``optim`` so that the dense and the value schedules
come from one schedule function (``pretrain.engine.lr_lambda``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from atomic_files import write_json_atomic
from pkm.config_files import read_mapping_file
from pkm.lr_schedule import SCHEDULE_SHAPES
from pkm.memory_config import BERT_PKM_KEYS, MemoryConfig

__all__ = [
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "TrainConfig",
    "RunConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "save_config",
    "parse_override_args",
]

DECAY_SHAPES = SCHEDULE_SHAPES  # pkm.lr_schedule.warmup_decay
DENSE_OPTIMIZER_IMPLS = ("auto", "torch", "deepspeed")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
# train.collective_timeout_s below this fails ordinary steps (a collective waits for the slowest rank).
MIN_COLLECTIVE_TIMEOUT_S = 5.0


@dataclass
class ModelConfig:
    """Which model: a preset from ``pkm.presets``, optionally initialised from a memory-less BERT.

    ``memory`` (``pkm.memory_config.MemoryConfig``: layers, mode, n_keys with N = n_keys^2 slots,
    heads, knn, k_dim, query_norm, value_init, dropouts) describes the memory in full: fields a
    config leaves out take MemoryConfig's defaults (Lample's: N = 512^2, middle layer). Absent
    (null), the model keeps the preset's memory (the tiny preset's is 16^2 slots in layer 1), or
    with ``init_from`` the defaults.
    ``overrides`` are other ``BertPkmConfig`` fields applied on top of the preset (or of the
    init_from checkpoint's config), e.g. ``{"hidden_size": 128}``; unknown names are an error
    (checked in ``pretrain.main``). Memory fields there (``mem_n_keys``, ...) are the old spelling:
    they are moved into ``memory`` (on top of the preset's memory, as they used to apply).
    With ``init_from`` the architecture (sizes, vocabulary) comes from that checkpoint and ``preset``
    is ignored. Without it the vocabulary size is taken from the data's tokenizer.
    """

    preset: str = "tiny"
    init_from: str | None = None  # HF BERT folder (config.json + weights), memory-less
    memory: MemoryConfig | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    init_seed: int | None = None  # seed of the model initialisation (same on every rank); None: train.seed
    # attention kernel (Hugging Face attn_implementation): sdpa picks flash / memory-efficient kernels
    # on GPUs; flash_attention_2 needs the flash-attn package
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        self._move_memory_overrides()

    def _move_memory_overrides(self) -> None:
        """Old configs set the memory as BertPkmConfig fields in ``overrides``: move them."""
        by_hf_name = {hf: name for name, hf in BERT_PKM_KEYS.items()}
        legacy = {by_hf_name[k]: v for k, v in self.overrides.items() if k in by_hf_name}
        if not legacy:
            return
        if self.memory is not None:
            raise ValueError(
                f"model.overrides sets memory fields {sorted(BERT_PKM_KEYS[k] for k in legacy)} beside "
                "model.memory: set them in model.memory only (e.g. model.memory.n_keys).")
        if self.init_from:
            base = MemoryConfig()
        else:
            from pkm.presets import PRESETS, preset_memory

            base = preset_memory(self.preset) if self.preset in PRESETS else MemoryConfig()
        self.memory = base.replace(**legacy)
        self.overrides = {k: v for k, v in self.overrides.items() if k not in by_hf_name}


@dataclass
class DataConfig:
    """Where the shards are and how MLM samples are cut from them."""

    shard_dir: str = ""  # the data_prep output folder (manifest.json, <split>_<k>.bin/.idx)
    train_split: str = "train"
    val_split: str = "validation"
    max_seq_len: int = 128
    packing: str = "full"  # full: documents packed into full-length samples; doc: never cross a document
    mlm_probability: float = 0.15
    whole_word_masking: bool = False
    num_workers: int = 0  # DataLoader workers per rank (masking is seeded per sample: any number is exact)
    verify_checksums: bool = False  # shards' SHA-256 against manifest.json before training (cached per file)


@dataclass
class OptimConfig:
    """Every optimisation hyper-parameter; the dense AdamW and the value SparseAdam share the schedule."""

    lr: float = 1e-4  # dense peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 0  # linear warmup from 0 to the peak, for both lr and value_lr
    decay: str = "linear"  # after warmup: linear | cosine | constant, down to min_lr_ratio * peak
    decay_steps: int | None = None  # step at which the decay reaches its floor; None: train.max_steps
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # dense global grad-norm clipping (written into the DS config); 0: off
    value_lr: float = 1e-3  # value-table peak learning rate (Lample: 1e-3), same warmup/decay shape
    value_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    value_eps: float = 1e-8
    value_weight_decay: float = 0.0
    value_grad_clip: float = 0.0  # global norm over all value tables (all ranks); 0: off
    dense_impl: str = "auto"  # auto: torch AdamW, DeepSpeedCPUAdam under optimizer offload
    fused: bool | None = None  # torch AdamW's fused kernel (fused=True); None: on GPUs only


@dataclass
class TrainConfig:
    """The run: length, seed, cadence of logging/eval/checkpoints, output folder, resume."""

    max_steps: int = 1000  # optimizer steps (each = micro-batch x accumulation x world samples)
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 50  # micro-batches per rank per evaluation; 0: the whole validation split
    ckpt_every: int = 0  # 0: checkpoint only at the end (and on SIGTERM/SIGINT)
    keep_last_k: int = 3
    out_dir: str = "runs/pretrain"
    resume: bool = False  # continue from the newest intact checkpoint in out_dir
    resume_from: str | None = None  # continue from this checkpoint folder (checkpoints/step_N); implies resume
    stale_window_steps: int = 100  # a slot is stale if not updated in this many steps
    max_skipped_steps: int = 20  # stop (exit 3) after this many non-finite/skipped steps in a row; 0: never
    # How long a rank waits in a collective (and the start-up rendezvous) for the others before it
    # fails: the bound on how long the survivors of one rank's crash can hang (pretrain/distributed.py).
    # 600: DeepSpeed's default. It must outlast the slowest legitimate wait: a checkpoint save on
    # shared storage, the first step's compilation, evaluation.
    collective_timeout_s: float = 600.0
    tensorboard: bool = True
    deterministic: bool = False  # torch deterministic algorithms (GPU: bitwise-reproducible resume, slower)
    # torch.compile the encoder layers without a memory (in place; checkpoints unchanged). Off by
    # default: the first steps pay the compilation (about a minute for BERT-large on a GPU, and CPUs
    # need a C++ compiler); worth it for long GPU runs.
    compile: bool = False
    peak_tflops: float = 790.0  # the device's peak dense TFLOP/s, for the logged MFU (790: H200 bf16)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        """Checks that need no file system, no model and no world size (cheap; called on load)."""
        o, t, d = self.optim, self.train, self.data
        if t.max_steps <= 0:
            raise ValueError(f"train.max_steps must be positive, got {t.max_steps}.")
        for name in ("log_every", "eval_every", "ckpt_every", "max_skipped_steps"):
            if getattr(t, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(t, name)}.")
        if t.log_every == 0:
            raise ValueError("train.log_every must be >= 1.")
        if t.keep_last_k < 1:
            raise ValueError(f"train.keep_last_k must be >= 1 (the latest checkpoint is always kept), got {t.keep_last_k}.")
        if t.stale_window_steps < 1:
            raise ValueError(f"train.stale_window_steps must be >= 1, got {t.stale_window_steps}.")
        if not (isinstance(t.collective_timeout_s, (int, float)) and math.isfinite(t.collective_timeout_s)
                and t.collective_timeout_s >= MIN_COLLECTIVE_TIMEOUT_S):
            raise ValueError(
                f"train.collective_timeout_s must be a number of seconds >= {MIN_COLLECTIVE_TIMEOUT_S} (how long a "
                f"rank waits for the others in a collective before failing), got {t.collective_timeout_s!r}.")
        if t.eval_batches < 0:
            raise ValueError(f"train.eval_batches must be >= 0 (0: the whole split), got {t.eval_batches}.")
        if o.decay not in DECAY_SHAPES:
            raise ValueError(f"optim.decay must be one of {DECAY_SHAPES}, got {o.decay!r}.")
        if self.model.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"model.attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
                             f"got {self.model.attn_implementation!r}.")
        if not (math.isfinite(t.peak_tflops) and t.peak_tflops > 0):
            raise ValueError(f"train.peak_tflops must be a positive number (the device's peak TFLOP/s), "
                             f"got {t.peak_tflops!r}.")
        if o.dense_impl not in DENSE_OPTIMIZER_IMPLS:
            raise ValueError(f"optim.dense_impl must be one of {DENSE_OPTIMIZER_IMPLS}, got {o.dense_impl!r}.")
        if o.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {o.warmup_steps}.")
        decay_steps = o.decay_steps if o.decay_steps is not None else t.max_steps
        if o.warmup_steps > decay_steps:
            raise ValueError(
                f"optim.warmup_steps ({o.warmup_steps}) is longer than the decay horizon ({decay_steps}, "
                "optim.decay_steps or train.max_steps): lower warmup_steps or raise max_steps."
            )
        for name in ("lr", "value_lr", "eps", "value_eps", "weight_decay", "value_weight_decay",
                     "grad_clip", "value_grad_clip"):
            v = getattr(o, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"optim.{name} must be a finite number >= 0, got {v!r}.")
        if not 0.0 <= o.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}.")
        for name in ("betas", "value_betas"):
            b = getattr(o, name)
            if len(b) != 2 or not all(0.0 <= x < 1.0 for x in b):
                raise ValueError(f"optim.{name} must be two numbers in [0, 1), got {b!r}.")
        if d.max_seq_len < 8:
            raise ValueError(f"data.max_seq_len must be at least 8, got {d.max_seq_len}.")
        if not 0.0 < d.mlm_probability < 1.0:
            raise ValueError(f"data.mlm_probability must be in (0, 1), got {d.mlm_probability}.")
        if d.packing not in ("full", "doc"):
            raise ValueError(f"data.packing must be 'full' or 'doc', got {d.packing!r}.")
        if d.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {d.num_workers}.")


# --------------------------------------------------------------------------------------------------
# dict <-> dataclass with type checking
# --------------------------------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a JSON value (or an override string already parsed) to the field's type."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key '{key}' cannot be null.")
    origin = typing.get_origin(inner)
    if inner is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"config key '{key}' must be true or false, got {value!r}.")
    if inner is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"config key '{key}' must be an integer, got {value!r}.")
    if inner is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"config key '{key}' must be a number, got {value!r}.")
    if inner is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"config key '{key}' must be a string, got {value!r}.")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key '{key}' must be a list, got {value!r}.")
        (elem,) = typing.get_args(inner) or (Any,)
        return [v if elem is Any else _coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"config key '{key}' must be a mapping, got {value!r}.")
        return dict(value)
    return value


# Keys that earlier versions wrote into run_config.json and no longer mean anything (test hooks):
# accepted and dropped, so a run folder's own run_config.json still loads for a resume.
_RETIRED_KEYS = {"train.debug_kill_after_step", "train.debug_dump_logits"}


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ValueError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}.")
    data = {k: v for k, v in data.items() if prefix + k not in _RETIRED_KEYS}
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys in "
            f"'{prefix.rstrip('.') or '<root>'}': {', '.join(sorted(names))})."
        )
    kwargs = {}
    for name, value in data.items():
        tp, _ = _unwrap_optional(hints[name])
        if dataclasses.is_dataclass(tp) and value is not None:
            kwargs[name] = _from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hints[name], prefix + name)
    try:
        return cls(**kwargs)
    except ValueError as e:  # a section's own checks (e.g. MemoryConfig's): say which section
        if not prefix or str(e).startswith(f"config section '{prefix}"):
            raise
        raise ValueError(f"config section '{prefix.rstrip('.')}': {e}") from e


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    cfg = _from_dict(RunConfig, data, "")
    cfg.validate()
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    return asdict(cfg)


# --------------------------------------------------------------------------------------------------
# files and overrides
# --------------------------------------------------------------------------------------------------


def read_config_file(path: str) -> dict[str, Any]:
    """A JSON file, or YAML when the name ends in .yaml/.yml (needs pyyaml)."""
    return read_mapping_file(path, "config file")


def parse_value(text: str) -> Any:
    """An override's value: JSON if it parses (numbers, true/false, null, lists, dicts), else the string.

    Python spellings True/False/None are accepted too, so `--train.resume=True` works.
    """
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """data['a']['b']['c'] = value for 'a.b.c', creating intermediate dicts."""
    parts = dotted.split(".")
    if not all(parts):
        raise ValueError(f"override key '{dotted}' is malformed (expected section.key=value).")
    node = data
    for i, p in enumerate(parts[:-1]):
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        elif not isinstance(child, dict):
            raise ValueError(f"override '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section.")
        node = child
    node[parts[-1]] = value


def parse_override_args(args: list[str]) -> list[tuple[str, Any]]:
    """['--train.max_steps=50', '--optim.lr', '3e-4'] -> [('train.max_steps', 50), ('optim.lr', 3e-4)]."""
    out: list[tuple[str, Any]] = []
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or len(a) <= 2:
            raise ValueError(f"unexpected argument '{a}': overrides look like --section.key=value.")
        body = a[2:]
        if "=" in body:
            key, text = body.split("=", 1)
        else:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ValueError(f"override '{a}' has no value: write {a}=VALUE.")
            key, text = body, args[i + 1]
            i += 1
        out.append((key, parse_value(text)))
        i += 1
    return out


def apply_overrides(data: dict[str, Any], overrides: list[tuple[str, Any]]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain JSON data
    for key, value in overrides:
        set_dotted(data, key, value)
    return data


def load_config(path: str | None, overrides: list[tuple[str, Any]] | None = None) -> RunConfig:
    """RunConfig from a file (or defaults when path is None) plus (dotted key, value) overrides."""
    data = read_config_file(path) if path else {}
    return config_from_dict(apply_overrides(data, overrides or []))


def save_config(cfg: RunConfig, path: str) -> None:
    write_json_atomic(path, config_to_dict(cfg))
