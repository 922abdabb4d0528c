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


def make_tiny_bert(folder: str, texts: Iterable[str], hidden_size: int = 32, layers: int = 2,
                   heads: int = 2, max_positions: int = 512, seed: int = 0) -> str:
    """Save a random-init tiny BertForMaskedLM + fast WordPiece tokenizer into folder."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    os.makedirs(folder, exist_ok=True)
    vocab = build_vocab(texts)
    vocab_file = os.path.join(folder, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True,
                                  model_max_length=max_positions)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * hidden_size,
                        max_position_embeddings=max_positions)
    BertForMaskedLM(config).save_pretrained(folder)
    return folder
