"""Training checkpoint (any ZeRO stage, any world size) -> one Hugging Face folder.

    python -m pretrain.convert CKPT OUT [--dtype float32|bfloat16|float16]

CKPT is a checkpoint folder (``<out_dir>/checkpoints/step_N``), a ``checkpoints/`` folder or a run's
out_dir (its latest complete checkpoint is taken). OUT receives ``config.json`` (BertPkmConfig),
``model.safetensors`` and the tokenizer files, and loads with
``BertPkmForMaskedLM.from_pretrained(OUT)`` / ``AutoModelForMaskedLM`` (after ``import pkm``)
and, for finetuning, ``BertPkmForSequenceClassification`` / ``...ForQuestionAnswering``.

Dense weights come from DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (the fp32 master
copy, gathered from every rank's partition; stages 1-3) or the module states (stage 0); the value
tables are put together from every rank's column shard (``pkm.checkpoint_values.load_full_values``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import torch

if __name__ == "__main__":  # `python pretrain/convert.py ...` or `python -m pretrain.convert ...`
    try:
        from pretrain.entry import run_installed_module
    except ModuleNotFoundError as missing:
        if missing.name != "pretrain":
            raise
        sys.exit("error: the pretrain package is not installed in this Python: run ./run.sh setup "
                 "(or pip install -e . in the repository) first")
    run_installed_module("pretrain.convert", __file__)  # runs pretrain.convert.main() and exits

from pretrain.checkpoint import (  # noqa: E402
    DS_TAG,
    checkpoint_problems,
    copy_tokenizer_files,
    latest_checkpoint,
    load_full_value_tables,
    read_meta,
)
from pretrain.safe_load import deepspeed_files_loaded_safely  # noqa: E402

__all__ = ["convert_checkpoint", "load_dense_state_dict", "main"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_dense_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """The engine module's full fp32 state dict (parameters and buffers) from a checkpoint."""
    meta = read_meta(ckpt_dir)
    ds_dir = os.path.join(ckpt_dir, "ds")
    tag = meta.get("ds_tag", DS_TAG)
    if int(meta.get("zero_stage", 0)) >= 1:
        import logging

        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        with deepspeed_files_loaded_safely(ds_dir):  # zero_to_fp32 unpickles with weights_only=False itself
            sd = get_fp32_state_dict_from_zero_checkpoint(ds_dir, tag=tag)
    else:
        path = os.path.join(ds_dir, tag, "mp_rank_00_model_states.pt")
        with deepspeed_files_loaded_safely(path):
            sd = torch.load(path, map_location="cpu", weights_only=True)["module"]
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def convert_checkpoint(ckpt: str, out_dir: str, dtype: str = "float32") -> str:
    """Write the HF folder; returns ``out_dir``. Raises ValueError for a missing/incomplete checkpoint."""
    from pkm.configuration import BertPkmConfig
    from pkm.modeling import BertPkmForMaskedLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}.")
    if not os.path.exists(ckpt):
        raise ValueError(f"checkpoint path '{ckpt}' does not exist.")
    ckpt_dir = latest_checkpoint(ckpt, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr))
    if ckpt_dir is None:
        raise ValueError(f"'{ckpt}' holds no complete checkpoint (a folder with meta.json).")
    problems = checkpoint_problems(ckpt_dir)
    if problems:
        raise ValueError(f"checkpoint '{ckpt_dir}' is damaged: {'; '.join(problems[:5])}. Convert an older one "
                         "(checkpoints/step_N) or the run folder (its newest intact checkpoint is taken).")
    model_dir = os.path.join(ckpt_dir, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"checkpoint '{ckpt_dir}' has no model/config.json: it was not written by pretrain.")
    config = BertPkmConfig.from_pretrained(model_dir)

    state = load_dense_state_dict(ckpt_dir)
    for module_path, weight in load_full_value_tables(os.path.join(ckpt_dir, "values")).items():
        state[f"{module_path}.values.weight"] = weight

    model = BertPkmForMaskedLM(config)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    missing = [k for k in missing if k not in tied]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ValueError(f"checkpoint '{ckpt_dir}' does not match its model config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}.")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"'{k}' is {tuple(v.shape)} in the checkpoint but {tuple(expected[k].shape)} in the model.")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.to(_DTYPES[dtype])
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    copy_tokenizer_files(model_dir, out_dir)
    meta = read_meta(ckpt_dir)
    with open(os.path.join(out_dir, "pretrain_info.json"), "w", encoding="utf-8") as f:
        json.dump({"checkpoint": os.path.abspath(ckpt_dir), "step": meta["step"], "tokens_seen": meta.get("tokens_seen"),
                   "world_size": meta["world_size"], "zero_stage": meta["zero_stage"], "dtype": dtype}, f, indent=2)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pretrain.convert",
                                description="Convert a pretraining checkpoint into a Hugging Face model folder.")
    p.add_argument("ckpt", help="checkpoint folder (checkpoints/step_N), a checkpoints/ folder, or a run out_dir (latest)")
    p.add_argument("out", help="output folder (config.json, model.safetensors, tokenizer files)")
    p.add_argument("--dtype", default="float32", choices=sorted(_DTYPES), help="weights dtype (default float32)")
    args = p.parse_args(argv)
    try:
        out = convert_checkpoint(args.ckpt, args.out, args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0

