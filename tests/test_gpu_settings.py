"""GPU-fast settings stay configurable and CPU runs keep their behaviour: fused AdamW, attention
implementation, peak TFLOP/s for MFU, pinned-memory loader, the H200 configs."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pretrain.config import load_config
from pretrain.main import PreparedRun, build_model, resolve_ds_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ds(**zero) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2, **zero}}


def test_fused_adamw_on_gpu_by_default_and_never_silently_on_cpu():
    cfg = load_config(None, [])
    assert resolve_ds_config(cfg, _ds(), 1, on_gpu=True)["optimizer"]["params"]["fused"] is True
    assert "fused" not in resolve_ds_config(cfg, _ds(), 1, on_gpu=False)["optimizer"]["params"]  # CPU runs as before
    off = load_config(None, [("optim.fused", False)])
    assert "fused" not in resolve_ds_config(off, _ds(), 1, on_gpu=True)["optimizer"]["params"]
    on = load_config(None, [("optim.fused", True)])
    assert resolve_ds_config(on, _ds(), 1, on_gpu=False)["optimizer"]["params"]["fused"] is True
    offload = _ds(offload_optimizer={"device": "cpu"})
    assert "fused" not in resolve_ds_config(cfg, offload, 1, on_gpu=True)["optimizer"]["params"]  # DeepSpeed's CPU Adam
    with pytest.raises(ValueError, match="optim.fused=true asks for torch's fused AdamW"):
        resolve_ds_config(on, offload, 1, on_gpu=True)


def test_bad_gpu_settings_are_named():
    with pytest.raises(ValueError, match="model.attn_implementation must be one of"):
        load_config(None, [("model.attn_implementation", "flash")])
    with pytest.raises(ValueError, match="train.peak_tflops must be a positive number"):
        load_config(None, [("train.peak_tflops", 0)])


def test_h200_configs_resolve_for_one_gpu():
    cfg = load_config(os.path.join(REPO, "configs", "bert-large-h200.json"))
    assert cfg.model.attn_implementation == "sdpa" and cfg.optim.fused is True and cfg.data.num_workers > 0
    with open(os.path.join(REPO, "ds_configs", "h200_bert_large_bf16.json")) as f:
        ds = resolve_ds_config(cfg, json.load(f), world_size=1, on_gpu=True)
    assert ds["train_batch_size"] == 256 and ds["bf16"]["enabled"] is True
    # overlap_comm makes ZeRO-2 synchronise the device at every gradient bucket: off on one GPU
    assert ds["zero_optimization"]["overlap_comm"] is False
    assert ds["optimizer"]["params"]["fused"] is True and ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_build_model_applies_the_attention_implementation(impl, tmp_path):
    from pkm.presets import preset_config

    cfg = load_config(None, [("model.attn_implementation", impl), ("model.preset", "tiny")])
    prep = PreparedRun(cfg, {}, preset_config("tiny"), None, 1, 0, 0, None)
    model, _ = build_model(prep)
    assert model.config._attn_implementation == impl


def test_train_stream_pins_memory_only_when_asked(tmp_path):
    from pretrain.data import TrainStream

    shards = _tiny_shards(tmp_path)
    stream = TrainStream(shards, "train", 16, "full", 0.15, False, 0, 2, 0, 1, pin_memory=False)
    batch = stream.next_batch()
    assert {"masked_positions", "token_positions"} <= set(batch)  # the sync-free index lists
    assert not batch["input_ids"].is_pinned()
    assert TrainStream(shards, "train", 16, "full", 0.15, False, 0, 2, 0, 1).pin_memory == torch.cuda.is_available()


def _tiny_shards(tmp_path) -> str:
    """A few documents of repeated words, with the MiniLM tokenizer (as tests/test_mlm_data.py)."""
    from data_prep import prepare
    from tests.test_mlm_data import MINILM, WORDS

    path = tmp_path / "corpus.jsonl"
    docs = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(12)]
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    prepare(path, tmp_path / "shards", tokenizer=MINILM, workers=0, valid_fraction=0.2, progress=False)
    return str(tmp_path / "shards")


def test_progress_line_shows_throughput():
    from pretrain.logging_utils import format_progress

    line = format_progress(10, 100, {"loss": 1.0, "tokens_per_s": 158_000.0, "samples_per_s": 1234.5, "mfu": 0.4512})
    assert "seq/s 1,234.5" in line and "mfu 45.12%" in line and "tok/s 158,000" in line
