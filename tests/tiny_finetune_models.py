"""Tiny models for tests and quick checks: a random BERT with a WordPiece vocab built from texts.

No download: the vocabulary is written from the given texts, so any fixture tokenizes into real
word pieces (not [UNK]), and the saved folder loads with the Auto classes like a real checkpoint.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_vocab(texts: Iterable[str], max_words: int = 4000) -> list[str]:
    """Special tokens, every single character seen (and its ## continuation), then whole words."""
    words: dict[str, int] = {}
    chars: set[str] = set("abcdefghijklmnopqrstuvwxyz0123456789")
    for text in texts:
        for w in re.findall(r"\w+|[^\w\s]", text.lower()):
            words[w] = words.get(w, 0) + 1
            chars.update(w)
    ordered = sorted(words, key=lambda w: (-words[w], w))[:max_words]
    single = sorted(chars)
    vocab = SPECIAL_TOKENS + single + [f"##{c}" for c in single if c.isalnum()]
    seen = set(vocab)
    vocab += [w for w in ordered if w not in seen]
    return vocab


def make_tokenizer(texts: Iterable[str], max_positions: int = 512):
    """A fast uncased WordPiece tokenizer whose vocabulary covers the words of texts."""
    from transformers import BertTokenizerFast

    vocab = build_vocab(texts)
    # transformers 5 takes the vocabulary as a dict (a vocab_file argument is silently ignored).
    tokenizer = BertTokenizerFast(vocab={tok: i for i, tok in enumerate(vocab)}, do_lower_case=True,
                                  model_max_length=max_positions)
    assert tokenizer.convert_tokens_to_ids(vocab[-1]) == len(vocab) - 1
    return tokenizer


def make_tiny_bert(folder: str, texts: Iterable[str], hidden_size: int = 32, layers: int = 2,
                   heads: int = 2, max_positions: int = 512, seed: int = 0,
                   dropout: float = 0.1, initializer_range: float = 0.02) -> str:
    """Save a random-init tiny BertForMaskedLM + fast WordPiece tokenizer into folder."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    os.makedirs(folder, exist_ok=True)
    tokenizer = make_tokenizer(texts, max_positions)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden_size,
                        max_position_embeddings=max_positions, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, initializer_range=initializer_range)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder


KEYWORD_FILLER = ("the a movie film story plot actor scene music was is very quite rather long "
                  "short old new").split()


def write_keyword_sst2(folder: str, n_train: int = 160, n_dev: int = 60, seed: int = 0) -> list[str]:
    """A learnable SST-2-format task: label 1 iff the sentence holds "good" (else "bad"), amid
    random filler words. Writes <folder>/SST-2/{train,dev}.tsv; returns the words used."""
    import random

    rng = random.Random(seed)
    task_dir = os.path.join(folder, "SST-2")
    os.makedirs(task_dir, exist_ok=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        with open(os.path.join(task_dir, name), "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n")
            for _ in range(n):
                label = rng.randint(0, 1)
                words = [rng.choice(KEYWORD_FILLER) for _ in range(rng.randint(4, 8))]
                words.insert(rng.randint(0, len(words)), "good" if label else "bad")
                f.write(" ".join(words) + " \t" + str(label) + "\n")   # SST-2's trailing space
    return KEYWORD_FILLER + ["good", "bad"]
