"""Tokenizers: load a local Hugging Face fast tokenizer, or train a new WordPiece / SentencePiece
(Unigram + Metaspace, the SentencePiece algorithm as implemented in ``tokenizers``) vocabulary, save it
beside the shards, and encode batches of documents into flat numpy arrays.

Only the ``tokenizers`` library is used (no transformers import), so the workers start fast. The
folder saved beside the shards (``<out>/tokenizer``) loads with ``AutoTokenizer.from_pretrained``.

Public API::

    load_tokenizer(path) -> tokenizers.Tokenizer          # HF folder (tokenizer.json, or vocab.txt) or a tokenizer.json
    train_tokenizer(texts, kind, vocab_size, lowercase) -> tokenizers.Tokenizer   # kind: "wordpiece" | "sentencepiece"
    save_tokenizer(tok, out_folder, source_folder=None) -> Path   # writes tokenizer.json (+ HF config files)
    tokenizer_identity(tok, tokenizer_json_path, source) -> dict  # goes into manifest.json
    DocumentEncoder(tok, dtype).encode(texts) -> (lengths int64[n], tokens dtype[sum])   # exact, fast path for BERT
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_SPECIAL_ALIASES = {
    "pad": ("[PAD]", "<pad>"), "unk": ("[UNK]", "<unk>"), "cls": ("[CLS]", "<s>"),
    "sep": ("[SEP]", "</s>"), "mask": ("[MASK]", "<mask>"),
}
_HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "added_tokens.json",
             "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def _plain(tok: Tokenizer) -> Tokenizer:
    # A tokenizer.json saved for inference may carry truncation/padding (MiniLM's truncates at 128):
    # data prep must see every token of every document.
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    path = Path(path)
    if path.is_file() and path.suffix == ".json":
        return _plain(Tokenizer.from_file(str(path)))
    if not path.is_dir():
        raise ValueError(f"tokenizer path {path} is neither a folder nor a tokenizer.json file; "
                         "pass the folder of a Hugging Face tokenizer (e.g. beside a pretrained BERT) or use --train-tokenizer")
    if (path / "tokenizer.json").is_file():
        return _plain(Tokenizer.from_file(str(path / "tokenizer.json")))
    if (path / "vocab.txt").is_file():
        # A slow-tokenizer BERT folder: rebuild the equivalent fast WordPiece tokenizer.
        config = _read_json(path / "tokenizer_config.json")
        lowercase = bool(config.get("do_lower_case", True))
        tok = Tokenizer(models.WordPiece.from_file(str(path / "vocab.txt"), unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        _add_bert_post_processor(tok)
        return _plain(tok)
    raise ValueError(f"{path} has neither tokenizer.json nor vocab.txt; it is not a tokenizer folder this tool can load")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _add_bert_post_processor(tok: Tokenizer) -> None:
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls is not None and sep is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int = 30522, lowercase: bool = True) -> Tokenizer:
    """Train a new vocabulary on ``texts`` with the five BERT special tokens at ids 0-4."""
    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2, show_progress=False)
    elif kind == "sentencepiece":
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence(norm)
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, unk_token="[UNK]", show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose wordpiece or sentencepiece")
    tok.train_from_iterator(texts, trainer)
    _add_bert_post_processor(tok)
    return _plain(tok)


def save_tokenizer(tok: Tokenizer, out_folder: str | os.PathLike, source_folder: str | os.PathLike | None = None) -> Path:
    """Write the tokenizer beside the shards; returns the path of its tokenizer.json.

    With a source folder, its HF files are copied as they are (identity preserved); a trained or
    rebuilt tokenizer gets a tokenizer_config.json so ``AutoTokenizer`` can load the folder.
    """
    out = Path(out_folder)
    out.mkdir(parents=True, exist_ok=True)
    src = Path(source_folder) if source_folder is not None else None
    if src is not None and src.is_file():
        src = None if src.name != "tokenizer.json" else src.parent
    if src is not None and (src / "tokenizer.json").is_file():
        for name in _HF_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        return out / "tokenizer.json"
    if src is not None:
        for name in _HF_FILES:   # vocab.txt folder: keep its configs, add the rebuilt tokenizer.json
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
    tok.save(str(out / "tokenizer.json"))
    specials = special_token_ids(tok)
    if not (out / "tokenizer_config.json").is_file():
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 512,
                  **{f"{k}_token": tok.id_to_token(v) for k, v in specials.items()}}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out / "tokenizer.json"


def special_token_ids(tok: Tokenizer) -> dict[str, int]:
    """Ids of pad/unk/cls/sep/mask (BERT or RoBERTa spelling); MLM needs all five."""
    ids = {}
    for role, names in _SPECIAL_ALIASES.items():
        for name in names:
            idx = tok.token_to_id(name)
            if idx is not None:
                ids[role] = idx
                break
        else:
            raise ValueError(f"the tokenizer has no {role} token (looked for {', '.join(names)}); MLM pretraining needs it")
    return ids


def tokenizer_identity(tok: Tokenizer, tokenizer_json: str | os.PathLike, source: str) -> dict:
    model = json.loads(tok.to_str())["model"]
    kind = model.get("type", "unknown")
    identity = {
        "source": source,
        "model": kind,
        "sha256": hashlib.sha256(Path(tokenizer_json).read_bytes()).hexdigest(),
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_tokens": special_token_ids(tok),
    }
    # How whole-word masking finds word pieces: WordPiece marks continuations, Metaspace marks starts.
    if kind == "WordPiece":
        identity["continuation_prefix"] = model.get("continuing_subword_prefix", "##")
    else:
        identity["word_start_prefix"] = "\u2581"
    return identity


class DocumentEncoder:
    """Token ids of documents, exactly ``tok.encode(doc, add_special_tokens=False).ids``, faster for BERT.

    For BERT-style tokenizers (BertNormalizer + BertPreTokenizer) the Rust normalizer is about a third of
    the tokenizing time, yet on ASCII text it only deletes control characters, maps \\t\\n\\r to spaces
    and (uncased) lowercases. ASCII lines therefore go through ``str.translate`` with a table built by
    asking the tokenizer's own normalizer about each ASCII character (exact by construction), then
    through a copy of the tokenizer without normalizer. This is exact because BertPreTokenizer splits
    on whitespace, so a newline is always a token boundary and lines can be encoded separately; lines
    with other characters, or containing an added token's text, take the full tokenizer.
    """

    def __init__(self, tok: Tokenizer, dtype: np.dtype):
        self.tok, self.dtype = tok, np.dtype(dtype)
        self._encode = getattr(tok, "encode_batch_fast", tok.encode_batch)   # _fast skips char offsets we never use
        self.fast = None
        config = json.loads(tok.to_str())
        norm, pre = config.get("normalizer") or {}, config.get("pre_tokenizer") or {}
        if norm.get("type") == "BertNormalizer" and pre.get("type") == "BertPreTokenizer":
            fast = Tokenizer.from_str(tok.to_str())
            fast.normalizer = None
            self.fast = _plain(fast)
            self._fast_encode = getattr(fast, "encode_batch_fast", fast.encode_batch)
            self._table = str.maketrans({chr(c): tok.normalizer.normalize_str(chr(c)) for c in range(128)})
            added = [t["content"] for t in config.get("added_tokens", [])]
            self._added = re.compile("|".join(map(re.escape, added)), re.I) if added else None

    def _is_fast(self, text: str) -> bool:
        return text.isascii() and not (self._added is not None and self._added.search(text))

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-document lengths (int64) and the concatenated token ids (``dtype``)."""
        if not texts:
            return np.zeros(0, np.int64), np.zeros(0, self.dtype)
        if self.fast is None:
            return _flatten([e.ids for e in self._encode(texts, add_special_tokens=False)], [1] * len(texts), self.dtype)
        fast_texts, slow_texts, route, pieces_per_doc = [], [], [], []
        for text in texts:
            parts = [text] if text.isascii() or "\n" not in text else text.split("\n")
            for part in parts:
                if self._is_fast(part):
                    route.append((True, len(fast_texts)))
                    fast_texts.append(part.translate(self._table))
                else:
                    route.append((False, len(slow_texts)))
                    slow_texts.append(part)
            pieces_per_doc.append(len(parts))
        fast_ids = [e.ids for e in self._fast_encode(fast_texts, add_special_tokens=False)] if fast_texts else []
        slow_ids = [e.ids for e in self._encode(slow_texts, add_special_tokens=False)] if slow_texts else []
        return _flatten([fast_ids[i] if is_fast else slow_ids[i] for is_fast, i in route], pieces_per_doc, self.dtype)


def _flatten(pieces: list[list[int]], pieces_per_doc: list[int], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    piece_lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces))
    starts = np.concatenate([[0], np.cumsum(pieces_per_doc)[:-1]]).astype(np.int64)
    lengths = np.add.reduceat(piece_lengths, starts) if len(piece_lengths) else np.zeros(0, np.int64)
    tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=dtype, count=int(piece_lengths.sum()))
    return lengths, tokens


def encode_documents(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Token ids (no special tokens) of each text, concatenated, plus per-text lengths."""
    return DocumentEncoder(tok, dtype).encode(texts)
