"""Pretraining entry point (DeepSpeed launcher or a single process).

    deepspeed --num_gpus N pretrain/main.py --deepspeed_config ds_configs/zero2_bf16.json \\
        --config configs/bert-base.json [--train.max_steps=1000 --optim.lr=1e-4 ...] [--resume]
    python pretrain/main.py --deepspeed_config ds_configs/tiny_zero2_fp32.json --config configs/tiny.json

(``--module pretrain.main`` / ``python -m pretrain.main`` are the same: see pretrain/entry.py.)

Arguments:
    --config PATH            run config (JSON, or YAML with pyyaml): model / data / optim / train
    --deepspeed_config PATH  DeepSpeed JSON: batch sizes, ZeRO stage, precision, offload
    --section.key=VALUE      override a run-config value (e.g. --train.max_steps=50)
    --ds.key=VALUE           override a DeepSpeed-config value (e.g. --ds.gradient_accumulation_steps=4)
    --resume                 same as --train.resume=true (the newest intact checkpoint in train.out_dir)
    --train.resume_from=DIR  resume from this checkpoint folder (checkpoints/step_N) instead
    --local_rank N           set by the deepspeed launcher (ignored: LOCAL_RANK is read instead)

Everything that can be wrong with the configs, paths, batch sizes, shards and the checkpoint to
resume is checked before DeepSpeed or the model are touched (``prepare_run``), and reported as one
sentence saying what to fix. A run that diverges (``train.max_skipped_steps`` non-finite steps in a
row) exits with code 3.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

# MKL may otherwise change its thread count with the machine's load, and with it the summation order
# of matrix products: runs (and a resumed run versus the uninterrupted one) would differ in the last
# bits. Set before torch is imported; an explicit MKL_DYNAMIC in the environment wins.
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

if __name__ == "__main__":  # `python pretrain/main.py`, `deepspeed pretrain/main.py`, `python -m pretrain.main`
    try:
        from pretrain.entry import run_installed_module
    except ModuleNotFoundError as missing:
        if missing.name != "pretrain":
            raise
        sys.exit("error: the pretrain package is not installed in this Python: run ./run.sh setup "
                 "(or pip install -e . in the repository) first")
    run_installed_module("pretrain.main", __file__)  # runs pretrain.main.main() and exits: see pretrain/entry.py

from pkm.memory_config import MemoryConfig  # noqa: E402
from pretrain.config import (  # noqa: E402
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    parse_override_args,
    read_config_file,
    save_config,
)

__all__ = ["PreparedRun", "parse_cli", "prepare_run", "resolve_ds_config", "run", "main", "launch"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DS_OWNED_BY_RUN_CONFIG = {
    "optimizer": "optim.lr / optim.betas / optim.eps / optim.weight_decay",
    "scheduler": "optim.warmup_steps / optim.decay / optim.min_lr_ratio",
    "gradient_clipping": "optim.grad_clip",
}


@dataclass
class PreparedRun:
    """Everything validated and resolved, before any expensive work."""

    cfg: RunConfig
    ds_config: dict[str, Any]
    model_config: Any  # BertPkmConfig
    tokenizer_dir: str | None
    world_size: int
    rank: int
    local_rank: int
    resume_from: str | None


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

_USAGE = __doc__


def parse_cli(argv: list[str]) -> tuple[str | None, str | None, list[tuple[str, Any]], list[tuple[str, Any]]]:
    """-> (run config path, ds config path, run-config overrides, ds-config overrides)."""
    config_path = ds_path = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        key, eq, val = a.partition("=")
        if key in ("--config", "--deepspeed_config", "--deepspeed-config", "--local_rank", "--local-rank"):
            if not eq:
                if i + 1 >= len(argv):
                    raise ValueError(f"{key} needs a value.")
                val = argv[i + 1]
                i += 1
            if key == "--config":
                config_path = val
            elif key.startswith("--deepspeed"):
                ds_path = val
        elif a in ("--deepspeed", "--resume"):
            if a == "--resume":
                rest.append("--train.resume=true")
        else:
            rest.append(a)
        i += 1
    overrides = parse_override_args(rest)
    run_over = [(k, v) for k, v in overrides if not k.startswith("ds.")]
    ds_over = [(k[3:], v) for k, v in overrides if k.startswith("ds.")]
    return config_path, ds_path, run_over, ds_over


# --------------------------------------------------------------------------------------------------
# Validation and resolution (cheap: no DeepSpeed, no model weights, no data reads)
# --------------------------------------------------------------------------------------------------


def _offload_device(ds: dict[str, Any]) -> str | None:
    z = ds.get("zero_optimization", {}) or {}
    dev = (z.get("offload_optimizer") or {}).get("device")
    return dev if dev not in (None, "none") else None


# Every top-level key DeepSpeed 0.19 reads (deepspeed/runtime/config.py and the monitor, comms,
# profiler, activation-checkpointing, autotuning and data-efficiency configs it builds); DeepSpeed
# ignores any other key silently, so a typo such as "zero_optimisation" would train without ZeRO.
_DS_TOP_LEVEL_KEYS = frozenset({
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "managed_gradient_accumulation", "steps_per_print", "dump_state", "disable_python_gc", "disable_allgather",
    "communication_data_type", "seq_parallel_communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "gradient_allreduce_op", "zero_optimization", "zero_allow_untested_optimizer",
    "zero_force_ds_cpu_optimizer", "tensorboard", "wandb", "csv_monitor", "comet", "gradient_clipping", "fp16",
    "bf16", "bfloat16", "torch_autocast", "optimizer", "scheduler", "wall_clock_breakdown", "memory_breakdown",
    "flops_profiler", "activation_checkpointing", "comms_logger", "autotuning", "checkpoint", "datastates_ckpt",
    "data_types", "aio", "pipeline", "hybrid_engine", "data_efficiency", "dataloader_drop_last", "log_level",
    "weight_quantization", "timers", "tensor_parallel", "expert_parallel", "use_data_before_expert_parallelism",
    "vocabulary_size", "compile",
})


def _check_ds_keys(ds: dict[str, Any], ds_name: str) -> None:
    """Unknown top-level keys (an allow-list) and the ZeRO / fp16 / bf16 sections (DeepSpeed's own
    pydantic models, which forbid unknown fields) are errors here, before DeepSpeed starts."""
    import difflib

    for key in ds:
        if key not in _DS_TOP_LEVEL_KEYS:
            close = difflib.get_close_matches(key, sorted(_DS_TOP_LEVEL_KEYS), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ValueError(f"{ds_name} has unknown key '{key}'{hint}: DeepSpeed would ignore it silently; "
                             "fix or remove it.")
    from pydantic import ValidationError

    from deepspeed.runtime.precision_config import get_bfloat16_config, get_float16_config
    from deepspeed.runtime.zero.config import get_zero_config

    for section, parse in (("zero_optimization", get_zero_config), ("fp16", get_float16_config),
                           ("bf16", get_bfloat16_config)):
        try:
            parse(ds)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ()))
            raise ValueError(f"{ds_name}: '{section}.{where}': {err.get('msg')}: fix or remove it.") from None


def resolve_ds_config(cfg: RunConfig, ds_raw: dict[str, Any], world_size: int, on_gpu: bool,
                      ds_name: str = "the DeepSpeed config") -> dict[str, Any]:
    """The DeepSpeed dict the engine gets: the user's engine settings, checked, plus the optimizer
    and clipping written from the run config (their single home)."""
    ds = json.loads(json.dumps(ds_raw))
    for key, home in _DS_OWNED_BY_RUN_CONFIG.items():
        if key in ds:
            raise ValueError(
                f"{ds_name} sets '{key}', which belongs to the run config ({home}) so that the dense and "
                f"the value-table schedules come from one place: remove '{key}' from {ds_name}."
            )
    _check_ds_keys(ds, ds_name)
    # -- batch sizes: train_batch_size = micro x accumulation x world
    micro = ds.get("train_micro_batch_size_per_gpu")
    gas = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    for name, v in (("train_micro_batch_size_per_gpu", micro), ("gradient_accumulation_steps", gas),
                    ("train_batch_size", total)):
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v <= 0):
            raise ValueError(f"{ds_name}: {name} must be a positive integer, got {v!r}.")
    if micro is None and total is None:
        raise ValueError(f"{ds_name} sets neither train_micro_batch_size_per_gpu nor train_batch_size: "
                         "set train_micro_batch_size_per_gpu (sequences per rank per forward).")
    if micro is None:
        gas = gas or 1
        if total % (gas * world_size):
            raise ValueError(
                f"{ds_name}: train_batch_size {total} is not divisible by gradient_accumulation_steps ({gas}) x "
                f"world size ({world_size}): set train_micro_batch_size_per_gpu instead, or make "
                f"train_batch_size a multiple of {gas * world_size}.")
        micro = total // (gas * world_size)
    if gas is None:
        if total is not None:
            if total % (micro * world_size):
                raise ValueError(
                    f"{ds_name}: train_batch_size {total} is not a multiple of train_micro_batch_size_per_gpu "
                    f"({micro}) x world size ({world_size}) = {micro * world_size}: change train_batch_size to a "
                    f"multiple of {micro * world_size}, or set gradient_accumulation_steps.")
            gas = total // (micro * world_size)
        else:
            gas = 1
    expected = micro * gas * world_size
    if total is not None and total != expected:
        raise ValueError(
            f"{ds_name}: train_batch_size ({total}) must equal train_micro_batch_size_per_gpu ({micro}) x "
            f"gradient_accumulation_steps ({gas}) x world size ({world_size}) = {expected}: set "
            f"train_batch_size to {expected}, or drop it (it is derived), or change the micro-batch or the "
            f"accumulation steps so that the product is {total}.")
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["train_batch_size"] = expected
    # -- precision
    fp16 = bool((ds.get("fp16") or {}).get("enabled", False))
    bf16 = bool((ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled", False))
    if fp16 and bf16:
        raise ValueError(f"{ds_name} enables both fp16 and bf16: enable one of them (or neither for fp32).")
    if fp16 and not on_gpu:
        raise ValueError(
            f"{ds_name} enables fp16, which DeepSpeed does not support on CPU: use bf16 or fp32 "
            "(e.g. ds_configs/tiny_zero2_bf16.json or ds_configs/tiny_zero2_fp32.json).")
    z = ds.get("zero_optimization") or {}
    stage = z.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{ds_name}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}.")
    # -- dense optimizer and clipping, from the run config
    o = cfg.optim
    offload = _offload_device(ds)
    use_torch_adam = o.dense_impl == "torch" or (o.dense_impl == "auto" and offload is None)
    if o.fused and not use_torch_adam:
        raise ValueError(
            f"optim.fused=true asks for torch's fused AdamW, but {ds_name} uses DeepSpeed's own optimizer "
            "(optimizer offload or optim.dense_impl=deepspeed): drop optim.fused or use dense_impl auto/torch "
            "without offload.")
    if o.dense_impl == "torch" and offload is not None:
        raise ValueError(
            f"{ds_name} offloads the optimizer to {offload}, which needs DeepSpeed's CPU Adam: set "
            "optim.dense_impl to auto or deepspeed.")
    params: dict[str, Any] = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if use_torch_adam:
        params["torch_adam"] = True
        if o.fused if o.fused is not None else on_gpu:
            params["fused"] = True  # DeepSpeed passes it on to torch.optim.AdamW: one kernel per step
    ds["optimizer"] = {"type": "AdamW", "params": params}
    if o.grad_clip > 0:
        ds["gradient_clipping"] = o.grad_clip
    ds.setdefault("steps_per_print", 10**9)  # our logger reports progress
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _dist_env() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return world, rank, local


def _model_config(cfg: RunConfig, vocab_size: int | None, max_seq_len: int, world_size: int):
    from pkm.configuration import BertPkmConfig
    from pkm.presets import PRESETS, preset_config

    overrides = dict(cfg.model.overrides)
    known = set(BertPkmConfig().to_dict())
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ValueError(
            f"model.overrides has unknown key '{unknown[0]}': it must be a BertPkmConfig field "
            "(e.g. hidden_size, num_hidden_layers; the memory goes in model.memory).")
    if cfg.model.init_from:
        from pkm.init_from_bert import bert_pkm_config_from_bert  # reads only config.json

        mc = bert_pkm_config_from_bert(cfg.model.init_from, cfg.model.memory, **overrides)
        if vocab_size is not None and mc.vocab_size != vocab_size and "vocab_size" not in overrides:
            raise ValueError(
                f"model.init_from '{cfg.model.init_from}' has vocab_size {mc.vocab_size} but the data's tokenizer "
                f"has {vocab_size}: prepare the shards with that model's tokenizer (python -m data_prep prepare "
                f"--tokenizer {cfg.model.init_from} ...).")
    else:
        if cfg.model.preset not in PRESETS:
            raise ValueError(f"model.preset '{cfg.model.preset}' is unknown: choose one of {sorted(PRESETS)}.")
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size  # the model speaks the data's tokenizer
        if "max_position_embeddings" not in overrides:
            overrides["max_position_embeddings"] = max(PRESETS[cfg.model.preset].get("max_position_embeddings", 512),
                                                       max_seq_len)
        mc = preset_config(cfg.model.preset, memory=cfg.model.memory, **overrides)
    if vocab_size is not None and mc.vocab_size < vocab_size:
        raise ValueError(f"the model's vocab_size ({mc.vocab_size}) is smaller than the tokenizer's ({vocab_size}): "
                         "remove vocab_size from model.overrides.")
    if max_seq_len > mc.max_position_embeddings:
        raise ValueError(f"data.max_seq_len ({max_seq_len}) exceeds the model's max_position_embeddings "
                         f"({mc.max_position_embeddings}): lower data.max_seq_len.")
    if mc.memory_layers and mc.hidden_size < world_size:
        raise ValueError(f"the value tables (dim {mc.hidden_size}) cannot be split over {world_size} ranks: "
                         "use fewer ranks or a larger model.")
    return mc


def _check_shards(cfg: RunConfig, tokenizer_vocab: int | None, model_vocab: int) -> None:
    """Shard headers, sizes and token ids (and checksums with data.verify_checksums), before the
    model is built: a corrupt shard would otherwise fail mid-run, after DeepSpeed started. Once a
    process group is up, one rank per view of the folder scans (``check_shards_once``)."""
    from pretrain.data import check_shards_once

    d = cfg.data
    limit = model_vocab if tokenizer_vocab is None else min(tokenizer_vocab, model_vocab)
    check_shards_once(d.shard_dir, [d.train_split, d.val_split], limit, verify_checksums=d.verify_checksums)


def _check_init_weights(init_from: str) -> None:
    """An init_from folder needs weights beside its config.json (found now, not after DeepSpeed starts)."""
    names = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    found = [n for n in names if os.path.isfile(os.path.join(init_from, n))]
    if not found:
        raise ValueError(f"model.init_from '{init_from}' has a config.json but no weights ({', '.join(names)}): "
                         "put the model's weights there, or drop init_from to train from scratch.")
    if found[0].endswith(".index.json"):
        with open(os.path.join(init_from, found[0]), encoding="utf-8") as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        missing = [n for n in shards if not os.path.isfile(os.path.join(init_from, n))]
        if missing or not shards:
            raise ValueError(f"model.init_from '{init_from}': {found[0]} lists weight files that are missing "
                             f"({', '.join(missing[:3]) or 'none listed'}): copy the complete model folder.")


# BertPkmConfig keys that describe the saving library, not the model
_CONFIG_KEYS_NOT_COMPARED = {"transformers_version", "architectures", "torch_dtype", "dtype", "name_or_path"}


def _check_resume_matches(ckpt_dir: str, cfg: RunConfig, model_config: Any) -> None:
    """The checkpoint must continue this very model on this very data: compare its model config, its
    data fingerprint (shard checksums) and its data position (sample count and seed) with the run's,
    before DeepSpeed starts and before the run folder's run_config.json is rewritten."""
    from pkm.configuration import BertPkmConfig
    from pretrain.checkpoint import load_train_state_file
    from pretrain.data import MLMDataset

    model_dir = os.path.join(ckpt_dir, "model")
    if os.path.isfile(os.path.join(model_dir, "config.json")):
        saved = BertPkmConfig.from_pretrained(model_dir).to_dict()
        now = model_config.to_dict()
        differ = [k for k in sorted(set(saved) | set(now)) if not k.startswith("_")
                  and k not in _CONFIG_KEYS_NOT_COMPARED and saved.get(k) != now.get(k)]
        if differ:
            shown = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}" for k in differ[:4])
            raise ValueError(f"the checkpoint to resume ({ckpt_dir}) holds another model ({shown}): resume with the "
                             "run's model settings (its run_config.json), or start a new run in another train.out_dir.")
    d = cfg.data
    data_file = os.path.join(ckpt_dir, "data.json")  # checkpoints written before it existed lack it
    if os.path.isfile(data_file):
        from pretrain.data import data_fingerprint

        with open(data_file, encoding="utf-8") as f:
            saved_data = json.load(f)
        if saved_data.get("train_fingerprint") != data_fingerprint(d.shard_dir, d.train_split):
            raise ValueError(
                f"the checkpoint to resume ({ckpt_dir}) was trained on other data: the shards of split "
                f"'{d.train_split}' in '{d.shard_dir}' (their checksums, or the tokenizer) differ from the ones it was "
                "trained on. Resume with the run's data.shard_dir, or start a new run in another train.out_dir.")
    sampler = load_train_state_file(os.path.join(ckpt_dir, "train_state", "rank_00000.pt")).get("sampler", {})
    num_samples = len(MLMDataset(d.shard_dir, split=d.train_split, max_seq_len=d.max_seq_len, packing=d.packing,
                                 mask_prob=d.mlm_probability, whole_word_masking=d.whole_word_masking,
                                 seed=cfg.train.seed))
    if sampler and (sampler.get("num_samples") != num_samples or sampler.get("seed") != cfg.train.seed):
        raise ValueError(
            f"the checkpoint to resume ({ckpt_dir}) was trained on other data or with another seed "
            f"({sampler.get('num_samples')} samples, seed {sampler.get('seed')}; now {num_samples}, {cfg.train.seed}): "
            "resume with the same data.shard_dir, data.max_seq_len, data.packing and train.seed.")


def _checkpoint_to_resume(t: Any, world_size: int, rank: int) -> str | None:
    """The checkpoint folder this run continues from (None: a new run), checked to be intact and
    written by as many ranks. ``train.resume_from`` names one; ``train.resume`` takes the newest
    intact one in out_dir, skipping damaged ones with a warning."""
    from pretrain.checkpoint import (checkpoint_problems, checkpoint_root, latest_checkpoint, list_checkpoints,
                                     read_meta)

    root = checkpoint_root(t.out_dir)
    found = list_checkpoints(root)
    if t.resume_from:
        chosen = t.resume_from
        if not os.path.isfile(os.path.join(chosen, "meta.json")):
            raise ValueError(f"train.resume_from '{chosen}' is not a checkpoint folder (a checkpoints/step_N folder "
                             "with meta.json): fix the path.")
        problems = checkpoint_problems(chosen)
        if problems:
            raise ValueError(f"train.resume_from '{chosen}' is damaged ({'; '.join(problems[:3])}): choose another "
                             f"checkpoints/step_N folder.")
        step = read_meta(chosen)["step"]
        newer = [p for s, p in found if s > step and os.path.realpath(p) != os.path.realpath(chosen)
                 and not checkpoint_problems(p)]
        if newer:
            raise ValueError(f"train.resume_from '{chosen}' is at step {step} but '{root}' holds the newer "
                             f"checkpoint(s) {', '.join(os.path.basename(p) for p in newer)}, which the resumed run "
                             "would be mixed up with: move them out of that folder, or set train.out_dir to a new folder.")
    elif not t.resume:
        if found:
            raise ValueError(f"train.out_dir '{t.out_dir}' already holds checkpoints (latest: {found[-1][1]}): pass "
                             "--resume to continue that run, or choose another train.out_dir.")
        return None
    else:
        warn = (lambda msg: print(f"warning: {msg}", file=sys.stderr)) if rank == 0 else None
        chosen = latest_checkpoint(t.out_dir, warn=warn) if os.path.isdir(t.out_dir) else None
        if chosen is None and found:
            raise ValueError(f"train.resume is set but all {len(found)} checkpoint(s) in '{root}' are damaged (see the "
                             "warnings): start a new run in another train.out_dir.")
        if chosen is None:
            raise ValueError(f"train.resume is set but '{root}' holds no complete checkpoint: "
                             "drop --resume to start a new run, or fix train.out_dir.")
    saved_world = read_meta(chosen).get("world_size")
    if saved_world != world_size:
        raise ValueError(
            f"the checkpoint to resume ({chosen}) was written by {saved_world} ranks but this run has "
            f"{world_size}: DeepSpeed's ZeRO optimizer state is partitioned per rank, so resume with "
            f"{saved_world} ranks (the value shards alone could be re-cut, the dense optimizer state cannot).")
    return chosen


def prepare_run(config_path: str | None, ds_path: str | None, run_overrides: list[tuple[str, Any]],
                ds_overrides: list[tuple[str, Any]] | None = None, world_size: int | None = None,
                on_gpu: bool | None = None, check_data: bool = True) -> PreparedRun:
    """Load, merge and check everything; raises ValueError with what to fix. No expensive work.
    ``check_data=False`` leaves the shard scan to the caller (``pretrain.startup`` runs it once for
    all ranks of a multi-rank run)."""
    import torch

    env_world, rank, local_rank = _dist_env()
    world_size = env_world if world_size is None else world_size
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    data = read_config_file(config_path) if config_path else {}
    cfg = config_from_dict(apply_overrides(data, run_overrides))
    if not ds_path:
        raise ValueError("no DeepSpeed config given: pass --deepspeed_config ds_configs/<x>.json "
                         "(e.g. ds_configs/tiny_zero2_fp32.json on a CPU).")
    if not os.path.isfile(ds_path):
        raise ValueError(f"DeepSpeed config '{ds_path}' does not exist (the shipped ones are in ds_configs/).")
    try:
        with open(ds_path, encoding="utf-8") as f:
            ds_raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"DeepSpeed config '{ds_path}' is not valid JSON: {e}.") from e
    ds_raw = apply_overrides(ds_raw, ds_overrides or [])
    ds = resolve_ds_config(cfg, ds_raw, world_size, on_gpu, ds_name=f"'{ds_path}'")

    # -- data
    d = cfg.data
    if not d.shard_dir:
        raise ValueError("data.shard_dir is empty: set it to a folder written by `python -m data_prep prepare`.")
    if not os.path.isdir(d.shard_dir):
        raise ValueError(f"data.shard_dir '{d.shard_dir}' does not exist: run `python -m data_prep prepare ... "
                         f"--out {d.shard_dir}` first, or fix the path.")
    manifest_path = os.path.join(d.shard_dir, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise ValueError(f"data.shard_dir '{d.shard_dir}' has no manifest.json: data prep did not finish there; "
                         "re-run `python -m data_prep prepare` (it resumes).")
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    splits = manifest.get("splits", {})
    for split in (d.train_split, d.val_split):
        if split not in splits or not splits[split].get("num_docs"):
            raise ValueError(
                f"data.shard_dir '{d.shard_dir}' has no documents in split '{split}' (splits: "
                f"{ {k: v.get('num_docs') for k, v in splits.items()} }): prepare more data or raise "
                "--valid-fraction for a validation split.")
    vocab_size = int(manifest.get("tokenizer", {}).get("vocab_size", 0)) or None
    tok_dir = os.path.join(d.shard_dir, manifest.get("tokenizer_dir", "tokenizer"))
    if not os.path.isdir(tok_dir):
        tok_dir = None

    # -- model
    if cfg.model.init_from:
        if not os.path.isdir(cfg.model.init_from) or not os.path.isfile(os.path.join(cfg.model.init_from, "config.json")):
            raise ValueError(f"model.init_from '{cfg.model.init_from}' is not a Hugging Face model folder "
                             "(config.json + weights): fix the path or drop init_from to train from scratch.")
        _check_init_weights(cfg.model.init_from)
        if tok_dir is None:
            tok_dir = cfg.model.init_from
    model_config = _model_config(cfg, vocab_size, d.max_seq_len, world_size)
    if check_data:
        _check_shards(cfg, vocab_size, model_config.vocab_size)

    # -- output folder / resume
    t = cfg.train
    from pretrain.shared_storage import check_out_dir_on_a_volume

    check_out_dir_on_a_volume(t.out_dir)
    resume_from = _checkpoint_to_resume(t, world_size, rank)
    if resume_from:
        _check_resume_matches(resume_from, cfg, model_config)
    return PreparedRun(cfg, ds, model_config, tok_dir, world_size, rank, local_rank, resume_from)


# --------------------------------------------------------------------------------------------------
# The run (expensive part)
# --------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """`python -m pretrain.main`: a world of one, as the launcher would have described it."""
    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                           "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})


def build_model(prep: PreparedRun):
    """The model (same init on every rank: seeded), from a preset or a memory-less BERT, without
    value tables: ``build_engine`` hands each rank's memories their shards."""
    from pkm.modeling import BertPkmForMaskedLM
    from pretrain.trainer import seed_everything

    cfg = prep.cfg
    seed_everything(cfg.model.init_seed if cfg.model.init_seed is not None else cfg.train.seed)
    if cfg.model.init_from:
        from pkm.init_from_bert import init_from_pretrained_bert

        model, report = init_from_pretrained_bert(cfg.model.init_from, config=prep.model_config, external_values=True)
        summary = f"init_from {cfg.model.init_from}: {len(report.loaded)} tensors loaded, {len(report.added)} new"
    else:
        model = BertPkmForMaskedLM(prep.model_config, external_values=True)
        summary = f"preset {cfg.model.preset} from scratch"
    model.set_attn_implementation(cfg.model.attn_implementation)
    model.train()
    return model, summary


def run(prep: PreparedRun):
    """Initialise distributed + DeepSpeed, build everything, train. Returns the TrainResult."""
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from atomic_files import write_json_atomic
    from pretrain.data import TrainStream
    from pretrain.distributed import init_distributed
    from pretrain.engine import build_engine, value_table_group
    from pretrain.evaluate import ValidationData
    from pretrain.logging_utils import get_logger
    from pretrain.trainer import Trainer, seed_everything

    cfg, ds = prep.cfg, prep.ds_config
    logger = get_logger(prep.rank)
    if cfg.train.deterministic:
        # CPU runs are reproducible with a fixed thread count already; CUDA needs deterministic
        # kernels (and a fixed cuBLAS workspace) for a resumed run to match bit for bit.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if not dist.is_initialized():  # pretrain.startup starts it first in a multi-rank run
        init_distributed(timeout_s=cfg.train.collective_timeout_s)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == prep.world_size, (world, prep.world_size)
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(prep.local_rank)
    elif "OMP_NUM_THREADS" not in os.environ:
        # The launcher starts LOCAL_SIZE ranks that would each use every core (oversubscription is
        # several times slower on small machines): share the cores unless the user chose a count.
        local_size = int(os.environ.get("LOCAL_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    device = torch.device(accel.current_device_name())
    if rank == 0:
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        save_config(cfg, os.path.join(cfg.train.out_dir, "run_config.json"))
        write_json_atomic(os.path.join(cfg.train.out_dir, "ds_config.json"), ds)

    model, summary = build_model(prep)
    logger.info(f"model: {summary}; {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M dense parameters "
                f"before sharding; world {world} ({accel.device_name()}, {dist.get_backend()})")
    # the tables' own communicator: made on every rank, in this order, before deepspeed.initialize
    engine, values = build_engine(model, cfg, ds, device, group=value_table_group())
    if values.tables:
        cap = next(iter(values.tables.values())).token_capacity
        exchange = f"a fixed {cap} tokens per rank" if cap else "their token counts first (doc packing)"
        logger.info(f"value tables: own process group of {dist.get_world_size(values.group)} ranks; lookups "
                    f"exchange {exchange}")
    for name, t in values.tables.items():
        logger.info(f"value table {name}: {t.num_rows} x {t.dim}, this rank holds columns "
                    f"[{t.col_start}, {t.col_end}) = {tuple(t.weight.shape)} "
                    f"({t.weight.numel() * t.weight.element_size() / 2**20:.2f} MiB)")
    seed_everything(cfg.train.seed + 1000 * rank)  # dropout streams differ across ranks
    micro = ds["train_micro_batch_size_per_gpu"]
    train_data = TrainStream.from_config(cfg, micro, rank, world, pin_memory=device.type == "cuda")
    val_data = ValidationData.from_config(cfg, micro, rank, world)
    trainer = Trainer(cfg, engine, values, train_data, val_data, tokenizer_dir=prep.tokenizer_dir)
    if prep.resume_from:
        trainer.resume(prep.resume_from)
    result = trainer.train()
    logger.info(f"done at step {result.step}" + (" (interrupted)" if result.interrupted else "")
                + (f"; last checkpoint {result.last_checkpoint}" if result.last_checkpoint else ""))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(_USAGE)
        print("Run-config keys and defaults:")
        print(json.dumps(config_to_dict(RunConfig()), indent=2))
        print("model.memory keys and defaults (null above: the preset's memory; N = n_keys^2 slots):")
        print(json.dumps(dataclasses.asdict(MemoryConfig()), indent=2))
        return 0
    import torch.distributed as dist

    from pretrain.startup import prepare_on_every_rank

    try:
        prep = prepare_on_every_rank(argv)  # one verdict for all ranks, shared out_dir, one resume step
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return 2
    _single_process_env()

    from pretrain.trainer import TrainingDiverged

    try:
        run(prep)
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # gloo can abort a rank whose peer tears the group down under it
    except TrainingDiverged as e:  # every rank raises it at the same step (the streak is all-reduced)
        print(f"error: {e}", file=sys.stderr)
        return 3
    except BaseException as e:  # noqa: BLE001  (any failure of one rank: see _exit_on_rank_failure)
        if prep.world_size > 1 and not isinstance(e, SystemExit):
            _exit_on_rank_failure(e, prep.rank)
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


def _exit_on_rank_failure(error: BaseException, rank: int) -> None:
    """One rank failed (an OOM, a bad batch, a bug): report it and end this process now, exit 1.

    Unwinding normally could hang: ``destroy_process_group`` and the interpreter's exit wait for
    collectives the other ranks will never finish. Exiting ends them too: the launcher on this node
    (``deepspeed.launcher.launch``) sees a non-zero exit and terminates its other ranks, and ranks on
    other nodes fail in their next collective, at the latest after ``train.collective_timeout_s``.
    DataLoader workers die with this process (``pretrain.data``)."""
    import traceback

    print(f"error: rank {rank} failed, ending every rank ({type(error).__name__}: {error})", file=sys.stderr)
    traceback.print_exception(error, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# --------------------------------------------------------------------------------------------------
# Python API for scripts and the demo
# --------------------------------------------------------------------------------------------------


def launch(config: str | RunConfig | dict[str, Any], ds_config: str, num_procs: int = 1,
           overrides: list[str] | None = None, env: dict[str, str] | None = None,
           master_port: int | None = None, log_file: str | None = None, check: bool = True) -> int:
    """Run pretraining in child processes under the ``deepspeed`` launcher (``num_procs`` ranks on
    this machine) and wait. ``config``: a run-config path, a RunConfig or a dict (written to a temp
    file). ``overrides``: extra CLI strings such as ``["--train.max_steps=50"]``. Returns the exit
    code (raises RuntimeError when ``check`` and it is non-zero). Validation runs first, in-process,
    so config mistakes raise ValueError here instead of in the ranks."""
    import tempfile

    overrides = list(overrides or [])
    tmp_config = None
    if isinstance(config, (RunConfig, dict)):
        data = config_to_dict(config) if isinstance(config, RunConfig) else config
        fd, tmp_config = tempfile.mkstemp(prefix="run_config_", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
        config = tmp_config
    try:
        parsed = parse_cli(["--config", config, "--deepspeed_config", ds_config, *overrides])
        prepare_run(*parsed, world_size=num_procs)  # fail fast, with the same messages as the ranks
        deepspeed_bin = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        cmd = [deepspeed_bin, "--num_gpus", str(num_procs), "--master_port", str(master_port or _free_port()),
               "--module", "pretrain.main", "--config", config, "--deepspeed_config", ds_config,
               *overrides]
        child_env = {**os.environ, **(env or {})}
        child_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + child_env.get("PYTHONPATH", "")
        # SIGTERM/SIGINT: the ranks save first. Its own session: a signal to the caller's process
        # group reaches the launcher's processes only through the forwarding (launch_signals.py).
        from pretrain.launch_signals import wait_passing_on_sigterm

        if log_file:
            with open(log_file, "w", encoding="utf-8") as f:
                rc = wait_passing_on_sigterm(subprocess.Popen(cmd, env=child_env, stdout=f, stderr=subprocess.STDOUT,
                                                              cwd=REPO_ROOT, start_new_session=True))
        else:
            rc = wait_passing_on_sigterm(subprocess.Popen(cmd, env=child_env, cwd=REPO_ROOT, start_new_session=True))
    finally:
        if tmp_config is not None:
            os.remove(tmp_config)
    if check and rc != 0:
        raise RuntimeError(f"pretraining exited with code {rc}" + (f"; see {log_file}" if log_file else ""))
    return rc

