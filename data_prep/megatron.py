"""Megatron-LM / NeMo indexed corpora in and out: ``PREFIX.bin`` + ``PREFIX.idx`` <-> shards, no re-tokenizing.

The layout, as ``megatron/core/datasets/indexed_dataset.py`` writes and reads it (all little-endian):

``PREFIX.idx``
    magic ``b"MMIDIDX\\x00\\x00"`` (9 bytes), version (uint64, 1), dtype code (uint8: 1 uint8, 2 int8,
    3 int16, 4 int32, 5 int64, 6 float64, 7 float32, 8 uint16), sequence count S (uint64), document
    count D (uint64); then ``sequence_lengths`` int32[S] (tokens per sequence), ``sequence_pointers``
    int64[S] (byte offset of each sequence in the ``.bin``), ``document_indices`` int64[D] (the
    sequence where each document starts: 0 first, S last, so D is the number of documents + 1).
    A multimodal index adds ``sequence_modes`` int8[S]; those are not text corpora and are refused.
``PREFIX.bin``
    the token ids of every sequence back to back in that dtype, no header.

A sequence is a sentence when Megatron's ``preprocess_data.py`` ran with ``--split-sentences`` (the
BERT recipe), else a whole document. This project's shards hold documents (sentences concatenated).
The sentence boundaries are kept beside the shards (``megatron_sequence_lengths.npy`` and
``megatron_document_index.npy``, only when some document is not exactly one non-empty sequence), so
that exporting an imported corpus gives the original files back byte for byte; the dtype of the
source is recorded in the manifest for the same reason. Megatron always writes contiguous pointers
(each sequence right after the previous one); other pointers are refused.

Import splits documents into train / validation exactly as ``prepare`` does (a hash of seed and
document number), resumes when interrupted, and refuses a tokenizer whose vocabulary does not cover
the ids. Export writes the documents in document order (both splits merged by default), one
sequence per document unless the sentence boundaries were kept, in Megatron's dtype rule (uint16
below 65,500 ids, else int32) unless the import recorded another.

Public API::

    MegatronCorpus(prefix)                     # validated view: .num_documents, .num_sequences, .tokens, .doc_token_offsets
    import_megatron(prefix, out_dir, *, tokenizer, shard_tokens=2**26, valid_fraction=0.01, seed=1234,
                    progress=True, overwrite=False) -> manifest
    export_megatron(shard_dir, prefix, *, split="all", overwrite=False) -> summary dict
"""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from data_prep import pipeline, tokenization
from data_prep.documents import RawDoc
from data_prep.shards import FORMAT_VERSION, ShardReader

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")   # magic, version, dtype code, sequence count, document count: 34 bytes
DTYPES = {1: np.dtype("u1"), 2: np.dtype("i1"), 3: np.dtype("<i2"), 4: np.dtype("<i4"), 5: np.dtype("<i8"),
          6: np.dtype("<f8"), 7: np.dtype("<f4"), 8: np.dtype("<u2")}
CODES = {dtype: code for code, dtype in DTYPES.items()}
SEQUENCE_LENGTHS, DOCUMENT_INDEX = pipeline.MEGATRON_SIDE_FILES
_SCAN = 1 << 24          # elements per pass of a scan over a big array (bounded memory)
_CHUNK_TOKENS = 1 << 22  # tokens per task handed to the shard writer
_CHUNK_DOCS = 8192


def _prefix_of(prefix: str | os.PathLike) -> Path:
    path = Path(prefix)
    return path.with_suffix("") if path.suffix in (".bin", ".idx") else path


def megatron_dtype_for_vocab(vocab_size: int) -> np.dtype:
    """Megatron's own rule (DType.optimal_dtype): uint16 below 65,500 ids, else int32."""
    return DTYPES[8] if vocab_size < 65500 else DTYPES[4]


class MegatronCorpus:
    """A validated, memory-mapped Megatron ``.bin``/``.idx`` pair.

    ``doc_token_offsets`` int64[num_documents + 1]: document i is ``tokens[off[i]:off[i + 1]]``.
    """

    def __init__(self, prefix: str | os.PathLike):
        self.prefix = _prefix_of(prefix)
        self.bin_path, self.idx_path = self.prefix.with_name(self.prefix.name + ".bin"), self.prefix.with_name(self.prefix.name + ".idx")
        for p in (self.idx_path, self.bin_path):
            if not p.is_file():
                raise ValueError(f"Megatron file {p} does not exist; pass the prefix of a .bin/.idx pair (e.g. my_corpus_text_document)")
        self._read_index()
        self._check_layout()

    def _read_index(self) -> None:
        p = self.idx_path
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(_HEADER.size)
        if len(head) < _HEADER.size or head[:9] != MAGIC:
            raise ValueError(f"{p} is not a Megatron index (no MMIDIDX magic number); pass the prefix of a Megatron-LM / NeMo .bin/.idx pair")
        _, version, code, num_seq, num_doc_entries = _HEADER.unpack(head)
        if version != VERSION:
            raise ValueError(f"{p} has Megatron index version {version}; this reader knows version {VERSION}")
        if code not in DTYPES:
            raise ValueError(f"{p} declares unknown dtype code {code} (known: 1-8); the index is corrupt")
        if DTYPES[code].kind == "f":
            raise ValueError(f"{p} holds {DTYPES[code]} values, not token ids; only token corpora can be imported")
        expected = _HEADER.size + 12 * num_seq + 8 * num_doc_entries
        if size == expected + num_seq and num_seq:
            raise ValueError(f"{p} has sequence modes (a multimodal Megatron corpus); only text token corpora can be imported")
        if size != expected or num_doc_entries < 1:
            raise ValueError(f"{p} is {size} bytes but its header ({num_seq} sequences, {num_doc_entries} document entries) "
                             f"implies {expected}; the index is truncated or corrupt")
        self.dtype = DTYPES[code]
        self.num_sequences = int(num_seq)
        self.num_documents = int(num_doc_entries) - 1
        offset = _HEADER.size
        self.sequence_lengths = np.memmap(p, "<i4", "r", offset, (num_seq,)) if num_seq else np.zeros(0, "<i4")
        offset += 4 * num_seq
        self.sequence_pointers = np.memmap(p, "<i8", "r", offset, (num_seq,)) if num_seq else np.zeros(0, "<i8")
        offset += 8 * num_seq
        self.document_index = np.array(np.memmap(p, "<i8", "r", offset, (num_doc_entries,)))

    def _check_layout(self) -> None:
        p, di, s = self.idx_path, self.document_index, self.num_sequences
        if di[0] != 0 or di[-1] != s or (np.diff(di) < 0).any():
            raise ValueError(f"{p}: the document index must rise from 0 to the sequence count {s} "
                             f"(it goes from {di[0]} to {di[-1]}); the index is corrupt")
        itemsize, total = self.dtype.itemsize, 0
        for start in range(0, s, _SCAN):   # pointers must be the running byte sum of the lengths, as Megatron writes them
            lengths = self.sequence_lengths[start: start + _SCAN].astype(np.int64)
            if (lengths < 0).any():
                raise ValueError(f"{p} holds negative sequence lengths; the index is corrupt")
            expected = (total + np.concatenate([[0], np.cumsum(lengths)[:-1]])) * itemsize
            bad = np.flatnonzero(self.sequence_pointers[start: start + _SCAN] != expected)
            if len(bad):
                i = start + int(bad[0])
                raise ValueError(f"{p}: sequence {i} starts at byte {int(self.sequence_pointers[i])}, not right after the "
                                 f"previous one ({int(expected[bad[0]])}); only contiguous Megatron files are supported")
            total += int(lengths.sum())
        size = self.bin_path.stat().st_size
        if size != total * itemsize:
            kind = "truncated" if size < total * itemsize else "longer than its index says"
            raise ValueError(f"{self.bin_path} is {kind}: {size} bytes, but {p} describes {total} {self.dtype} tokens "
                             f"({total * itemsize} bytes); the pair does not belong together or a copy was cut")
        self.num_tokens = total
        self.tokens = np.memmap(self.bin_path, self.dtype, "r", 0, (total,)) if total else np.zeros(0, self.dtype)
        seq_starts = np.append(np.asarray(self.sequence_pointers) // itemsize, total) if s else np.zeros(1, np.int64)
        self.doc_token_offsets = seq_starts[di].astype(np.int64)

    def one_sequence_per_document(self) -> bool:
        """True when the documents alone describe the file (no sentence boundaries, no empty documents)."""
        return (self.num_sequences == self.num_documents
                and np.array_equal(self.document_index, np.arange(self.num_documents + 1))
                and bool((np.asarray(self.sequence_lengths) > 0).all()))

    def id_range(self) -> tuple[int, int]:
        low, high = 0, -1
        for start in range(0, self.num_tokens, _SCAN):
            part = self.tokens[start: start + _SCAN]
            low, high = min(low, int(part.min())), max(high, int(part.max()))
        return low, high


# ---------------------------------------------------------------- import

def import_megatron(prefix: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: str | os.PathLike,
                    shard_tokens: int = 2**26, valid_fraction: float = 0.01, seed: int = 1234, progress: bool = True,
                    overwrite: bool = False) -> dict:
    """Shards + manifest in ``out_dir`` holding the documents of a Megatron corpus, ids as they are."""
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if shard_tokens <= 0:
        raise ValueError("shard_tokens must be > 0")
    corpus = MegatronCorpus(prefix)
    tok = tokenization.load_tokenizer(tokenizer)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    low, high = corpus.id_range()
    if low < 0:
        raise ValueError(f"{corpus.bin_path} holds negative token id {low}; it is not a token corpus")
    if high >= vocab:
        raise ValueError(f"{corpus.bin_path} holds token ids up to {high}, but the tokenizer {tokenizer} has a vocabulary of "
                         f"{vocab} (ids 0..{vocab - 1}); import with the tokenizer the corpus was made with")
    out = Path(out_dir)
    stat = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in (corpus.bin_path, corpus.idx_path)]
    config = {"format_version": FORMAT_VERSION, "megatron_import": stat, "tokenizer": {"source": os.path.abspath(tokenizer)},
              "shard_tokens": shard_tokens, "valid_fraction": valid_fraction, "seed": seed}
    keep_sequences = not corpus.one_sequence_per_document()
    extra = {"megatron": {"source": str(corpus.prefix.resolve()), "dtype": corpus.dtype.name,
                          "num_documents": corpus.num_documents, "num_sequences": corpus.num_sequences,
                          "sequence_files": [SEQUENCE_LENGTHS, DOCUMENT_INDEX] if keep_sequences else None}}

    def setup_tokenizer(state):
        tok_json = tokenization.save_tokenizer(tok, out / pipeline.TOKENIZER_DIR, tokenizer)
        return tok, tokenization.tokenizer_identity(tok, tok_json, os.path.abspath(tokenizer))

    def feed(runner, tok_, dtype: np.dtype) -> None:
        if keep_sequences:
            _save_sequences(corpus, out)
        off = corpus.doc_token_offsets

        def submit(chunk):
            a, b = chunk[0][0], chunk[-1][0] + 1
            return _Ready((np.diff(off[a: b + 1]), corpus.tokens[off[a]: off[b]].astype(dtype)))
        runner.run(submit, _document_chunks(corpus, runner.start), 2, progress)

    return pipeline.write_shards(out, config, overwrite, setup_tokenizer, feed, shard_tokens=shard_tokens,
                                 valid_fraction=valid_fraction, seed=seed, on_error="fail", missing=[], num_inputs=1,
                                 manifest_extra=extra)


class _Ready:
    """An already computed result, in the shape of a pool's async result."""

    def __init__(self, value):
        self._value = value

    def get(self):
        return self._value


def _document_chunks(corpus: MegatronCorpus, start: int):
    """Consecutive documents from ``start`` on, about _CHUNK_TOKENS tokens per chunk."""
    off, n, label = corpus.doc_token_offsets, corpus.num_documents, str(corpus.bin_path)
    a = start
    while a < n:
        by_tokens = int(np.searchsorted(off, off[a] + _CHUNK_TOKENS, "right")) - 1
        b = min(n, a + _CHUNK_DOCS, max(a + 1, by_tokens))
        yield [(d, RawDoc(label, d + 1, "tokens", "")) for d in range(a, b)]
        a = b


def _save_sequences(corpus: MegatronCorpus, out: Path) -> None:
    """The sentence boundaries, as .npy files (written to .tmp, then renamed), streamed from the index."""
    for name, source in ((SEQUENCE_LENGTHS, corpus.sequence_lengths), (DOCUMENT_INDEX, corpus.document_index)):
        tmp = out / (name + ".tmp")
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": source.dtype.str, "fortran_order": False, "shape": (len(source),)})
            for start in range(0, len(source), _SCAN):
                f.write(np.ascontiguousarray(source[start: start + _SCAN]).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out / name)


# ---------------------------------------------------------------- export

def export_megatron(shard_dir: str | os.PathLike, prefix: str | os.PathLike, *, split: str = "all",
                    overwrite: bool = False) -> dict:
    """Write the documents of ``shard_dir`` (one split or ``all``, in document order) as ``PREFIX.bin``/``.idx``."""
    from data_prep import open_split

    manifest = pipeline.load_manifest(shard_dir)
    splits = list(manifest["splits"]) if split == "all" else [split]
    if split != "all" and split not in manifest["splits"]:
        raise ValueError(f"unknown split {split!r}; {shard_dir} has {', '.join(manifest['splits'])} (or pass all)")
    prefix = _prefix_of(prefix)
    bin_path, idx_path = prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")
    existing = [str(p) for p in (bin_path, idx_path) if p.exists()]
    if existing and not overwrite:
        raise ValueError(f"{', '.join(existing)} already exist(s); choose another --out prefix or pass --overwrite")
    if not prefix.parent.is_dir():
        raise ValueError(f"folder {prefix.parent} does not exist; create it or choose another --out prefix")

    readers: list[ShardReader] = [r for s in splits for r in open_split(shard_dir, s)]
    doc_ids = np.concatenate([r.doc_ids for r in readers]) if readers else np.zeros(0, np.int64)
    source = np.concatenate([np.full(r.num_docs, i) for i, r in enumerate(readers)]) if readers else np.zeros(0, np.int64)
    position = np.concatenate([np.arange(r.num_docs) for r in readers]) if readers else np.zeros(0, np.int64)
    doc_lengths = np.concatenate([r.lengths for r in readers]) if readers else np.zeros(0, np.int64)
    order = np.argsort(doc_ids, kind="stable")
    doc_ids, source, position, doc_lengths = doc_ids[order], source[order], position[order], doc_lengths[order]
    if len(doc_ids) and (np.diff(doc_ids) == 0).any():
        raise ValueError(f"{shard_dir} holds a document twice (same doc id in two shards); re-run data prep")

    meta = manifest.get("megatron") or {}
    dtype = np.dtype(meta["dtype"]) if meta.get("dtype") else megatron_dtype_for_vocab(manifest["tokenizer"]["vocab_size"])
    sequence_lengths, document_index = _sequences(Path(shard_dir), meta, doc_ids, doc_lengths, split == "all")

    tmp_bin, tmp_idx = bin_path.with_name(bin_path.name + ".tmp"), idx_path.with_name(idx_path.name + ".tmp")
    try:
        with open(tmp_bin, "wb") as f:
            _write_tokens(f, readers, source, position, dtype)
            f.flush()
            os.fsync(f.fileno())
        pointers = np.zeros(len(sequence_lengths), np.int64)
        np.cumsum(sequence_lengths[:-1], out=pointers[1:])
        pointers *= dtype.itemsize
        with open(tmp_idx, "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, CODES[dtype], len(sequence_lengths), len(document_index)))
            f.write(sequence_lengths.astype("<i4").tobytes())
            f.write(pointers.astype("<i8").tobytes())
            f.write(document_index.astype("<i8").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_bin, bin_path)   # .idx last: a .bin without its .idx is never mistaken for a corpus
        os.replace(tmp_idx, idx_path)
    finally:
        for p in (tmp_bin, tmp_idx):
            p.unlink(missing_ok=True)
    return {"bin": str(bin_path), "idx": str(idx_path), "dtype": dtype.name, "num_documents": len(document_index) - 1,
            "num_sequences": len(sequence_lengths), "num_tokens": int(doc_lengths.sum())}


def _sequences(shard_dir: Path, meta: dict, doc_ids: np.ndarray, doc_lengths: np.ndarray,
               whole_corpus: bool) -> tuple[np.ndarray, np.ndarray]:
    """(sequence_lengths, document_index) of the exported documents: the kept sentence boundaries
    where the import saved them (checked against the shards), else one sequence per document."""
    files = meta.get("sequence_files")
    if not files:
        if (doc_lengths >= 2**31).any():
            raise ValueError("a document has 2**31 tokens or more; Megatron's int32 sequence lengths cannot hold it")
        return doc_lengths.astype(np.int64), np.arange(len(doc_lengths) + 1, dtype=np.int64)
    absent = [name for name in files if not (shard_dir / name).is_file()]
    if absent:
        raise ValueError(f"{shard_dir} lacks {', '.join(absent)} (the imported corpus's sentence boundaries); "
                         "re-import the Megatron corpus into this folder")
    lengths = np.load(shard_dir / files[0], mmap_mode="r", allow_pickle=False)
    index = np.load(shard_dir / files[1], allow_pickle=False)
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    per_doc = starts[index[1:]] - starts[index[:-1]]   # tokens of every Megatron document
    if len(doc_ids) and (doc_ids[-1] >= len(per_doc) or not np.array_equal(per_doc[doc_ids], doc_lengths)):
        raise ValueError(f"{shard_dir}: the shards no longer match the kept Megatron sentence boundaries; re-import the corpus")
    present = np.zeros(len(per_doc), bool)
    present[doc_ids] = True
    if whole_corpus and not (per_doc[~present] == 0).all():
        raise ValueError(f"{shard_dir}: documents of the imported corpus are missing from the shards; re-import the corpus")
    if whole_corpus:   # every document, the empty ones included: the original index exactly
        return np.asarray(lengths, dtype=np.int64), index.astype(np.int64)
    counts = index[doc_ids + 1] - index[doc_ids]
    seq = np.repeat(index[doc_ids] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(int(counts.sum()))
    return np.asarray(lengths[seq], dtype=np.int64), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def _write_tokens(f, readers: list[ShardReader], source: np.ndarray, position: np.ndarray, dtype: np.dtype) -> None:
    """Tokens of the documents in the given order, one slice per run of consecutive documents of one shard."""
    if not len(source):
        return
    breaks = np.flatnonzero((np.diff(source) != 0) | (np.diff(position) != 1)) + 1
    for a, b in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(source)]])):
        reader = readers[int(source[a])]
        lo, hi = int(reader.token_offsets[position[a]]), int(reader.token_offsets[position[b - 1] + 1])
        for start in range(lo, hi, _SCAN):
            f.write(np.ascontiguousarray(reader.tokens[start: min(hi, start + _SCAN)], dtype=dtype).tobytes())
