"""MLM data over the shards written by ``data_prep``: packing, dynamic masking, sampler, collate,
and the training stream that owns the data position.

API for the pretraining loop::

    from pretrain.data import MLMDataset, MLMSampler, TrainStream

    ds = MLMDataset("data/shards", split="train", max_seq_len=128, packing="full",
                    mask_prob=0.15, whole_word_masking=False, seed=1234)
    sampler = MLMSampler(len(ds), rank=rank, world_size=world, seed=1234, shuffle=True,
                         consumed_samples=train_state.samples_seen)   # global samples consumed so far
    loader = torch.utils.data.DataLoader(ds, batch_size=micro_batch, sampler=sampler,
                                         collate_fn=ds.collate, num_workers=1)
    batch = next(iter(loader))   # {input_ids, attention_mask, token_type_ids, labels}: LongTensor [B, S]

    stream = TrainStream.from_config(run_config, micro_batch, rank, world)   # what the trainer uses
    batch = stream.next_batch()  # the same, plus the index lists of masked and real positions
    stream.state_dict()          # the data position, for a checkpoint; load_state_dict resumes there

Packing (``packing``):
  * ``"full"`` (RoBERTa FULL-SENTENCES): the split is one token stream, documents joined by an extra
    [SEP]; sample i is ``[CLS] stream[i*w:(i+1)*w] [SEP]`` with ``w = max_seq_len - 2``. Every sample
    but the last is full length.
  * ``"doc"`` (DOC-SENTENCES): samples never cross a document; a document of n tokens gives
    ceil(n / w) samples, the last one shorter (padded by the collate).
Sample boundaries are precomputed with numpy at construction, so ``ds[i]`` is O(1): one or two
contiguous memmap slices, no search.

Masking (BERT): each non-special position is selected with probability ``mask_prob`` (with
``whole_word_masking``, whole words are selected together: WordPiece "##" pieces or SentencePiece
pieces without the "\u2581" word-start mark join the previous token); selected positions become
[MASK] 80%, a random non-special token 10%, unchanged 10%. ``labels`` hold the original id at selected
positions and -100 elsewhere. The randomness comes from a generator seeded by (seed, epoch, sample
index), so a sample's mask is reproducible and differs between epochs. ``ds[(epoch, i)]`` picks the
epoch (this is what :class:`MLMSampler` yields); ``ds[i]`` uses ``ds.epoch``.

Sampler: a global stream of samples, epoch after epoch, each epoch a permutation seeded by (seed,
epoch); global position g goes to rank ``g % world_size``. So every epoch covers every sample exactly
once across ranks, all ranks get the same number of samples, and resuming is exact at sample
granularity from the number of global samples consumed (independent of the world size). With a
DataLoader that prefetches, the sampler runs ahead of training, so the sampler does not track a
position: ``consumed_samples`` is only where it starts. The data position has one owner,
:class:`TrainStream`, which counts the samples the loop actually consumed; a checkpoint stores its
``state_dict()`` and a resume rebuilds the sampler from that count.
"""
from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from data_prep import load_manifest, open_split

IGNORE_INDEX = -100
PACKING_MODES = ("full", "doc")
VERIFIED_CACHE = "shards_verified.json"  # per-shard results of check_shards, keyed by file size + mtime
SCAN_POLL_S = 2.0  # check_shards_once: how often the ranks ask whether the scan is done


# ---------------------------------------------------------------- checks before training


def _file_stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def _read_verified_cache(shard_dir: Path) -> dict:
    try:
        return json.loads((shard_dir / VERIFIED_CACHE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_verified_cache(shard_dir: Path, cache: dict) -> None:
    from atomic_files import write_json_atomic

    try:
        write_json_atomic(shard_dir / VERIFIED_CACHE, cache, sort_keys=True)
    except OSError:  # a read-only data folder: the checks simply run again next time
        pass


def data_fingerprint(shard_dir: str | Path, split: str) -> str:
    """SHA-256 over the manifest's record of a split (every shard's checksums, in order) and the
    tokenizer's: equal for the same token data wherever the folder lies, different for other data."""
    import hashlib

    manifest = load_manifest(shard_dir)
    shards = [[r["sha256_bin"], r["sha256_idx"]] for r in manifest["splits"][split]["shards"]]
    record = json.dumps({"tokenizer": manifest["tokenizer"].get("sha256"), "shards": shards}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()


def check_shards(shard_dir: str | Path, splits: Sequence[str], vocab_size: int, verify_checksums: bool = False) -> None:
    """Raise ValueError naming the file unless every shard of ``splits`` is usable by a model with
    ``vocab_size`` token ids: headers, versions, dtypes, file sizes and index consistency (always,
    cheap), every token id below ``vocab_size`` (one pass over each shard: the maximum id is cached
    per file size + mtime in ``shards_verified.json``), and with ``verify_checksums`` the SHA-256 of
    both files against manifest.json (also cached, so a shard is hashed once while it is unchanged).
    Meant to run before any model or process group is built."""
    from data_prep.shards import file_sha256

    shard_dir = Path(shard_dir)
    manifest = load_manifest(shard_dir)
    cache, changed = _read_verified_cache(shard_dir), False
    for split in splits:
        for reader, rec in zip(open_split(shard_dir, split), manifest["splits"][split]["shards"]):
            stamp = _file_stamp(reader.bin_path) + _file_stamp(reader.idx_path)
            entry = cache.get(rec["bin"])
            if not entry or entry.get("stamp") != stamp:
                entry = {"stamp": stamp, "max_token": int(reader.tokens.max()) if reader.num_tokens else -1}
                cache[rec["bin"]], changed = entry, True
            if entry["max_token"] >= vocab_size:
                raise ValueError(
                    f"{reader.bin_path} holds token id {entry['max_token']}, but the vocabulary has {vocab_size} ids "
                    f"(0..{vocab_size - 1}): the shard is corrupt or was prepared with another tokenizer; re-run data prep.")
            if verify_checksums and not entry.get("sha256_verified"):
                for key, path in (("sha256_bin", reader.bin_path), ("sha256_idx", reader.idx_path)):
                    if file_sha256(path) != rec[key]:
                        raise ValueError(f"{path} fails its manifest.json checksum: the file changed after data prep; "
                                         "re-run data prep.")
                entry["sha256_verified"], changed = True, True
    if changed:
        _write_verified_cache(shard_dir, cache)


def check_shards_once(shard_dir: str | Path, splits: Sequence[str], vocab_size: int,
                      verify_checksums: bool = False) -> None:
    """``check_shards`` for a multi-rank run: one rank per view of the shard folder scans, the others
    wait for its verdict, so a corpus on shared storage is read (and hashed) once, not once per rank.

    Collective once a process group is up (every rank calls it; otherwise it is ``check_shards``).
    When every rank sees a file that rank 0 writes in ``shard_dir`` (``folder_is_shared``: one folder
    on shared storage), rank 0 scans; otherwise (node-local copies, or a folder rank 0 cannot write
    in) the lowest rank of each host scans that host's copy. The verdict travels to every rank
    (``first_failure``: each rank raises the first scanner's error), so it holds for a read-only
    folder too; the scanner's ``shards_verified.json`` cache keeps the next start cheap. The others
    wait in rounds of a quick collective every SCAN_POLL_S, so a long first scan (checksums of a
    large corpus) never runs into the process group's timeout."""
    import socket
    import threading
    import time

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        check_shards(shard_dir, splits, vocab_size, verify_checksums=verify_checksums)
        return
    from pretrain.shared_storage import all_gather_objects, all_hosts, first_failure, folder_is_shared

    rank = dist.get_rank()
    if folder_is_shared(str(shard_dir)):
        scanner = rank == 0
    else:
        hosts = all_hosts()
        scanner = hosts.index(socket.gethostname()) == rank  # the lowest rank on this host
    outcome: dict[str, str | None] = {}

    def scan() -> None:
        try:
            check_shards(shard_dir, splits, vocab_size, verify_checksums=verify_checksums)
            outcome["error"] = None
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            outcome["error"] = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"

    worker = threading.Thread(target=scan, name="check_shards", daemon=True) if scanner else None
    if worker is not None:
        worker.start()
    # Wait in short rounds, each a quick collective: a first scan with checksums of a large corpus may
    # take longer than the process group's timeout, which a single collective would hit.
    while True:
        done = worker is None or not worker.is_alive()
        if all(all_gather_objects(done)):
            break
        time.sleep(SCAN_POLL_S)
    first_failure(outcome.get("error"))


class ShardedTokens:
    """The shards of one split as one virtual token array (documents in order)."""

    def __init__(self, shard_dir: str | Path, split: str):
        self.shard_dir, self.split = str(shard_dir), split
        readers = open_split(shard_dir, split)
        if not readers or sum(r.num_docs for r in readers) == 0:
            raise ValueError(f"split {split!r} in {shard_dir} has no documents; "
                             "prepare more data or raise --valid-fraction for a validation split")
        self.doc_lengths = np.concatenate([r.lengths for r in readers]).astype(np.int64)
        self.doc_starts = np.zeros(len(self.doc_lengths) + 1, np.int64)
        np.cumsum(self.doc_lengths, out=self.doc_starts[1:])
        self.shard_starts = np.zeros(len(readers) + 1, np.int64)
        np.cumsum([r.num_tokens for r in readers], out=self.shard_starts[1:])
        self.num_tokens = int(self.doc_starts[-1])
        self._readers = readers

    def __getstate__(self) -> dict:
        # DataLoader workers: re-open the memmaps in the child instead of pickling their contents.
        state = self.__dict__.copy()
        state["_readers"] = None
        return state

    def _shards(self):
        if self._readers is None:
            self._readers = open_split(self.shard_dir, self.split)
        return self._readers

    def read(self, start: int, end: int) -> np.ndarray:
        """Tokens [start, end) of the split, as int64 (crosses shard borders when needed)."""
        shards = self._shards()
        k = int(np.searchsorted(self.shard_starts, start, "right")) - 1
        pieces = []
        while start < end:
            local_end = min(end, int(self.shard_starts[k + 1]))
            base = int(self.shard_starts[k])
            pieces.append(shards[k].tokens[start - base: local_end - base])
            start, k = local_end, k + 1
        if len(pieces) == 1:
            return pieces[0].astype(np.int64)
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


class MLMDataset(torch.utils.data.Dataset):
    """Packed, dynamically masked MLM samples over a data_prep shard folder (see module docstring)."""

    def __init__(self, shard_dir: str | Path, split: str = "train", max_seq_len: int = 128, packing: str = "full",
                 mask_prob: float = 0.15, whole_word_masking: bool = False, seed: int = 0,
                 mask_token_prob: float = 0.8, random_token_prob: float = 0.1):
        if packing not in PACKING_MODES:
            raise ValueError(f"packing must be one of {', '.join(PACKING_MODES)}, got {packing!r}")
        if max_seq_len < 3:
            raise ValueError(f"max_seq_len must be at least 3 ([CLS] token [SEP]), got {max_seq_len}")
        if not 0.0 < mask_prob < 1.0 or mask_token_prob < 0 or random_token_prob < 0 or mask_token_prob + random_token_prob > 1:
            raise ValueError("mask_prob must be in (0, 1) and mask_token_prob + random_token_prob <= 1")
        self.max_seq_len, self.packing, self.seed, self.epoch = max_seq_len, packing, seed, 0
        self.mask_prob, self.whole_word_masking = mask_prob, whole_word_masking
        self.mask_token_prob, self.random_token_prob = mask_token_prob, random_token_prob
        manifest = load_manifest(shard_dir)
        tok = manifest["tokenizer"]
        special = tok["special_tokens"]
        self.cls_id, self.sep_id, self.pad_id, self.mask_id = special["cls"], special["sep"], special["pad"], special["mask"]
        self.tokenizer_dir = str(Path(shard_dir) / manifest["tokenizer_dir"])
        self.vocab_size = int(tok["vocab_size"])
        self.tokens = ShardedTokens(shard_dir, split)
        self._build_vocab_tables(tok)
        self._build_index()

    # ------------------------------------------------------------ construction

    def _build_vocab_tables(self, tok: dict) -> None:
        vocab_path = Path(self.tokenizer_dir) / "tokenizer.json"
        specials = set(tok["special_tokens"].values())
        word_start = np.ones(self.vocab_size, bool)
        if vocab_path.is_file():
            data = json.loads(vocab_path.read_text(encoding="utf-8"))
            specials.update(t["id"] for t in data.get("added_tokens", []) if t.get("special"))
            if self.whole_word_masking:
                from tokenizers import Tokenizer   # only needed to read the vocabulary strings
                vocab = Tokenizer.from_file(str(vocab_path)).get_vocab(with_added_tokens=True)
                ids = np.fromiter(vocab.values(), np.int64, len(vocab))
                if "continuation_prefix" in tok:
                    prefix = tok["continuation_prefix"]
                    starts = np.fromiter((not t.startswith(prefix) for t in vocab), bool, len(vocab))
                else:
                    prefix = tok.get("word_start_prefix", "\u2581")
                    starts = np.fromiter((t.startswith(prefix) for t in vocab), bool, len(vocab))
                word_start[ids[ids < self.vocab_size]] = starts[ids < self.vocab_size]
        elif self.whole_word_masking:
            raise ValueError(f"whole-word masking needs the vocabulary in {vocab_path}, which is missing")
        self.special_ids = np.array(sorted(specials), np.int64)
        self.is_special = np.zeros(self.vocab_size, bool)
        self.is_special[self.special_ids] = True
        self.is_word_start = word_start | self.is_special
        # Random replacements come from ordinary tokens only (never [CLS]/[PAD]/...).
        self.random_pool = np.flatnonzero(~self.is_special)

    def _build_index(self) -> None:
        w = self.max_seq_len - 2
        lengths, starts = self.tokens.doc_lengths, self.tokens.doc_starts
        if self.packing == "full":
            # Stream = docs with one [SEP] after each; stream position of each doc's separator:
            sep_pos = starts[1:] + np.arange(len(lengths))
            total = int(sep_pos[-1]) + 1
            n = -(-total // w)
            bounds = np.minimum(np.arange(n + 1, dtype=np.int64) * w, total)
            self._bounds = bounds                                         # stream [bounds[i], bounds[i+1])
            self._seps_before = np.searchsorted(sep_pos, bounds, "left")  # separators before each bound
            self._sep_pos = sep_pos
            self._num_samples = n
        else:
            per_doc = -(-lengths // w)
            n = int(per_doc.sum())
            doc = np.repeat(np.arange(len(lengths)), per_doc)
            first = np.concatenate([[0], np.cumsum(per_doc)[:-1]])
            offset = (np.arange(n) - first[doc]) * w
            self._starts = starts[doc] + offset
            self._lengths = np.minimum(w, lengths[doc] - offset)
            self._num_samples = n

    # ------------------------------------------------------------ access

    def __len__(self) -> int:
        return self._num_samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def sample_tokens(self, index: int) -> np.ndarray:
        """Unmasked ``[CLS] ... [SEP]`` ids of sample ``index`` (int64)."""
        if not 0 <= index < self._num_samples:
            raise IndexError(f"sample {index} out of range ({self._num_samples} samples)")
        if self.packing == "full":
            s, e = int(self._bounds[index]), int(self._bounds[index + 1])
            k, k2 = int(self._seps_before[index]), int(self._seps_before[index + 1])
            body = self.tokens.read(s - k, e - k2)   # real tokens: the window minus its separators
            if k2 > k:   # document separators inside the window
                body = np.insert(body, self._sep_pos[k:k2] - s - np.arange(k2 - k), self.sep_id)
        else:
            start = int(self._starts[index])
            body = self.tokens.read(start, start + int(self._lengths[index]))
        out = np.empty(len(body) + 2, np.int64)
        out[0], out[-1] = self.cls_id, self.sep_id
        out[1:-1] = body
        return out

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, np.ndarray]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        ids = self.sample_tokens(int(index))
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        input_ids, labels = self.mask(ids, rng)
        return {"input_ids": input_ids, "labels": labels}

    def mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """BERT masking of one sample (vectorised over its tokens)."""
        n = len(ids)
        candidate = ~self.is_special[ids]
        if self.whole_word_masking:
            word = np.cumsum(self.is_word_start[ids]) - 1   # pieces share their word's draw
            selected = (rng.random(int(word[-1]) + 1) < self.mask_prob)[word] & candidate
        else:
            selected = (rng.random(n) < self.mask_prob) & candidate
        action = rng.random(n)
        random_ids = self.random_pool[rng.integers(0, len(self.random_pool), n)]
        input_ids = ids.copy()
        to_mask = selected & (action < self.mask_token_prob)
        to_random = selected & (action >= self.mask_token_prob) & (action < self.mask_token_prob + self.random_token_prob)
        input_ids[to_mask] = self.mask_id
        input_ids[to_random] = random_ids[to_random]
        labels = np.where(selected, ids, IGNORE_INDEX)
        return input_ids, labels

    def collate(self, samples: Sequence[dict[str, np.ndarray]], with_positions: bool = False) -> dict[str, torch.Tensor]:
        return collate_mlm(samples, pad_token_id=self.pad_id, with_positions=with_positions)


def add_positions(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the flat (row-major, ``b * S + s``) indices of the predicted positions
    (``masked_positions`` [M], labels != -100) and of the real tokens (``token_positions`` [T],
    attention_mask == 1) to a CPU batch, in place.

    Computed here, on the host where the batch is made, so that the model can gather those rows
    with an index of known length instead of a boolean mask, whose length a GPU only knows after a
    host sync (``nonzero``). The order is the boolean mask's, so ``x.view(B * S, -1)[positions]``
    equals ``x[mask]`` row for row."""
    batch["masked_positions"] = torch.nonzero(batch["labels"].reshape(-1) != IGNORE_INDEX).reshape(-1)
    batch["token_positions"] = torch.nonzero(batch["attention_mask"].reshape(-1)).reshape(-1)
    return batch


def collate_mlm(samples: Sequence[dict[str, np.ndarray]], pad_token_id: int = 0,
                pad_to_multiple_of: int | None = None, with_positions: bool = False) -> dict[str, torch.Tensor]:
    """Pad samples into the model input dict: input_ids, attention_mask, token_type_ids, labels [B, S]
    (and, ``with_positions``, the index lists of :func:`add_positions`)."""
    lengths = np.array([len(s["input_ids"]) for s in samples], np.int64)
    width = int(lengths.max())
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    valid = np.arange(width)[None, :] < lengths[:, None]   # [B, S]; row-major matches concatenation order
    input_ids = np.full((len(samples), width), pad_token_id, np.int64)
    labels = np.full((len(samples), width), IGNORE_INDEX, np.int64)
    input_ids[valid] = np.concatenate([s["input_ids"] for s in samples])
    labels[valid] = np.concatenate([s["labels"] for s in samples])
    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "attention_mask": torch.from_numpy(valid.astype(np.int64)),
        "token_type_ids": torch.zeros((len(samples), width), dtype=torch.long),
        "labels": torch.from_numpy(labels),
    }
    return add_positions(batch) if with_positions else batch


class MLMSampler(torch.utils.data.Sampler):
    """Distributed, resumable sampler yielding ``(epoch, index)`` keys (see module docstring)."""

    def __init__(self, num_samples: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 consumed_samples: int = 0, num_epochs: int | None = None):
        if num_samples <= 0:
            raise ValueError(f"the dataset has no samples (num_samples={num_samples})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        if consumed_samples < 0 or (num_epochs is not None and num_epochs <= 0):
            raise ValueError("consumed_samples must be >= 0 and num_epochs positive (or None for an endless stream)")
        self.num_samples, self.rank, self.world_size = num_samples, rank, world_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        self.consumed_samples = consumed_samples
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle
                          else np.arange(self.num_samples))
            self._perm_epoch = epoch
        return self._perm

    def _end(self) -> float:
        return float("inf") if self.num_epochs is None else self.num_epochs * self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        base, end = self.consumed_samples, self._end()
        while base + self.rank < end:
            g = base + self.rank
            epoch = g // self.num_samples
            index = int(self._permutation(epoch)[g % self.num_samples])
            base += self.world_size
            yield epoch, index

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless MLMSampler (num_epochs=None) has no length; train for a number of steps")
        remaining = self._end() - self.consumed_samples - self.rank
        return max(0, -(-int(remaining) // self.world_size))


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel SIGKILLs this process when the thread that forked it ends, so a worker never
    outlives its rank (a rank that fails exits without shutting its loader down: pretrain.main)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: torch's worker watchdog still ends it within seconds
        return
    if os.getppid() != parent_pid:  # the rank died before the line above: nothing would signal us
        os._exit(0)


def stop_signal_safe_worker_init(parent_pid: int, worker_id: int) -> None:  # noqa: ARG001
    """``worker_init_fn`` of the training loader: a DataLoader worker ignores SIGTERM and SIGINT.

    A stop signal often reaches the whole process group or the whole process tree, workers included:
    Ctrl-C, Slurm's scancel, a preemption, DeepSpeed's launcher terminating its children. A worker
    killed by it would make torch's SIGCHLD handler raise "DataLoader worker ... is killed by
    signal" in the rank before the rank's stop flag (pretrain/stop_flag.py) could save a checkpoint.
    Ignoring it, the worker goes on serving batches until the rank has saved and shuts the loader
    down (``TrainStream.close``); and it dies with its rank if the rank dies first."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)


class TrainStream:
    """An endless, resumable stream of this rank's micro-batches (MLMDataset + MLMSampler + DataLoader).

    The data position is the number of *global* samples the loop has consumed (counted here, not
    read from the sampler, which a prefetching DataLoader runs ahead of); resuming rebuilds the
    loader at that position, and since masks are seeded per (seed, epoch, index) the batches after
    a resume are the ones the uninterrupted run would have seen.
    """

    def __init__(self, shard_dir: str, split: str, max_seq_len: int, packing: str, mask_prob: float,
                 whole_word_masking: bool, seed: int, micro_batch: int, rank: int, world_size: int,
                 num_workers: int = 0, pin_memory: bool | None = None) -> None:
        self.dataset = MLMDataset(shard_dir, split=split, max_seq_len=max_seq_len, packing=packing,
                                  mask_prob=mask_prob, whole_word_masking=whole_word_masking, seed=seed)
        self.seed, self.micro_batch = seed, micro_batch
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        # page-locked batches let the trainer's non_blocking copies to a GPU run asynchronously
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.consumed_samples = 0
        self._iter: Any = None

    @classmethod
    def from_config(cls, cfg: Any, micro_batch: int, rank: int, world_size: int,
                    pin_memory: bool | None = None) -> "TrainStream":
        """The training split of a run config (``pretrain.config.RunConfig``), this rank's share."""
        d = cfg.data
        return cls(d.shard_dir, d.train_split, d.max_seq_len, d.packing, d.mlm_probability, d.whole_word_masking,
                   cfg.train.seed, micro_batch, rank, world_size, d.num_workers, pin_memory=pin_memory)

    def _start(self) -> None:
        sampler = MLMSampler(len(self.dataset), rank=self.rank, world_size=self.world_size, seed=self.seed,
                             shuffle=True, consumed_samples=self.consumed_samples)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.micro_batch, sampler=sampler,
            # with the index lists of the masked positions and real tokens: a GPU step needs no host sync
            collate_fn=functools.partial(self.dataset.collate, with_positions=True),
            num_workers=self.num_workers, persistent_workers=False, pin_memory=self.pin_memory,
            # its own generator: creating an iterator draws a base seed, which from the global RNG
            # would shift the dropout stream of a resumed run (the loader is rebuilt on resume)
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=functools.partial(stop_signal_safe_worker_init, os.getpid()) if self.num_workers else None,
        )
        self._iter = iter(loader)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._iter is None:
            self._start()
        batch = next(self._iter)
        self.consumed_samples += self.micro_batch * self.world_size
        return batch

    def close(self) -> None:
        """Shut the loader's workers down (they exit only when told: they ignore stop signals). The
        data position stays; the next ``next_batch`` starts a new loader there."""
        self._iter = None  # the last reference: the iterator's __del__ stops and joins its workers

    @property
    def epoch(self) -> int:
        return self.consumed_samples // len(self.dataset)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples, "num_samples": len(self.dataset), "seed": self.seed,
                "micro_batch": self.micro_batch, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples", len(self.dataset)) != len(self.dataset) or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                "the checkpoint's data position was saved for another dataset or seed "
                f"({state.get('num_samples')} samples, seed {state.get('seed')}; now {len(self.dataset)}, "
                f"{self.seed}): resume with the same data.shard_dir, data.max_seq_len and train.seed."
            )
        self.consumed_samples = int(state["consumed_samples"])
        self._iter = None
