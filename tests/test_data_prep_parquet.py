"""data_prep on columnar inputs: parquet, Arrow IPC (datasets folders and cache files), hub names.

The reference is the JSONL reader: the same documents as parquet / arrow must give the same shard
bytes, for any worker count, fresh or resumed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import prepare, shards
from data_prep.__main__ import main as cli_main
from data_prep.columnar import parse_hub_spec
from data_prep.readers import RawDoc, Skip, expand_inputs, iter_documents
from tests.test_data_prep import MINILM, _docs, crash_at_shard_close

ROOT = Path(__file__).resolve().parents[1]


def _corpus() -> list[str | None]:
    docs = _docs(70, seed=5)
    docs[3] = "two lines\nof one document, with\ttabs and ünïcode"
    docs[10] = ""          # empty: skipped and counted by every reader alike
    docs[20] = None        # a missing value
    return docs


def _write_jsonl(path: Path, docs) -> Path:
    path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def _table(docs) -> pa.Table:
    return pa.table({"id": pa.array(range(len(docs)), pa.int64()), "text": pa.array(docs, pa.string())})


def _write_parquet(path: Path, docs, row_group_size: int = 16, **kwargs) -> Path:
    pq.write_table(_table(docs), path, row_group_size=row_group_size, **kwargs)
    return path


def _write_arrow_stream(path: Path, docs, batch_rows: int = 16) -> Path:
    """The layout of the `datasets` cache: an IPC stream of record batches."""
    table = _table(docs)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=batch_rows):
            writer.write_batch(batch)
    return path


def _shard_bytes(out: Path) -> dict[str, bytes]:
    """Everything but the manifest (which names the input files) and the shard check cache."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("manifest.json", "shards_verified.json")}


KW = dict(tokenizer=MINILM, shard_tokens=500, valid_fraction=0.15, progress=False)


@pytest.fixture(scope="module")
def jsonl_reference(tmp_path_factory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("ref")
    manifest = prepare(_write_jsonl(tmp / "c.jsonl", _corpus()), tmp / "out", workers=0, **KW)
    assert len(manifest["splits"]["train"]["shards"]) > 2 and manifest["splits"]["validation"]["num_docs"] > 0
    assert manifest["stats"]["skipped"] == {"empty": 1, "null_text": 1}
    return tmp / "out", manifest


def test_parquet_gives_the_jsonl_bytes_for_any_workers(tmp_path, jsonl_reference):
    ref_out, ref_manifest = jsonl_reference
    path = _write_parquet(tmp_path / "c.parquet", _corpus())
    assert pq.ParquetFile(path).num_row_groups > 3   # the reader crosses row groups and batches
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        manifest = prepare(path, out, workers=workers, **KW)
        assert manifest["config"]["inputs"][0][1] == "parquet"
        assert manifest["stats"] == ref_manifest["stats"]
        assert manifest["splits"] == ref_manifest["splits"]
        assert _shard_bytes(out) == _shard_bytes(ref_out)


def test_datasets_folder_and_cache_files_give_the_jsonl_bytes(tmp_path, jsonl_reference):
    import datasets

    ref_out, _ = jsonl_reference
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"id": list(range(70)), "text": _corpus()}).save_to_disk(str(folder), num_shards=3)
    files, missing = expand_inputs(folder)
    assert not missing and [Path(p).name for p, _ in files] == [f"data-0000{i}-of-00003.arrow" for i in range(3)]
    assert {fmt for _, fmt in files} == {"arrow"}
    prepare(folder, tmp_path / "from_folder", workers=0, **KW)
    assert _shard_bytes(tmp_path / "from_folder") == _shard_bytes(ref_out)

    # The cache's layout: .arrow IPC streams beside dataset_info.json (metadata, never read as text).
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "dataset_info.json").write_text("{}")
    _write_arrow_stream(cache / "corpus-train-00000-of-00002.arrow", _corpus()[:33])
    _write_arrow_stream(cache / "corpus-train-00001-of-00002.arrow", _corpus()[33:])
    assert [Path(p).name for p, _ in expand_inputs(cache)[0]] == ["corpus-train-00000-of-00002.arrow", "corpus-train-00001-of-00002.arrow"]
    prepare(cache, tmp_path / "from_cache", workers=0, **KW)
    assert _shard_bytes(tmp_path / "from_cache") == _shard_bytes(ref_out)


def test_arrow_ipc_file_format_and_string_variants(tmp_path):
    docs = ["first doc", "second doc", "first doc"]
    table = pa.table({"body": pa.array(docs, pa.large_string()), "tag": pa.array(docs).dictionary_encode()})
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    for field in ("body", "tag"):
        got = [d.text for d in iter_documents(expand_inputs(tmp_path / "f.arrow")[0], text_field=field)]
        assert got == docs, field


def test_format_flag_and_folders(tmp_path):
    data = tmp_path / "repo" / "data"
    data.mkdir(parents=True)
    _write_parquet(data / "train-00000-of-00001.parquet", ["a doc"])
    (tmp_path / "repo" / "README.md").write_text("# a dataset card, not corpus text")
    assert [fmt for _, fmt in expand_inputs(tmp_path / "repo", "parquet")[0]] == ["parquet"]
    assert sorted(fmt for _, fmt in expand_inputs(tmp_path / "repo")[0]) == ["parquet", "txt"]
    odd = _write_parquet(tmp_path / "corpus.data", ["x"])
    assert expand_inputs(odd, "parquet")[0] == [(str(odd), "parquet")]

    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]}),
                          "test": datasets.Dataset.from_dict({"text": ["b"]})}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits train, test; pass one split's folder"):
        expand_inputs(tmp_path / "dd")
    assert [Path(p).parent.name for p, _ in expand_inputs(tmp_path / "dd" / "train")[0]] == ["train"]


# ------------------------------------------------------------------ bad input

def _bad_cases(tmp: Path) -> dict[str, tuple[Path, str, int]]:
    """reason -> (file, error text, documents of that file still written under --on-error skip)."""
    docs = _docs(300, seed=1)
    whole = _write_parquet(tmp / "whole.parquet", docs, row_group_size=100).read_bytes()
    truncated = tmp / "truncated.parquet"
    truncated.write_bytes(whole[: len(whole) // 2])
    corrupt = tmp / "corrupt.parquet"
    meta = pq.ParquetFile(tmp / "whole.parquet").metadata.row_group(2).column(1)
    data = bytearray(whole)
    start = meta.dictionary_page_offset if meta.has_dictionary_page else meta.data_page_offset
    mid = start + meta.total_compressed_size // 2
    data[mid: mid + 64] = bytes(64)   # damage inside the last row group's compressed pages
    corrupt.write_bytes(bytes(data))
    missing = tmp / "missing.parquet"
    pq.write_table(pa.table({"id": [1, 2], "content": ["a", "b"]}), missing)
    numbers = tmp / "numbers.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), numbers)
    return {
        "truncated_file": (truncated, "footer is missing", 0),
        "corrupt_file": (corrupt, r"cannot be read as parquet .* after \d+ documents", 200),
        "missing_column": (missing, r"no column 'text' \(its columns: id, content\)", 0),
        "non_string_column": (numbers, "holds int64, not strings", 0),
    }


@pytest.mark.parametrize("reason", ["truncated_file", "corrupt_file", "missing_column", "non_string_column"])
def test_bad_columnar_input_fails_clearly_or_is_counted(tmp_path, reason):
    bad, message, kept = _bad_cases(tmp_path)[reason]
    good = _write_parquet(tmp_path / "good.parquet", ["a first good document.", "a second one.", "and a third."])
    kwargs = dict(tokenizer=MINILM, workers=0, progress=False)
    with pytest.raises(ValueError, match=message) as err:
        prepare([good, bad], tmp_path / "fail", on_error="fail", **kwargs)
    assert bad.name in str(err.value), "the error must name the file"
    manifest = prepare([good, bad], tmp_path / "skip", on_error="skip", **kwargs)
    assert manifest["stats"]["skipped"] == {reason: 1}
    assert manifest["stats"]["documents_written"] >= 3 + kept


def test_corrupt_file_is_read_batch_by_batch_up_to_the_damage(tmp_path):
    bad, _, _ = _bad_cases(tmp_path)["corrupt_file"]
    items = list(iter_documents(expand_inputs(bad)[0]))
    assert isinstance(items[-1], Skip) and items[-1].reason == "corrupt_file"
    read = [d for d in items if isinstance(d, RawDoc)]
    # Row groups 0 and 1 come out whole before the damage in row group 2 is met.
    assert 200 <= len(read) < 300 and [d.text for d in read] == _docs(300, seed=1)[: len(read)]


def test_nulls_are_counted_like_empty_documents_in_jsonl_and_parquet(tmp_path):
    docs = ["one doc", None, "", "two doc", None]
    for path in (_write_jsonl(tmp_path / "n.jsonl", docs), _write_parquet(tmp_path / "n.parquet", docs)):
        manifest = prepare(path, tmp_path / path.suffix[1:], tokenizer=MINILM, workers=0, progress=False, on_error="fail")
        assert manifest["stats"]["skipped"] == {"empty": 1, "null_text": 2}, path
        assert manifest["stats"]["documents_written"] == 2


def test_text_field_selects_the_column(tmp_path, capsys):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["wrong column"] * 3, "body": ["the memory layer", "stores keys", "and values"]}), path)
    out = tmp_path / "out"
    assert cli_main(["prepare", str(path), "--out", str(out), "--tokenizer", MINILM, "--workers", "0", "--no-progress",
                     "--valid-fraction", "0", "--format", "parquet", "--text-field", "body"]) == 0
    from data_prep.tokenization import load_tokenizer
    tok = load_tokenizer(MINILM)
    reader = shards.ShardReader(out / "train_00000.bin")
    assert [reader.doc(i).tolist() for i in range(3)] == [tok.encode(t, add_special_tokens=False).ids
                                                          for t in ["the memory layer", "stores keys", "and values"]]
    assert cli_main(["prepare", str(path), "--out", str(tmp_path / "x"), "--tokenizer", MINILM, "--text-field", "title"]) == 2
    assert "no column 'title' (its columns: text, body)" in capsys.readouterr().err


# ------------------------------------------------------------------ resume

def test_resumed_parquet_run_gives_the_uninterrupted_bytes(tmp_path, monkeypatch, jsonl_reference):
    ref_out, _ = jsonl_reference
    path = _write_parquet(tmp_path / "c.parquet", _corpus())
    out = tmp_path / "resumed"
    with crash_at_shard_close(monkeypatch, 3):
        prepare(path, out, workers=0, **KW)
    assert (out / "progress.json").is_file() and not (out / "manifest.json").exists()

    from data_prep import pipeline
    encoded, real_encode = [], pipeline._encode_chunk
    monkeypatch.setattr(pipeline, "_encode_chunk", lambda docs: encoded.append(len(docs)) or real_encode(docs))
    prepare(path, out, workers=0, **KW)
    assert 0 < sum(encoded) < 68, "the resumed run should skip the documents of finished shards"
    assert _shard_bytes(out) == _shard_bytes(ref_out)


# ------------------------------------------------------------------ the hub (never reached)

@pytest.mark.parametrize("spec,expected", [
    ("hf:wikimedia/wikipedia:20231101.en:train", ("wikimedia/wikipedia", "20231101.en", "train")),
    ("hf:stas/openwebtext-10k", ("stas/openwebtext-10k", None, None)),
    ("hf:allenai/c4:en", ("allenai/c4", "en", None)),
    ("hf:bookcorpus::train", ("bookcorpus", None, "train")),
])
def test_hub_spec_parsing(spec, expected):
    assert parse_hub_spec(spec) == expected


@pytest.mark.parametrize("spec,message", [("hf:", "not hf:NAME"), ("hf:a:b:c:d", "not hf:NAME"),
                                          ("hf:a:b:train[:10%]", "split slices are not supported")])
def test_bad_hub_specs_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_hub_spec(spec)


def test_hub_name_offline_is_a_clear_error(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "hf:nobody/no-such-corpus:default:train",
                           "--out", str(tmp_path / "out"), "--tokenizer", MINILM, "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot load hf:nobody/no-such-corpus:default:train from the Hugging Face hub" in proc.stderr
    assert "offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_hub_path_loads_through_the_datasets_cache(tmp_path, monkeypatch, jsonl_reference):
    """hf:NAME goes through datasets.load_dataset into its cache; a local folder name exercises the
    same path without the network (offline mode on, the cache in tmp_path)."""
    import datasets
    ref_out, _ = jsonl_reference
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    _write_parquet(repo / "data" / "train-00000-of-00001.parquet", _corpus())
    files, _ = expand_inputs(f"hf:{repo}")
    assert files and all(Path(p).is_relative_to(tmp_path / "cache") and fmt == "arrow" for p, fmt in files)
    prepare(f"hf:{repo}::train", tmp_path / "out", workers=0, **KW)
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(ref_out)


def test_truncated_arrow_stream_keeps_the_batches_before_the_cut(tmp_path):
    path = _write_arrow_stream(tmp_path / "cut.arrow", _docs(64, seed=2), batch_rows=16)
    path.write_bytes(path.read_bytes()[:-3000])
    good = _write_parquet(tmp_path / "good.parquet", ["a first good document.", "a second one."])
    with pytest.raises(ValueError, match=r"cut.arrow cannot be read as arrow .* after \d+ documents"):
        prepare([good, path], tmp_path / "fail", tokenizer=MINILM, workers=0, progress=False)
    manifest = prepare([good, path], tmp_path / "skip", tokenizer=MINILM, workers=0, progress=False, on_error="skip")
    assert manifest["stats"]["skipped"] == {"corrupt_file": 1}
    assert 2 + 16 <= manifest["stats"]["documents_written"] < 2 + 64


def test_trained_vocabulary_on_parquet_with_nulls(tmp_path):
    docs = _docs(40, seed=8) + [None]
    manifest = prepare(_write_parquet(tmp_path / "t.parquet", docs), tmp_path / "out", train_tokenizer="wordpiece",
                       vocab_size=300, workers=0, progress=False, on_error="fail")
    assert manifest["stats"]["skipped"] == {"null_text": 1} and manifest["stats"]["documents_written"] == 40
