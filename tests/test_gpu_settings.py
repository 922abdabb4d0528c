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
    # overlap_comm makes ZeRO-2 synchronise the device at every gradient bucket: off on one GPU.
    # On one GPU there is nothing to partition: ZeRO-1 without contiguous_gradients registers no
    # per-parameter gradient hooks (ZeRO-2's cost ~60 us of host time per parameter per step; see
    # BENCHMARKS.md, "Host time of the DeepSpeed step"), and trains bitwise as ZeRO-2 does there.
    zero = ds["zero_optimization"]
    assert zero["overlap_comm"] is False and zero["stage"] == 1 and zero["contiguous_gradients"] is False
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


_SAME_STEPS_SCRIPT = r"""
import json, sys
import torch
from benchmarks import train_step as tsb

torch.set_num_threads(1)
args = tsb.parse_args(["--models", "small", "--hidden", "64", "--layers", "2", "--vocab", "512", "--seq", "16"])
shape = tsb.model_shape("small", args)
device = torch.device("cpu")
tsb._init_process_group(device)
memory = {"mem_n_keys": 16, "mem_heads": 2, "mem_knn": 8}
params = []
for path in sys.argv[1:]:
    built = tsb.build_ours(shape, True, memory, device, "bf16", 2, False, path)
    built.set_batches(tsb.synthetic_batches(shape.vocab, 2, shape.seq, 3, False))
    before = [p.detach().float().clone() for p in built.module.parameters()]
    for _ in range(3):
        built.step()
    after = [p.detach().float() for p in built.module.parameters()]
    params.append((before, after))
    built.close()
(b0, a0), (b1, a1) = params
print(json.dumps({"moved": sum(not torch.equal(x, y) for x, y in zip(b0, a0)), "count": len(a0),
                  "equal": sum(torch.equal(x, y) for x, y in zip(a0, a1))}))
"""


def test_one_gpu_config_trains_as_its_zero2_form(tmp_path):
    """The one-GPU config (ZeRO-1, no gradient hooks) against the same config as ZeRO-2 with
    contiguous gradients, on one rank (CPU, bf16, a small BERT with a memory, 3 steps): every dense
    parameter bitwise the same, and the steps did move them."""
    import subprocess
    import sys

    with open(os.path.join(REPO, "ds_configs", "h200_bert_large_bf16.json")) as f:
        one_gpu = json.load(f)
    zero2 = json.loads(json.dumps(one_gpu))
    zero2["zero_optimization"].update(stage=2, contiguous_gradients=True)
    paths = []
    for name, ds in (("one_gpu", one_gpu), ("zero2", zero2)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as f:
            json.dump(ds, f)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "DS_ACCELERATOR": "cpu",
           "PYTHONPATH": REPO}
    p = subprocess.run([sys.executable, "-c", _SAME_STEPS_SCRIPT, *paths], cwd=REPO, capture_output=True,
                       text=True, timeout=300, env=env)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    result = json.loads(p.stdout.strip().splitlines()[-1])
    assert result["moved"] > result["count"] // 2
    assert result["equal"] == result["count"]
