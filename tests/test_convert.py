"""Checkpoint -> Hugging Face folder: from_pretrained gives the live model's MLM logits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.test_pretrain import REPO, cached_run, run_root, shards  # noqa: F401  (session fixtures)


def test_convert_zero3_two_ranks_matches_live_logits(shards, run_root, tmp_path):  # noqa: F811
    import pkm.modeling  # noqa: F401  registers bert_pkm with the Auto classes
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    run = cached_run("zero3", run_root, shards)
    out = str(tmp_path / "hf")
    p = subprocess.run([sys.executable, "-m", "pretrain.convert", run["out"], out], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        assert os.path.isfile(os.path.join(out, name)), name
    model = AutoModelForMaskedLM.from_pretrained(out).eval()
    assert type(model).__name__ == "BertPkmForMaskedLM"
    table = model.bert.encoder.layer[1].memory.values.weight
    assert tuple(table.shape) == (256, 64)  # both ranks' column shards put back together
    live = torch.load(os.path.join(run["out"], "debug_logits.pt"), weights_only=False)
    with torch.no_grad():
        logits = model(**live["inputs"], masked_logits_only=False).logits
    torch.testing.assert_close(logits, live["logits"], rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).vocab_size == model.config.vocab_size


def test_convert_refuses_a_folder_without_checkpoint(tmp_path):
    from pretrain.convert import convert_checkpoint

    with pytest.raises(ValueError, match="holds no complete checkpoint"):
        convert_checkpoint(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="does not exist"):
        convert_checkpoint(str(tmp_path / "missing"), str(tmp_path / "out"))
