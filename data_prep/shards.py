"""Shard format: token binaries (``.bin``) plus an index (``.idx``), written atomically, read memory-mapped.

Layout (all integers little-endian):

``<split>_<k>.bin``
    32-byte header: magic ``b"PKMTOKB\\0"`` (8 bytes), format version (uint32), dtype code (uint32:
    1 = uint16, 2 = int32), 16 reserved zero bytes; then the token ids of every document, back to
    back, in the header's dtype.
``<split>_<k>.idx``
    32-byte header: magic ``b"PKMTOKI\\0"``, version (uint32), dtype code (uint32), number of
    documents (uint64), number of tokens (uint64); then three arrays:
    ``lengths`` int64[num_docs] (tokens per document),
    ``byte_offsets`` int64[num_docs + 1] (start of each document in the ``.bin`` data area; the last
    entry is the data size, so these are also the document boundaries),
    ``doc_ids`` int64[num_docs] (each document's position in the input stream, for provenance and
    resuming).

A shard is written to ``*.tmp`` files and renamed (``.bin`` first, ``.idx`` last), so a crash never
leaves a pair that reads as valid. :class:`ShardReader` checks magic, version, dtype, the index's
internal consistency and the ``.bin`` length before handing out memory-mapped views.

Public API::

    writer = ShardWriter(out_dir, "train_00000", vocab_size)   # .add(lengths, tokens, doc_ids) / .close() -> record
    reader = ShardReader("out/train_00000.bin")                 # .num_docs, .num_tokens, .tokens, .doc(i)
    dtype_for_vocab(vocab_size) -> np.dtype
    file_sha256(path) -> str
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import numpy as np

BIN_MAGIC = b"PKMTOKB\x00"
IDX_MAGIC = b"PKMTOKI\x00"
FORMAT_VERSION = 1
HEADER_BYTES = 32
_BIN_HEADER = struct.Struct("<8sII16x")
_IDX_HEADER = struct.Struct("<8sIIQQ")
_DTYPE_CODES = {1: np.dtype("<u2"), 2: np.dtype("<i4")}
_CODE_OF_DTYPE = {v: k for k, v in _DTYPE_CODES.items()}


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (halves disk and page-cache use), else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    return _DTYPE_CODES[1] if vocab_size <= 2**16 else _DTYPE_CODES[2]


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_paths(out_dir: str | os.PathLike, name: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"{name}.bin", out / f"{name}.idx"


class ShardWriter:
    """Appends documents to one shard; ``close()`` publishes it atomically and returns its record."""

    def __init__(self, out_dir: str | os.PathLike, name: str, vocab_size: int):
        self.name = name
        self.dtype = dtype_for_vocab(vocab_size)
        self.bin_path, self.idx_path = shard_paths(out_dir, name)
        self._bin_tmp = self.bin_path.with_name(self.bin_path.name + ".tmp")
        self._idx_tmp = self.idx_path.with_name(self.idx_path.name + ".tmp")
        self._file = open(self._bin_tmp, "wb")
        self._sha = hashlib.sha256()
        self._write(_BIN_HEADER.pack(BIN_MAGIC, FORMAT_VERSION, _CODE_OF_DTYPE[self.dtype]))
        self._lengths: list[np.ndarray] = []
        self._doc_ids: list[np.ndarray] = []
        self.num_tokens = 0
        self.num_docs = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._sha.update(data)

    def add(self, lengths: np.ndarray, tokens: np.ndarray, doc_ids: np.ndarray) -> None:
        """Append documents: ``tokens`` is their concatenation, ``lengths`` their sizes."""
        lengths = np.asarray(lengths, dtype=np.int64)
        assert int(lengths.sum()) == len(tokens) and len(doc_ids) == len(lengths)
        if len(tokens) and (int(tokens.min()) < 0 or int(tokens.max()) > np.iinfo(self.dtype).max):
            raise ValueError(f"token id out of range for {self.dtype} in shard {self.name}")
        data = np.ascontiguousarray(tokens, dtype=self.dtype)
        self._write(memoryview(data).cast("B"))
        self._lengths.append(lengths)
        self._doc_ids.append(np.asarray(doc_ids, dtype=np.int64))
        self.num_tokens += len(tokens)
        self.num_docs += len(lengths)

    def close(self) -> dict:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        doc_ids = np.concatenate(self._doc_ids) if self._doc_ids else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        offsets *= self.dtype.itemsize
        header = _IDX_HEADER.pack(IDX_MAGIC, FORMAT_VERSION, _CODE_OF_DTYPE[self.dtype], len(lengths), self.num_tokens)
        idx_bytes = header + lengths.astype("<i8").tobytes() + offsets.astype("<i8").tobytes() + doc_ids.astype("<i8").tobytes()
        with open(self._idx_tmp, "wb") as f:
            f.write(idx_bytes)
            f.flush()
            os.fsync(f.fileno())
        # .idx renamed last: a .bin without its .idx is an unfinished shard, never a valid one.
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        return {
            "name": self.name,
            "bin": self.bin_path.name,
            "idx": self.idx_path.name,
            "num_docs": int(len(lengths)),
            "num_tokens": int(self.num_tokens),
            "first_doc_id": int(doc_ids[0]) if len(doc_ids) else -1,
            "last_doc_id": int(doc_ids[-1]) if len(doc_ids) else -1,
            "sha256_bin": self._sha.hexdigest(),
            "sha256_idx": hashlib.sha256(idx_bytes).hexdigest(),
        }

    def abort(self) -> None:
        """Drop an unfinished shard (its temp files)."""
        if not self._file.closed:
            self._file.close()
        for p in (self._bin_tmp, self._idx_tmp):
            p.unlink(missing_ok=True)


class ShardReader:
    """Memory-mapped view of one shard, validated on open.

    ``tokens`` is the whole data area as a read-only array; ``doc(i)`` one document (O(1));
    ``token_offsets`` int64[num_docs + 1] gives document boundaries in tokens.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        stem = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
        self.bin_path, self.idx_path = stem.with_suffix(".bin"), stem.with_suffix(".idx")
        for p in (self.bin_path, self.idx_path):
            if not p.is_file():
                raise ValueError(f"shard file {p} does not exist; re-run data prep into this folder to (re)create it")
        self._read_index()
        self._check_bin()
        count = self.num_tokens
        self.tokens = np.memmap(self.bin_path, dtype=self.dtype, mode="r", offset=HEADER_BYTES, shape=(count,)) if count else np.zeros(0, self.dtype)
        self.token_offsets = self.byte_offsets // self.dtype.itemsize

    def _read_index(self) -> None:
        p = self.idx_path
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != IDX_MAGIC:
            raise ValueError(f"{p} is not a PKM shard index (wrong magic number); point the reader at a folder written by data_prep")
        _, version, code, num_docs, num_tokens = _IDX_HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise ValueError(f"{p} has shard format version {version}, this code reads version {FORMAT_VERSION}; re-run data prep")
        if code not in _DTYPE_CODES:
            raise ValueError(f"{p} declares unknown dtype code {code}; the file is corrupt, re-run data prep")
        expected = HEADER_BYTES + 8 * (3 * num_docs + 1)
        if size != expected:
            raise ValueError(f"{p} is {size} bytes but its header ({num_docs} documents) implies {expected}; "
                             "the index is truncated or corrupt, re-run data prep")
        arrays = np.fromfile(p, dtype="<i8", offset=HEADER_BYTES)
        self.dtype = _DTYPE_CODES[code]
        self.num_docs, self.num_tokens = int(num_docs), int(num_tokens)
        self.lengths = arrays[:num_docs]
        self.byte_offsets = arrays[num_docs: 2 * num_docs + 1]
        self.doc_ids = arrays[2 * num_docs + 1:]
        consistent = (self.byte_offsets[0] == 0 and (self.lengths >= 0).all()
                      and np.array_equal(np.diff(self.byte_offsets), self.lengths * self.dtype.itemsize)
                      and int(self.lengths.sum()) == self.num_tokens)
        if not consistent:
            raise ValueError(f"{p} has inconsistent lengths/offsets; the index is corrupt, re-run data prep")

    def _check_bin(self) -> None:
        p = self.bin_path
        size = p.stat().st_size
        with open(p, "rb") as f:
            head = f.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or head[:8] != BIN_MAGIC:
            raise ValueError(f"{p} is not a PKM token binary (wrong magic number); point the reader at a folder written by data_prep")
        _, version, code = _BIN_HEADER.unpack(head)
        if version != FORMAT_VERSION:
            raise ValueError(f"{p} has shard format version {version}, this code reads version {FORMAT_VERSION}; re-run data prep")
        if _DTYPE_CODES.get(code) != self.dtype:
            raise ValueError(f"{p} declares dtype code {code} but its index says {self.dtype}; the pair does not belong together")
        expected = HEADER_BYTES + self.num_tokens * self.dtype.itemsize
        if size != expected:
            kind = "truncated" if size < expected else "longer than its index says"
            raise ValueError(f"{p} is {kind}: {size} bytes, expected {expected} for {self.num_tokens} tokens; re-run data prep")

    def doc(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_docs:
            raise IndexError(f"document {i} out of range for {self.bin_path.name} ({self.num_docs} documents)")
        return self.tokens[self.token_offsets[i]: self.token_offsets[i + 1]]

    def __len__(self) -> int:
        return self.num_docs
