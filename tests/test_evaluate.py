"""pretrain.evaluate: the validation split per rank, evaluate_mlm against a hand computation, mlm_hits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pkm.modeling import BertPkmForMaskedLM
from pkm.presets import preset_config
from pretrain.evaluate import ValidationData, _perplexity, evaluate_mlm, mlm_hits
from tests.test_gpu_settings import _tiny_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return _tiny_shards(tmp_path_factory.mktemp("eval"))


def _val(shards: str, rank: int, world: int, micro: int = 2) -> ValidationData:
    return ValidationData(shards, "validation", 24, "full", 0.3, False, 5, micro, rank, world)


def _model() -> BertPkmForMaskedLM:
    torch.manual_seed(0)
    return BertPkmForMaskedLM(preset_config("tiny", vocab_size=30522)).eval()


def test_ranks_share_the_split_with_fixed_masks(shards):
    one = _val(shards, 0, 1, micro=1)
    everything = [b["input_ids"] for b in one.batches(one.num_batches())]
    per_rank = [[b["input_ids"] for b in _val(shards, r, 2, micro=1).batches(10**6)] for r in range(2)]
    # global position g goes to rank g % 2: the ranks interleave and cover the split once
    rows = lambda batches: sorted(tuple(row) for b in batches for row in b.tolist())  # noqa: E731 (micro 1: no padding)
    assert rows(per_rank[0] + per_rank[1]) == rows(everything) and len(per_rank[0]) >= len(per_rank[1]) > 0
    a = [b["labels"] for b in _val(shards, 1, 2, micro=1).batches(2)]
    b = [b["labels"] for b in _val(shards, 1, 2, micro=1).batches(2)]
    assert len(a) == len(b) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))  # the same masks every time
    assert _val(shards, 0, 1).num_batches(cap=1) == 1


def test_evaluate_mlm_is_the_token_weighted_cross_entropy(shards):
    model, data = _model(), _val(shards, 0, 1)
    metrics, _ = evaluate_mlm(model, data, 3, torch.device("cpu"), [])
    nll = correct = masked = 0.0
    with torch.no_grad():
        for batch in data.batches(data.num_batches(3)):
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}, masked_logits_only=False).logits
            sel = batch["labels"] != -100
            nll += torch.nn.functional.cross_entropy(logits[sel], batch["labels"][sel], reduction="sum").item()
            correct += (logits[sel].argmax(-1) == batch["labels"][sel]).sum().item()
            masked += sel.sum().item()
    assert masked > 0
    assert metrics["loss"] == pytest.approx(nll / masked, rel=1e-5)
    assert metrics["mlm_acc"] == pytest.approx(correct / masked)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / masked), rel=1e-5)
    assert not model.training  # it was in eval mode before: left so


def test_mlm_hits_agree_between_full_and_masked_logits():
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(np.where(rng.random((3, 7)) < 0.4, rng.integers(0, 11, (3, 7)), -100))
    full = torch.randn(3, 7, 11)
    sel = labels != -100
    masked_positions = torch.nonzero(sel.reshape(-1)).squeeze(1)
    expected = int((full[sel].argmax(-1) == labels[sel]).sum())
    for logits, positions in ((full, None), (full[sel], None), (full[sel], masked_positions)):
        correct, n = mlm_hits(logits, labels, positions)
        assert int(correct) == expected and int(n) == int(sel.sum())


def test_perplexity_is_capped_but_keeps_nan():
    assert _perplexity(1.0) == pytest.approx(math.e)
    assert _perplexity(1e4) == pytest.approx(math.exp(50))
    assert math.isnan(_perplexity(float("nan"))) and _perplexity(float("inf")) == float("inf")
