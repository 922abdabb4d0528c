"""Peak memory of data prep on columnar inputs against the JSONL of the same documents.

Corpus: benchmarks/data_prep.py's (the gensim Wikipedia sample, cleaned, repeated to ~--target-mb
MB of JSONL). The same documents are written as parquet with three row-group sizes (100 rows, 1000
rows, and the whole file in one group, the worst case for a reader) and as a `datasets`
save_to_disk folder (Arrow IPC stream files of 1000-row batches). Each input runs in its own subprocess:
  * "read":    data_prep.readers.iter_documents over it (the reader alone, counting characters);
  * "prepare": `python -m data_prep prepare` with --workers processes (reader + tokenizer workers +
    shards), as a user runs it (the command line picks arrow's system allocator, see __main__.py).
Two rows measure only the imports (the text readers; the same plus pyarrow), the fixed part of a
reader's memory. Peak memory is the largest sum of RSS over the process and its children, polled every 50 ms
(run_measured of benchmarks/data_prep.py).

    .venv/bin/python benchmarks/prep_memory.py [--target-mb 50] [--workers 1] [--work-dir DIR]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The reader runs under the allocator the command line picks (data_prep/__main__.py), as "prepare" does.
READ_ENV = {"ARROW_DEFAULT_MEMORY_POOL": os.environ.get("ARROW_DEFAULT_MEMORY_POOL", "system")}


def _bench_module():
    # benchmarks/data_prep.py shares its name with the data_prep package: load it by path.
    spec = importlib.util.spec_from_file_location("bench_data_prep", ROOT / "benchmarks" / "data_prep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_columnar(jsonl: Path, work: Path) -> dict[str, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in jsonl.open(encoding="utf-8")]
    table = pa.table({"text": pa.array(texts, pa.string())})
    inputs = {"jsonl": jsonl}
    for label, rows in (("parquet, 100-row groups", 100), ("parquet, 1000-row groups", 1000),
                        ("parquet, one row group", len(texts))):
        path = work / f"corpus_rg{rows}.parquet"
        if not path.exists():
            pq.write_table(table, path, row_group_size=rows)
        inputs[label] = path
    folder = work / "saved_dataset_b1000"
    if not folder.exists():
        import datasets
        # 1000-row record batches, as `datasets`' own writer (writer_batch_size) makes them in the cache.
        batched = pa.Table.from_batches(table.to_batches(max_chunksize=1000))
        datasets.Dataset(batched).save_to_disk(str(folder))
    inputs["datasets folder (arrow)"] = folder
    return inputs


def size_on_disk(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-mb", type=float, default=50.0, help="corpus size in MB of JSONL (default 50)")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes of prepare (default 1)")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp dir)")
    args = parser.parse_args()
    bench = _bench_module()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_prep_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        corpus, num_docs = bench.build_corpus(work, args.target_mb)
        inputs = write_columnar(corpus, work)
        import datasets
        import numpy
        import pyarrow
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "unknown CPU")
        print(f"machine: {os.cpu_count()} CPUs ({cpu}); load average before: {os.getloadavg()[0]:.1f}")
        print(f"versions: python {platform.python_version()}, pyarrow {pyarrow.__version__}, datasets {datasets.__version__}, "
              f"numpy {numpy.__version__}")
        print(f"corpus: {num_docs} documents, {corpus.stat().st_size / 1e6:.1f} MB as JSONL; prepare workers={args.workers}")
        print(f"{'input':<28} {'on disk MB':>10} {'read: peak MB':>13} {'read s':>7} {'prepare: peak MB':>16} {'prepare s':>9}")
        rows = {}
        for label, modules in (("(imports only, text readers)", "data_prep.readers"),
                               ("(imports only, + pyarrow)", "data_prep.readers, pyarrow.parquet, pyarrow.ipc")):
            _, _, peak, _ = bench.run_measured(f"import {modules}; import time; time.sleep(0.3)", READ_ENV)
            print(f"{label:<28} {'':>10} {peak / 1e6:13.0f}")
            rows[label] = {"read_peak_bytes": peak}
        for label, path in inputs.items():
            read_code = (f"from data_prep.readers import expand_inputs, iter_documents, RawDoc\n"
                         f"n = sum(len(d.text) for d in iter_documents(expand_inputs({str(path)!r})[0]) if isinstance(d, RawDoc))\n"
                         f"print(n)")
            r_wall, _, r_peak, r_out = bench.run_measured(read_code, READ_ENV)
            out = work / "shards"
            shutil.rmtree(out, ignore_errors=True)
            argv = ["data_prep", "prepare", str(path), "--out", str(out), "--tokenizer", bench.MINILM,
                    "--workers", str(args.workers), "--no-progress"]
            prep_code = (f"import json, runpy, sys\nsys.argv = {argv!r}\n"
                         f"try:\n    runpy.run_module('data_prep', run_name='__main__')\nexcept SystemExit as e:\n    assert not e.code\n"
                         f"m = json.load(open({str(out / 'manifest.json')!r}))\n"
                         f"print(m['stats']['documents_written'], m['splits']['train']['shards'][0]['sha256_bin'])")
            p_wall, _, p_peak, p_out = bench.run_measured(prep_code)
            rows[label] = {"disk_bytes": size_on_disk(path), "read_peak_bytes": r_peak, "read_s": r_wall,
                           "read_chars": int(r_out.split()[-1]), "prepare_peak_bytes": p_peak, "prepare_s": p_wall,
                           "prepare_result": p_out.strip().splitlines()[-1]}
            row = rows[label]
            print(f"{label:<28} {row['disk_bytes'] / 1e6:10.1f} {r_peak / 1e6:13.0f} {r_wall:7.1f} {p_peak / 1e6:16.0f} {p_wall:9.1f}")
        results = {r["prepare_result"] for r in rows.values() if "prepare_result" in r}
        chars = {r["read_chars"] for r in rows.values() if "read_chars" in r}
        print(f"same documents and same first shard everywhere: {len(results) == 1 and len(chars) == 1}")
        print(f"load average after: {os.getloadavg()[0]:.1f}")
        print(json.dumps(rows))
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
