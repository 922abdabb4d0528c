"""Checkpoint -> Hugging Face folder: from_pretrained scores the validation split as the live run did."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_pretrain import REPO, cached_run, run_root, shards  # noqa: F401  (session fixtures)


def _validation_loss(model, run_out: str, world_size: int) -> tuple[float, float]:
    """MLM loss and accuracy of ``model`` on the validation batches each rank of the run evaluated
    (pretrain.evaluate, one rank at a time in this process, combined as its all-reduce does)."""
    from pretrain.config import load_config
    from pretrain.evaluate import ValidationData, evaluate_mlm

    cfg = load_config(os.path.join(run_out, "run_config.json"))
    with open(os.path.join(run_out, "ds_config.json")) as f:
        micro = json.load(f)["train_micro_batch_size_per_gpu"]
    d = cfg.data
    loss_sum = correct = masked = 0.0
    for rank in range(world_size):
        data = ValidationData(d.shard_dir, d.val_split, d.max_seq_len, d.packing, d.mlm_probability,
                              d.whole_word_masking, cfg.train.seed, micro, rank, world_size)
        n = data.num_batches(cfg.train.eval_batches)
        m = sum(int((b["labels"] != -100).sum()) for b in data.batches(n))
        metrics, _ = evaluate_mlm(model, data, cfg.train.eval_batches, torch.device("cpu"), [])
        loss_sum, correct, masked = loss_sum + metrics["loss"] * m, correct + metrics["mlm_acc"] * m, masked + m
    return loss_sum / masked, correct / masked


def test_convert_zero3_two_ranks_matches_the_live_evaluation(shards, run_root, tmp_path):  # noqa: F811
    import pkm  # noqa: F401  registers bert_pkm with the Auto classes
    from pretrain.logging_utils import read_jsonl
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run = cached_run("zero3", run_root, shards)
    out = str(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "pretrain.convert", run["out"], out], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
                 "configuration_bert_pkm.py", "modeling_bert_pkm.py"):
        assert os.path.isfile(os.path.join(out, name)), name
    with open(os.path.join(out, "config.json")) as f:  # loads without pkm (tests/test_remote_code.py)
        assert json.load(f)["auto_map"]["AutoModelForMaskedLM"] == "modeling_bert_pkm.BertPkmForMaskedLM"
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(model).__name__ == "BertPkmForMaskedLM"
    table = model.bert.encoder.layer[1].memory.values.weight
    assert tuple(table.shape) == (256, 64)  # both ranks' column shards put back together
    # the run's last evaluation (after step 12, the checkpoint's weights) against the converted model
    live = read_jsonl(os.path.join(run["out"], "metrics.jsonl"), "eval")[-1]
    assert live["step"] == 12
    loss, acc = _validation_loss(model, run["out"], world_size=2)
    assert loss == pytest.approx(live["loss"], rel=1e-5)
    assert acc == pytest.approx(live["mlm_acc"], abs=1e-9)
    assert AutoTokenizer.from_pretrained(out).vocab_size == model.config.vocab_size


def test_convert_refuses_a_folder_without_checkpoint(tmp_path):
    from pretrain.convert import convert_checkpoint

    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="does not exist"):
        convert_checkpoint(str(tmp_path / "missing"), str(tmp_path / "out"))
