"""Megatron-LM / NeMo indexed corpora: import into shards, export back, exact round trips.

The Megatron files here are built by the test itself from the published layout
(megatron/core/datasets/indexed_dataset.py: MMIDIDX header, int32 sequence lengths, int64 byte
pointers, int64 document indices), with struct and numpy, never with data_prep's writer.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from data_prep import open_split, prepare
from data_prep.__main__ import main as cli_main
from data_prep.megatron import export_megatron, import_megatron
from tests.test_data_prep import MINILM, _docs, _write_jsonl, crash_at_shard_close

VOCAB = 30522   # MiniLM's (bert-base-uncased) vocabulary
CODES = {"uint16": 8, "int32": 4, "int64": 5, "uint8": 1, "float32": 7}


def write_megatron(prefix: Path, documents: list[list[list[int]]], dtype: str = "uint16", modes: bool = False,
                   pointer_shift: int = 0) -> Path:
    """PREFIX.bin/.idx from the layout: documents -> sequences -> token ids."""
    itemsize = np.dtype(dtype).itemsize
    lengths, doc_index, data = [], [0], []
    for doc in documents:
        for seq in doc:
            lengths.append(len(seq))
            data.extend(seq)
        doc_index.append(len(lengths))
    pointers, pos = [], 0
    for n in lengths:
        pointers.append(pos)
        pos += n * itemsize
    if pointer_shift and pointers:
        pointers[-1] += pointer_shift
    prefix.with_name(prefix.name + ".bin").write_bytes(np.array(data, dtype=dtype).tobytes())
    idx = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", CODES[dtype])
           + struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(doc_index))
           + struct.pack(f"<{len(lengths)}i", *lengths) + struct.pack(f"<{len(pointers)}q", *pointers)
           + struct.pack(f"<{len(doc_index)}q", *doc_index) + (bytes(len(lengths)) if modes else b""))
    prefix.with_name(prefix.name + ".idx").write_bytes(idx)
    return prefix


def read_megatron(prefix: Path) -> tuple[str, list[list[list[int]]]]:
    """The independent reader: (dtype name, documents -> sequences -> ids) from the layout."""
    idx = prefix.with_name(prefix.name + ".idx").read_bytes()
    assert idx[:9] == b"MMIDIDX\x00\x00" and struct.unpack_from("<Q", idx, 9)[0] == 1
    code, = struct.unpack_from("<B", idx, 17)
    n_seq, n_doc = struct.unpack_from("<QQ", idx, 18)
    lengths = struct.unpack_from(f"<{n_seq}i", idx, 34)
    pointers = struct.unpack_from(f"<{n_seq}q", idx, 34 + 4 * n_seq)
    doc_index = struct.unpack_from(f"<{n_doc}q", idx, 34 + 12 * n_seq)
    assert len(idx) == 34 + 12 * n_seq + 8 * n_doc
    dtype = {v: k for k, v in CODES.items()}[code]
    data = prefix.with_name(prefix.name + ".bin").read_bytes()
    itemsize = np.dtype(dtype).itemsize
    seqs = [np.frombuffer(data, dtype, n, p).tolist() for n, p in zip(lengths, pointers)]
    return dtype, [seqs[a:b] for a, b in zip(doc_index[:-1], doc_index[1:])]


def _sentence_corpus(n_docs: int = 40, seed: int = 0) -> list[list[list[int]]]:
    rng = np.random.default_rng(seed)
    return [[rng.integers(1000, VOCAB, size=int(rng.integers(1, 30))).tolist() for _ in range(int(rng.integers(1, 6)))]
            for _ in range(n_docs)]


def _files(prefix: Path) -> dict[str, bytes]:
    return {s: prefix.with_name(prefix.name + s).read_bytes() for s in (".bin", ".idx")}


def _docs_in_order(out: Path) -> dict[int, list[int]]:
    found = {}
    for split in ("train", "validation"):
        for reader in open_split(out, split, verify_checksums=True):
            for i, doc_id in enumerate(reader.doc_ids):
                found[int(doc_id)] = reader.doc(i).tolist()
    return dict(sorted(found.items()))


KW = dict(tokenizer=MINILM, shard_tokens=200, valid_fraction=0.2, progress=False)


def test_import_gives_the_documents(tmp_path):
    corpus = _sentence_corpus()
    corpus[7] = []            # an empty document (no sequences) ...
    corpus[8] = [[], []]      # ... and one of empty sequences: skipped and counted, as prepare does
    prefix = write_megatron(tmp_path / "wiki_text_sentence", corpus)
    manifest = import_megatron(prefix, tmp_path / "out", **KW)
    assert manifest["dtype"] == "uint16" and len(manifest["splits"]["train"]["shards"]) > 2
    assert manifest["splits"]["validation"]["num_docs"] > 0 and manifest["stats"]["skipped"] == {"empty": 2}
    expected = {i: [t for seq in doc for t in seq] for i, doc in enumerate(corpus) if sum(map(len, doc))}
    assert _docs_in_order(tmp_path / "out") == expected
    assert manifest["megatron"]["num_sequences"] == sum(map(len, corpus))
    # The tokenizer the ids belong to travels with the shards, as after prepare.
    assert (tmp_path / "out" / "tokenizer" / "tokenizer.json").is_file()
    assert manifest["tokenizer"]["vocab_size"] == VOCAB


@pytest.mark.parametrize("layout", ["sentences", "documents", "int32", "with_empty_documents"])
def test_import_then_export_gives_the_same_bytes(tmp_path, layout):
    corpus = _sentence_corpus(seed=3)
    dtype = "int32" if layout == "int32" else "uint16"
    if layout in ("documents", "int32"):
        corpus = [[[t for seq in doc for t in seq]] for doc in corpus]   # one sequence per document
    if layout == "with_empty_documents":
        corpus[0], corpus[5], corpus[-1] = [], [[]], [[1, 2], []]
    original = write_megatron(tmp_path / "orig", corpus, dtype)
    manifest = import_megatron(original, tmp_path / "out", **KW)
    assert (manifest["megatron"]["sequence_files"] is None) == (layout in ("documents", "int32"))
    summary = export_megatron(tmp_path / "out", tmp_path / "exported")
    assert summary["dtype"] == dtype
    assert _files(tmp_path / "exported") == _files(original)


def test_export_then_import_gives_the_same_documents(tmp_path):
    docs = _docs(50)
    docs[4] = ""   # skipped by prepare: doc ids have a gap, the export closes it
    prepare(_write_jsonl(tmp_path / "c.jsonl", docs), tmp_path / "prepared", **KW, workers=0)
    prepared = _docs_in_order(tmp_path / "prepared")
    export_megatron(tmp_path / "prepared", tmp_path / "corpus")
    dtype, exported = read_megatron(tmp_path / "corpus")
    assert dtype == "uint16"   # Megatron's rule for a vocabulary below 65,500
    assert exported == [[tokens] for tokens in prepared.values()]   # one sequence per document, in order

    import_megatron(tmp_path / "corpus", tmp_path / "imported", **KW)
    assert list(_docs_in_order(tmp_path / "imported").values()) == list(prepared.values())
    export_megatron(tmp_path / "imported", tmp_path / "again")
    assert _files(tmp_path / "again") == _files(tmp_path / "corpus")


def test_export_of_one_split_keeps_its_sentences(tmp_path):
    corpus = _sentence_corpus(seed=4)
    import_megatron(write_megatron(tmp_path / "orig", corpus), tmp_path / "out", **KW)
    for split in ("train", "validation"):
        export_megatron(tmp_path / "out", tmp_path / split, split=split)
        ids = [int(d) for r in open_split(tmp_path / "out", split) for d in r.doc_ids]
        assert read_megatron(tmp_path / split)[1] == [corpus[i] for i in sorted(ids)]
    with pytest.raises(ValueError, match="already exist"):
        export_megatron(tmp_path / "out", tmp_path / "train", split="train")
    with pytest.raises(ValueError, match="unknown split 'test'"):
        export_megatron(tmp_path / "out", tmp_path / "t", split="test")


def test_vocabulary_must_cover_the_ids(tmp_path):
    prefix = write_megatron(tmp_path / "gpt", [[[5, 40000, 7]], [[50256]]])
    with pytest.raises(ValueError, match=r"token ids up to 50256, but the tokenizer .* has a vocabulary of 30522"):
        import_megatron(prefix, tmp_path / "out", **KW)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage,message", [
    ("magic", "no MMIDIDX magic"),
    ("version", "version 2"),
    ("float", "float32 values, not token ids"),
    ("truncated_idx", "truncated or corrupt"),
    ("truncated_bin", "truncated"),
    ("modes", "multimodal"),
    ("pointers", "not right after the previous one"),
    ("missing_bin", "does not exist"),
])
def test_bad_megatron_files_refused(tmp_path, damage, message):
    corpus = [[[1, 2, 3], [4]], [[5, 6]]]
    prefix = write_megatron(tmp_path / "c", corpus, "float32" if damage == "float" else "uint16",
                            modes=damage == "modes", pointer_shift=2 if damage == "pointers" else 0)
    idx, bin_ = prefix.with_name("c.idx"), prefix.with_name("c.bin")
    data = bytearray(idx.read_bytes())
    if damage == "magic":
        data[:9] = b"NOTMEGATR"
    elif damage == "version":
        data[9:17] = struct.pack("<Q", 2)
    elif damage == "truncated_idx":
        data = data[:-5]
    elif damage == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif damage == "missing_bin":
        bin_.unlink()
    idx.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message) as err:
        import_megatron(prefix, tmp_path / "out", **KW)
    assert "c." in str(err.value), "the error names the file"
    assert not (tmp_path / "out").exists()


def test_interrupted_import_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    prefix = write_megatron(tmp_path / "c", _sentence_corpus(60, seed=9))
    import_megatron(prefix, tmp_path / "fresh", **KW)
    with crash_at_shard_close(monkeypatch, 3):
        import_megatron(prefix, tmp_path / "resumed", **KW)
    assert (tmp_path / "resumed" / "progress.json").is_file()
    import_megatron(prefix, tmp_path / "resumed", **KW)
    as_bytes = lambda out: {p.name: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file() and p.name != "manifest.json"}
    assert as_bytes(tmp_path / "fresh") == as_bytes(tmp_path / "resumed")


def test_cli_import_and_export(tmp_path, capsys):
    corpus = _sentence_corpus(seed=11)
    prefix = write_megatron(tmp_path / "c", corpus)
    assert cli_main(["import-megatron", str(prefix) + ".idx", "--out", str(tmp_path / "out"), "--tokenizer", MINILM,
                     "--no-progress", "--valid-fraction", "0.1"]) == 0
    assert cli_main(["inspect", str(tmp_path / "out"), "--verify"]) == 0
    assert cli_main(["export-megatron", str(tmp_path / "out"), "--out", str(tmp_path / "back")]) == 0
    assert _files(tmp_path / "back") == _files(prefix)
    assert cli_main(["import-megatron", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--tokenizer", MINILM]) == 2
    assert "nope.idx does not exist" in capsys.readouterr().err


def test_export_refuses_a_folder_that_lost_its_sentence_boundaries(tmp_path):
    import_megatron(write_megatron(tmp_path / "c", _sentence_corpus(seed=12)), tmp_path / "out", **KW)
    (tmp_path / "out" / "megatron_document_index.npy").unlink()
    with pytest.raises(ValueError, match="lacks megatron_document_index.npy"):
        export_megatron(tmp_path / "out", tmp_path / "back")
    assert not (tmp_path / "back.bin").exists()
