"""Command line: ``python -m data_prep prepare ...`` / ``inspect DIR`` / ``import-megatron PREFIX`` / ``export-megatron DIR``."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from data_prep import load_manifest, open_split, prepare


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description="Tokenize corpora into memory-mapped shards for MLM pretraining.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="tokenize inputs into shards (+ manifest.json)",
                       description="Tokenize txt / jsonl / MediaWiki XML(.bz2) / parquet / arrow (datasets) inputs into <split>_<k>.bin/.idx shards "
                                   "and manifest.json. Re-running the same command resumes an interrupted run.")
    p.add_argument("inputs", nargs="+", help="files, folders (recursive; a datasets save_to_disk folder), globs, "
                                             "or hub datasets hf:NAME[:CONFIG][:SPLIT] (downloaded once into the datasets cache)")
    p.add_argument("--out", required=True, help="output folder (shards, manifest.json, tokenizer/)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer", help="local Hugging Face tokenizer folder (or tokenizer.json)")
    tok.add_argument("--train-tokenizer", choices=["wordpiece", "sentencepiece"], help="train a new vocabulary on the corpus")
    p.add_argument("--vocab-size", type=int, default=30522, help="size of a trained vocabulary (default 30522)")
    p.add_argument("--cased", action="store_true", help="trained vocabulary keeps case (default: lowercase)")
    p.add_argument("--format", dest="input_format", default="auto", choices=["auto", "txt", "jsonl", "mediawiki", "parquet", "arrow"],
                   help="input format (default: by extension, .parquet / .arrow included; .bz2/.gz are decompressed; "
                        "parquet or arrow on a folder takes its files of that extension)")
    p.add_argument("--text-field", default="text", help="JSONL field / parquet or arrow column holding the document (default: text)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1; 0 = in-process)")
    p.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard before a new one starts (default 67108864)")
    p.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents in the validation split (default 0.01)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split (default 1234)")
    p.add_argument("--on-error", choices=["skip", "fail"], default="fail",
                   help="bad input (invalid UTF-8, bad JSON, too large, binary, truncated, missing path, missing or non-string column): stop with an error, "
                        "or skip it and count it in manifest.json (default fail)")
    p.add_argument("--max-doc-chars", type=int, default=10_000_000, help="documents longer than this are bad input (default 1e7)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace output made with different settings")

    i = sub.add_parser("inspect", help="validate a shard folder and print its summary",
                       description="Open every shard (header, version, dtype, sizes) and print manifest counts.")
    i.add_argument("out", help="folder written by `prepare`")
    i.add_argument("--verify", action="store_true", help="also check the SHA-256 of every file against the manifest")

    m = sub.add_parser("import-megatron", help="turn a Megatron-LM / NeMo PREFIX.bin/.idx pair into shards (no re-tokenizing)",
                       description="Read a Megatron indexed corpus (MMIDIDX) and write its documents as shards + manifest.json, "
                                   "token ids as they are. Re-running the same command resumes an interrupted run.")
    m.add_argument("prefix", help="path prefix of the pair (PREFIX.bin + PREFIX.idx), e.g. data/my-corpus_text_document")
    m.add_argument("--out", required=True, help="output folder (shards, manifest.json, tokenizer/)")
    m.add_argument("--tokenizer", required=True, help="the tokenizer the corpus was made with (local HF folder or tokenizer.json)")
    m.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard before a new one starts (default 67108864)")
    m.add_argument("--valid-fraction", type=float, default=0.01, help="share of documents in the validation split (default 0.01)")
    m.add_argument("--seed", type=int, default=1234, help="seed of the train/validation split (default 1234)")
    m.add_argument("--no-progress", action="store_true", help="no progress bar")
    m.add_argument("--overwrite", action="store_true", help="replace output made with different settings")

    e = sub.add_parser("export-megatron", help="write a shard folder as a Megatron-LM / NeMo PREFIX.bin/.idx pair",
                       description="Write the documents of a shard folder, in document order, as a Megatron indexed corpus.")
    e.add_argument("shard_dir", help="folder written by `prepare` or `import-megatron`")
    e.add_argument("--out", required=True, help="path prefix of the pair to write (PREFIX.bin + PREFIX.idx)")
    e.add_argument("--split", default="all", help="train, validation, or all (default: both, merged in document order)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing PREFIX.bin/.idx")
    return parser


def main(argv: list[str] | None = None) -> int:
    # Parquet / Arrow inputs: arrow's default allocator (mimalloc) keeps ~40 MB more resident than the
    # system one while reading (benchmarks/prep_memory.py). pyarrow is imported only when such an input
    # is read, so this still takes effect; a value the user set wins.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "prepare":
            manifest = prepare(args.inputs, args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
                               vocab_size=args.vocab_size, lowercase=not args.cased, input_format=args.input_format,
                               text_field=args.text_field, workers=args.workers, shard_tokens=args.shard_tokens,
                               valid_fraction=args.valid_fraction, seed=args.seed, on_error=args.on_error,
                               max_doc_chars=args.max_doc_chars, progress=not args.no_progress, overwrite=args.overwrite)
            print(json.dumps({s: {k: v for k, v in d.items() if k != "shards"} for s, d in manifest["splits"].items()}))
        elif args.command == "import-megatron":
            from data_prep.megatron import import_megatron
            manifest = import_megatron(args.prefix, args.out, tokenizer=args.tokenizer, shard_tokens=args.shard_tokens,
                                       valid_fraction=args.valid_fraction, seed=args.seed, progress=not args.no_progress,
                                       overwrite=args.overwrite)
            print(json.dumps({s: {k: v for k, v in d.items() if k != "shards"} for s, d in manifest["splits"].items()}))
        elif args.command == "export-megatron":
            from data_prep.megatron import export_megatron
            print(json.dumps(export_megatron(args.shard_dir, args.out, split=args.split, overwrite=args.overwrite)))
        else:
            manifest = load_manifest(args.out)
            for split in manifest["splits"]:
                readers = open_split(args.out, split, verify_checksums=args.verify)
                print(f"{split}: {len(readers)} shards, {sum(r.num_docs for r in readers)} documents, "
                      f"{sum(r.num_tokens for r in readers)} tokens ({manifest['dtype']})")
            print(f"tokenizer: {manifest['tokenizer']['source']} (sha256 {manifest['tokenizer']['sha256'][:12]}...)")
            print("skipped: " + (json.dumps(manifest["stats"]["skipped"]) if manifest["stats"]["skipped"] else "none"))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
