"""The data-prep pipeline: inputs -> cleaned documents -> token ids -> shards + manifest.json.

Work split: the main process reads the inputs (a deterministic stream of documents), cuts it into
chunks and hands them to ``workers`` spawned processes, which clean wikitext and tokenize with the
Rust fast tokenizer (one thread each: ``--workers`` is the CPU budget). Results come back in
submission order and are written in document order, so the bytes on disk do not depend on the
worker count. Every document gets a position in the input stream (its doc id); the train/validation
split is a hash of (seed, doc id), so it is also independent of chunking and workers.

Resuming: the open shards of all splits close together, right after the document that brings
one of them to ``shard_tokens`` tokens (so shard boundaries depend only on the document stream, and
validation shards are ~valid_fraction the size of training ones). ``progress.json`` then records the
finished shards, the next doc id and the skip counters as of that point. A re-run with the same
settings keeps those shards, deletes its own unfinished ones, and continues at that doc id, reading
(but neither cleaning nor tokenizing) the documents before it. ``manifest.json`` is written last (temp + rename): a folder with a manifest is
complete.

Ownership: ``out_dir`` must be new, empty, or this tool's earlier output; only files named like its
own (``<split>_<k>.bin/.idx`` and their ``.tmp``, manifest, progress, tokenizer files) are ever
deleted. Inputs that yield no document are an error, and a failed first run leaves no empty folder.

Public API::

    prepare(inputs, out_dir, *, tokenizer=None, train_tokenizer=None, vocab_size=30522, lowercase=True,
            input_format="auto", text_field="text", workers=1, shard_tokens=2**26, valid_fraction=0.01,
            seed=1234, on_error="fail", max_doc_chars=10_000_000, progress=True, overwrite=False) -> dict
    load_manifest(out_dir) -> dict
    write_shards(out, config, overwrite, setup_tokenizer, feed, ...) -> dict   # the frame prepare and
        # the Megatron import (data_prep.megatron) share: resume, tokenizer, shards, manifest
"""
from __future__ import annotations

import collections
import contextlib
import copy
import json
import logging
import multiprocessing as mp
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from tqdm import tqdm

from atomic_files import write_json_atomic
from data_prep import cleaning, tokenization
from data_prep.readers import RawDoc, Skip, expand_inputs, iter_documents
from data_prep.shards import FORMAT_VERSION, ShardReader, ShardWriter, dtype_for_vocab

log = logging.getLogger("data_prep")

SPLITS = ("train", "validation")
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
TOKENIZER_DIR = "tokenizer"
# Sentence boundaries of an imported Megatron corpus (data_prep.megatron), kept for an exact export.
MEGATRON_SIDE_FILES = ("megatron_sequence_lengths.npy", "megatron_document_index.npy")
# Always counted, never fatal: an empty document (or a null value, no document at all) carries no
# tokens and cannot corrupt anything.
ALWAYS_SKIPPED = {"empty", "null_text"}
_MAX_SKIP_EXAMPLES = 20
_CHUNK_CHARS = 1 << 20    # ~1 MB of text per task: big enough to amortise IPC, small for memory
_CHUNK_DOCS = 2048


def load_manifest(out_dir: str | os.PathLike) -> dict:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{out_dir} has no {MANIFEST}: data prep did not finish there; run `python -m data_prep prepare ... --out {out_dir}`")
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json_atomic(path: Path, obj: dict) -> None:
    write_json_atomic(path, obj, indent=1, sort_keys=True)


def _is_validation(doc_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """splitmix64(seed, doc id) -> uniform [0, 1) < fraction; vectorised, platform independent."""
    if fraction <= 0:
        return np.zeros(len(doc_ids), bool)
    x = doc_ids.astype(np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & (2**64 - 1))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53 < fraction


# ---------------------------------------------------------------- workers

_worker_encoder: tokenization.DocumentEncoder | None = None


def _init_worker(tokenizer_json: str, dtype: str) -> None:
    global _worker_encoder
    # One Rust thread per worker process: the process count is the parallelism the user asked for.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer
    _worker_encoder = tokenization.DocumentEncoder(tokenization._plain(Tokenizer.from_str(tokenizer_json)), np.dtype(dtype))


def _encode_chunk(docs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    texts = [cleaning.wikitext_to_text(text) if kind == "wikitext" else text for kind, text in docs]
    return _worker_encoder.encode(texts)


class _InProcess:
    """workers=0: same code path without processes (debugging, tiny inputs)."""

    class _Done:
        def __init__(self, value):
            self._value = value

        def get(self):
            return self._value

    def apply_async(self, fn, args):
        return self._Done(fn(*args))

    def terminate(self):
        pass

    def join(self):
        pass


# ---------------------------------------------------------------- prepare

def prepare(inputs: str | os.PathLike | Sequence[str | os.PathLike], out_dir: str | os.PathLike, *,
            tokenizer: str | os.PathLike | None = None, train_tokenizer: str | None = None,
            vocab_size: int = 30522, lowercase: bool = True, input_format: str = "auto", text_field: str = "text",
            workers: int = 1, shard_tokens: int = 2**26, valid_fraction: float = 0.01, seed: int = 1234,
            on_error: str = "fail", max_doc_chars: int = 10_000_000, progress: bool = True,
            overwrite: bool = False) -> dict:
    """Tokenize ``inputs`` into shards under ``out_dir``; returns the manifest (also in manifest.json).

    ``tokenizer``: a local HF tokenizer folder (or tokenizer.json); or ``train_tokenizer`` =
    "wordpiece" | "sentencepiece" to train a ``vocab_size`` vocabulary on the corpus first.
    ``on_error``: "fail" raises ValueError at the first bad input (invalid UTF-8, bad JSON line,
    too-large document, binary file, truncated/corrupt file, missing path, missing or non-string
    parquet/arrow column); "skip" counts and reports them in the manifest's ``stats``. Empty
    documents and null values are always skipped and counted.
    Re-running with the same settings resumes (or returns the finished manifest); different settings
    on an existing folder are refused unless ``overwrite``.
    """
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
    if (tokenizer is None) == (train_tokenizer is None):
        raise ValueError("give exactly one of tokenizer (a local tokenizer folder) or train_tokenizer (wordpiece | sentencepiece)")
    if train_tokenizer is not None and train_tokenizer not in ("wordpiece", "sentencepiece"):
        raise ValueError(f"train_tokenizer must be 'wordpiece' or 'sentencepiece', got {train_tokenizer!r}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if workers < 0 or shard_tokens <= 0 or max_doc_chars <= 0:
        raise ValueError("workers must be >= 0, and shard_tokens and max_doc_chars > 0")

    files, missing = expand_inputs(inputs, input_format)
    if missing and on_error == "fail":
        raise ValueError(f"input path(s) not found or matching no file: {', '.join(missing)}; "
                         "fix the path, or pass --on-error skip to go on without them")
    if not files:
        raise ValueError(f"no input files found in {', '.join(map(str, missing))}; nothing to prepare")

    out = Path(out_dir)
    config = {
        "format_version": FORMAT_VERSION,
        # size + mtime: a changed input must not be resumed into shards made from the old one
        "inputs": [[os.path.abspath(p), fmt, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p, fmt in files],
        "missing_inputs": missing,
        "text_field": text_field,
        "tokenizer": ({"source": os.path.abspath(tokenizer)} if tokenizer is not None
                      else {"train": train_tokenizer, "vocab_size": vocab_size, "lowercase": lowercase}),
        "shard_tokens": shard_tokens, "valid_fraction": valid_fraction, "seed": seed,
        "on_error": on_error, "max_doc_chars": max_doc_chars,
    }

    def setup_tokenizer(state):
        return _setup_tokenizer(out, tokenizer, train_tokenizer, vocab_size, lowercase, files, text_field,
                                max_doc_chars, on_error, state)

    def feed(runner: _Runner, tok, dtype: np.dtype) -> None:
        pool = (_InProcess() if workers == 0 else
                mp.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(tok.to_str(), dtype.str)))
        if workers == 0:
            _init_worker_inprocess(tok, dtype)

        def submit(chunk):
            return pool.apply_async(_encode_chunk, ([(item.kind, item.text) for _, item in chunk if isinstance(item, RawDoc)],))
        try:
            runner.run(submit, _chunks(iter_documents(files, text_field, max_doc_chars), runner.start),
                       max(2, 2 * workers + 1), progress)
        finally:
            pool.terminate()
            pool.join()

    return write_shards(out, config, overwrite, setup_tokenizer, feed, shard_tokens=shard_tokens,
                        valid_fraction=valid_fraction, seed=seed, on_error=on_error, missing=missing, num_inputs=len(files))


def write_shards(out: Path, config: dict, overwrite: bool, setup_tokenizer, feed, *, shard_tokens: int,
                 valid_fraction: float, seed: int, on_error: str, missing: list[str], num_inputs: int,
                 manifest_extra: dict | None = None) -> dict:
    """The shared frame of every producer of shards (``prepare``, the Megatron import): resume or
    refuse an earlier run in ``out``, set up the tokenizer, let ``feed(runner, tok, dtype)`` push the
    encoded documents through a :class:`_Runner`, then publish the manifest.

    ``setup_tokenizer(progress_state or None) -> (tokenizers.Tokenizer, identity dict)``.
    """
    _refuse_foreign_folder(out)
    with _removed_if_left_empty(out):
        previous = _previous_run(out, config, overwrite)
        if previous is not None and previous.get("complete"):
            return previous["manifest"]
        state = previous["progress"] if previous else None

        tok, identity = setup_tokenizer(state)
        if state is not None and state.get("tokenizer_sha256") != identity["sha256"]:
            raise ValueError(f"the tokenizer differs from the one the interrupted run in {out} used; "
                             "pass --overwrite to start over")
        dtype = dtype_for_vocab(identity["vocab_size"])
        if state is None:
            state = {"config": config, "tokenizer_sha256": identity["sha256"],
                     "next_doc": 0, "stats": _new_stats(), "shards": {s: [] for s in SPLITS}}
            _write_json_atomic(out / PROGRESS, state)
        _clean_unfinished(out, state)

        runner = _Runner(out, state, identity["vocab_size"], shard_tokens, valid_fraction, seed, on_error)
        ok = False
        try:
            feed(runner, tok, dtype)
            ok = True
        finally:
            if not ok:
                runner.abort()
        manifest = runner.finish(identity, config, missing, dtype)
        manifest.update(manifest_extra or {})
        _refuse_empty_output(out, manifest, num_inputs)
        _write_json_atomic(out / MANIFEST, manifest)
        (out / PROGRESS).unlink(missing_ok=True)
    _report(manifest)
    return manifest


# ---------------------------------------------------------------- what this tool owns in --out

# Every name data prep (or pretraining's shard check cache) writes in --out; nothing else is ever
# deleted, and a folder holding anything else without being data prep output is refused.
_OWN_SHARD = re.compile(r"^(train|validation)_\d{5,}\.(bin|idx)(\.tmp)?$")
_OWN_FILES = {MANIFEST, PROGRESS, "shards_verified.json", *MEGATRON_SIDE_FILES, *(f + ".tmp" for f in MEGATRON_SIDE_FILES)}
_ATOMIC_TMP = re.compile(r"^\.tmp-.*\.json$")  # atomic_files' temp files of an interrupted write


def _is_own_name(name: str) -> bool:
    return name in _OWN_FILES or name == TOKENIZER_DIR or bool(_OWN_SHARD.match(name) or _ATOMIC_TMP.match(name))


def _refuse_foreign_folder(out: Path) -> None:
    """--out must be new, empty, or data prep output (manifest.json / progress.json): then every file
    this tool cleans up is one it wrote."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose a folder for the shards")
    if not out.is_dir() or (out / MANIFEST).is_file() or (out / PROGRESS).is_file():
        return
    foreign = sorted(p.name for p in out.iterdir() if not _is_own_name(p.name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(f"--out {out} is not empty and holds no data prep output ({shown}); data prep writes only "
                         "into a new or empty folder (or its own earlier output): choose another --out")


@contextlib.contextmanager
def _removed_if_left_empty(out: Path) -> Iterator[None]:
    """Create ``out``; if the work inside fails and leaves it empty, remove it again (a bad
    --tokenizer must not leave an empty folder that looks like an output)."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _refuse_empty_output(out: Path, manifest: dict, num_inputs: int) -> None:
    """Zero documents is an error, not a finished run: remove what this run wrote and say why."""
    stats = manifest["stats"]
    if stats["documents_written"]:
        return
    _wipe(out)
    skipped = ", ".join(f"{n} {reason}" for reason, n in stats["skipped"].items()) or "nothing"
    raise ValueError(f"the inputs hold no documents ({num_inputs} file(s) read, {stats['documents_seen']} item(s) seen, "
                     f"skipped: {skipped}); nothing was written. Check the input paths, --format and --text-field.")


def _init_worker_inprocess(tok, dtype) -> None:
    global _worker_encoder
    _worker_encoder = tokenization.DocumentEncoder(tok, dtype)


def _new_stats() -> dict:
    return {"documents_seen": 0, "skipped": {}, "skip_examples": []}


def _previous_run(out: Path, config: dict, overwrite: bool) -> dict | None:
    """What an earlier run left in ``out``: a finished manifest, a progress file, or nothing."""
    for name, complete in ((MANIFEST, True), (PROGRESS, False)):
        path = out / name
        if not path.is_file():
            continue
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("config") == config:
            return {"complete": True, "manifest": saved} if complete else {"complete": False, "progress": saved}
        if not overwrite:
            raise ValueError(f"{out} already holds data prep output made with different settings ({name}); "
                             "choose another output folder or pass --overwrite to replace it")
        _wipe(out)
        return None
    return None


def _wipe(out: Path) -> None:
    """Remove this tool's output (and only that) from ``out``."""
    for p in out.iterdir():
        if p.is_file() and _is_own_name(p.name):
            p.unlink()
    tok_dir = out / TOKENIZER_DIR
    if tok_dir.is_dir():
        for name in tokenization._HF_FILES:
            (tok_dir / name).unlink(missing_ok=True)
        if not any(tok_dir.iterdir()):
            tok_dir.rmdir()


def _clean_unfinished(out: Path, state: dict) -> None:
    """Keep recorded shards that still validate; delete temp files and unrecorded shards."""
    keep = set()
    for split in SPLITS:
        for rec in state["shards"][split]:
            reader = ShardReader(out / rec["bin"])   # raises a clear error if a kept shard was damaged
            if reader.num_tokens != rec["num_tokens"]:
                raise ValueError(f"{out / rec['bin']} no longer matches progress.json; delete {out} and run again")
            keep.update((rec["bin"], rec["idx"]))
    for p in out.iterdir():
        if _OWN_SHARD.match(p.name) and p.name not in keep:   # shards and temp files of this tool only
            p.unlink()


def _setup_tokenizer(out: Path, tokenizer, train_kind, vocab_size, lowercase, files, text_field, max_doc_chars,
                     on_error, state):
    tok_dir = out / TOKENIZER_DIR
    if tokenizer is not None:
        tok = tokenization.load_tokenizer(tokenizer)
        tok_json = tokenization.save_tokenizer(tok, tok_dir, tokenizer)
        source = os.path.abspath(tokenizer)
    else:
        source = f"trained:{train_kind}"
        if state is not None and (tok_dir / "tokenizer.json").is_file():
            tok = tokenization.load_tokenizer(tok_dir)   # resuming: the vocabulary was trained already
        else:
            log.info("training a %s vocabulary of %d on the corpus", train_kind, vocab_size)
            tok = tokenization.train_tokenizer(_training_texts(files, text_field, max_doc_chars, on_error),
                                               train_kind, vocab_size, lowercase)
        tok_json = tokenization.save_tokenizer(tok, tok_dir)
    return tok, tokenization.tokenizer_identity(tok, tok_json, source)


def _training_texts(files, text_field, max_doc_chars, on_error) -> Iterator[str]:
    for item in iter_documents(files, text_field, max_doc_chars):
        if isinstance(item, Skip):
            if on_error == "fail" and item.reason not in ALWAYS_SKIPPED:
                raise ValueError(item.message)
            continue
        yield cleaning.wikitext_to_text(item.text) if item.kind == "wikitext" else item.text


def _chunks(items: Iterator[RawDoc | Skip], start: int) -> Iterator[list[tuple[int, RawDoc | Skip]]]:
    """Numbered items from doc id ``start`` on, grouped into tasks of ~_CHUNK_CHARS characters."""
    chunk: list[tuple[int, RawDoc | Skip]] = []
    chars = 0
    for doc_id, item in enumerate(items):
        if doc_id < start:
            continue   # resuming: these went into finished shards (cheap: no cleaning, no tokenizing)
        chunk.append((doc_id, item))
        chars += len(item.text) if isinstance(item, RawDoc) else 0
        if chars >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


class _Runner:
    """Consumes tokenized chunks in order and routes documents into per-split shard writers.

    Shards of all splits close together, right after the document that brings any split's open
    shard to ``shard_tokens``: one resume point (next doc id + stats snapshot) then serves every split.
    """

    def __init__(self, out: Path, state: dict, vocab_size: int, shard_tokens: int, valid_fraction: float,
                 seed: int, on_error: str):
        self.out, self.state, self.vocab_size = out, state, vocab_size
        self.shard_tokens, self.valid_fraction, self.seed, self.on_error = shard_tokens, valid_fraction, seed, on_error
        self.start = self.seen = state["next_doc"]   # seen: one past the last doc id consumed
        self.stats = copy.deepcopy(state["stats"])
        self.writers: dict[str, ShardWriter | None] = {s: None for s in SPLITS}

    def run(self, submit, chunks: Iterator[list], max_inflight: int, progress: bool) -> None:
        """``submit(chunk)`` -> a handle whose ``get()`` gives (lengths, tokens) of the chunk's RawDocs."""
        pending: collections.deque = collections.deque()
        bar = tqdm(desc="data prep", unit="doc", disable=not progress, smoothing=0.1)
        tokens_total = 0
        try:
            for chunk in chunks:
                pending.append((chunk, submit(chunk)))
                while len(pending) >= max_inflight:   # bounded: memory stays flat whatever the corpus size
                    tokens_total += self._consume(*pending.popleft(), bar)
                    bar.set_postfix(tokens=tokens_total, refresh=False)
            while pending:
                tokens_total += self._consume(*pending.popleft(), bar)
                bar.set_postfix(tokens=tokens_total, refresh=False)
        finally:
            bar.close()

    def _consume(self, chunk: list, result, bar) -> int:
        lengths, tokens = result.get()
        bar.update(len(chunk))
        docs = [(doc_id, item) for doc_id, item in chunk if isinstance(item, RawDoc)]
        doc_ids = np.array([doc_id for doc_id, _ in docs], dtype=np.int64)
        skips = [(doc_id, item.reason, item.message) for doc_id, item in chunk if isinstance(item, Skip)]
        for i in np.flatnonzero(lengths == 0):
            doc_id, item = docs[i]
            skips.append((doc_id, "empty", f"{item.source}: document {item.ordinal} has no tokens (empty after cleaning)"))
        skips.sort()
        for _, reason, message in skips:
            if reason not in ALWAYS_SKIPPED and self.on_error == "fail":
                raise ValueError(message)
        chunk_ids = [doc_id for doc_id, _ in chunk]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        keep = np.flatnonzero(lengths > 0)
        to_val = _is_validation(doc_ids[keep], self.seed, self.valid_fraction)
        pos = 0
        while pos < len(keep):
            # Tokens each split's open shard would hold after each remaining document.
            fill = {}
            for split, is_split in (("train", ~to_val[pos:]), ("validation", to_val[pos:])):
                writer = self.writers[split]
                fill[split] = (writer.num_tokens if writer else 0) + np.cumsum(lengths[keep[pos:]] * is_split)
            full = np.flatnonzero((fill["train"] >= self.shard_tokens) | (fill["validation"] >= self.shard_tokens))
            end = pos + (int(full[0]) + 1 if len(full) else len(keep) - pos)
            for split, mask in (("train", ~to_val[pos:end]), ("validation", to_val[pos:end])):
                sel = keep[pos:end][mask]
                if len(sel):
                    self._writer(split).add(lengths[sel], _gather(tokens, offsets, sel), doc_ids[sel])
            if len(full):
                snapshot = copy.deepcopy(self.stats)
                self._count(snapshot, chunk_ids, skips, upto=int(doc_ids[keep[end - 1]]))
                self._close_all(int(doc_ids[keep[end - 1]]) + 1, snapshot)
            pos = end
        self._count(self.stats, chunk_ids, skips, upto=None)
        self.seen = chunk_ids[-1] + 1
        return int(lengths.sum())

    def _count(self, stats: dict, chunk_ids: list[int], skips: list, upto: int | None) -> None:
        """Add this chunk's items with doc id <= upto (all if None) to ``stats``."""
        stats["documents_seen"] += len(chunk_ids) if upto is None else int(np.searchsorted(chunk_ids, upto, "right"))
        for doc_id, reason, message in skips:
            if upto is not None and doc_id > upto:
                break
            stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
            if reason not in ALWAYS_SKIPPED and len(stats["skip_examples"]) < _MAX_SKIP_EXAMPLES:
                stats["skip_examples"].append(message)

    def _writer(self, split: str) -> ShardWriter:
        if self.writers[split] is None:
            name = f"{split}_{len(self.state['shards'][split]):05d}"
            self.writers[split] = ShardWriter(self.out, name, self.vocab_size)
        return self.writers[split]

    def _close_all(self, next_doc: int, stats_snapshot: dict) -> None:
        for split in SPLITS:
            if self.writers[split] is not None:
                self.state["shards"][split].append(self.writers[split].close())
                self.writers[split] = None
        self.state["next_doc"] = next_doc
        self.state["stats"] = stats_snapshot
        _write_json_atomic(self.out / PROGRESS, self.state)

    def abort(self) -> None:
        for split, writer in self.writers.items():
            if writer is not None:
                writer.abort()
                self.writers[split] = None

    def finish(self, identity: dict, config: dict, missing: list[str], dtype: np.dtype) -> dict:
        # Recorded as fully consumed, so a crash before manifest.json is written resumes with no work.
        self._close_all(self.seen, copy.deepcopy(self.stats))
        stats = self.stats
        stats["skipped"] = dict(sorted(stats["skipped"].items()))
        if missing:
            stats["skipped"]["missing_path"] = len(missing)
            stats["missing_paths"] = missing
        splits = {}
        for split in SPLITS:
            shards = self.state["shards"][split]
            splits[split] = {"num_docs": sum(r["num_docs"] for r in shards),
                             "num_tokens": sum(r["num_tokens"] for r in shards), "shards": shards}
        stats["documents_written"] = sum(s["num_docs"] for s in splits.values())
        return {"format": "pkm-token-shards", "format_version": FORMAT_VERSION, "dtype": np.dtype(dtype).name,
                "tokenizer": identity, "tokenizer_dir": TOKENIZER_DIR, "splits": splits, "stats": stats,
                "config": config}


def _gather(tokens: np.ndarray, offsets: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """Concatenated tokens of the selected documents (vectorised; no per-document Python work)."""
    if len(sel) == len(offsets) - 1:
        return tokens
    starts, ends = offsets[sel], offsets[sel + 1]
    sizes = ends - starts
    idx = np.repeat(starts - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes) + np.arange(int(sizes.sum()))
    return tokens[idx]


def _report(manifest: dict) -> None:
    stats = manifest["stats"]
    sp = manifest["splits"]
    log.info("data prep: %d documents written (train %d docs / %d tokens, validation %d docs / %d tokens)",
             stats["documents_written"], sp["train"]["num_docs"], sp["train"]["num_tokens"],
             sp["validation"]["num_docs"], sp["validation"]["num_tokens"])
    if stats["skipped"]:
        log.warning("data prep skipped %s; details in manifest.json stats.skip_examples",
                    ", ".join(f"{n} {reason}" for reason, n in stats["skipped"].items()))
