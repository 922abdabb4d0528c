"""Data prep: raw corpora (txt / jsonl / MediaWiki XML / parquet / Arrow / hub datasets) -> tokenized,
sharded, memory-mapped binaries; Megatron-LM indexed corpora in and out without re-tokenizing.

Python API (what pretraining and the demo call)::

    from data_prep import prepare, load_manifest, ShardReader, open_split

    manifest = prepare(["corpus/*.jsonl"], "data/shards", tokenizer="path/to/hf_tokenizer", workers=2)
    readers = open_split("data/shards", "train")      # list[ShardReader], validated
    readers[0].doc(3)                                   # token ids of one document (np.ndarray, O(1))

    import_megatron("corpus_text_sentence", "data/imported", tokenizer="path/to/hf_tokenizer")   # .bin/.idx -> shards
    export_megatron("data/shards", "out/corpus_text_document")                                     # shards -> .bin/.idx

Command line: ``python -m data_prep --help``. Modules: readers (text inputs -> documents), columnar
(parquet / Arrow / hub -> documents), documents (their item types), cleaning (wikitext -> text),
tokenization (load/train/encode), shards (binary format), pipeline (prepare), megatron (MMIDIDX).
"""
from __future__ import annotations

import os
from pathlib import Path

from data_prep.pipeline import load_manifest, prepare
from data_prep.shards import ShardReader, file_sha256
from data_prep.megatron import export_megatron, import_megatron   # after pipeline: it builds on it


def open_split(out_dir: str | os.PathLike, split: str = "train", verify_checksums: bool = False) -> list[ShardReader]:
    """Validated readers for every shard of ``split``, in order (checksums against the manifest if asked)."""
    manifest = load_manifest(out_dir)
    if split not in manifest["splits"]:
        raise ValueError(f"unknown split {split!r}; {out_dir} has {', '.join(manifest['splits'])}")
    readers = []
    for rec in manifest["splits"][split]["shards"]:
        path = Path(out_dir) / rec["bin"]
        reader = ShardReader(path)
        if reader.num_tokens != rec["num_tokens"] or reader.num_docs != rec["num_docs"]:
            raise ValueError(f"{path} does not match manifest.json (tokens/documents differ); re-run data prep")
        if verify_checksums:
            for key, name in (("sha256_bin", rec["bin"]), ("sha256_idx", rec["idx"])):
                if file_sha256(Path(out_dir) / name) != rec[key]:
                    raise ValueError(f"{Path(out_dir) / name} fails its manifest checksum; the file changed after data prep, re-run it")
        readers.append(reader)
    return readers


__all__ = ["prepare", "load_manifest", "open_split", "ShardReader", "import_megatron", "export_megatron"]
