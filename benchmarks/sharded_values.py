"""Per-step time and bytes communicated of the column-sharded value table.

For each P in --ranks, spawns P processes (gloo on CPU, NCCL with --device cuda), each holding an
[N, dim/P] shard, and times lookup forward, backward (row-sparse grad + lookup-weight grads) and one
SparseAdam step on random top-k indices (uniform over the table, K lookups per token, --tokens per
rank). P = 1 also runs the plain local ValueTable as the baseline. Prints one Markdown row per
configuration (median over the timed steps) and, with --json, writes them to a file.

    python benchmarks/sharded_values.py                    # N=128^2, d=256, 2048 tokens/rank, K=128
    python benchmarks/sharded_values.py --ranks 1 --device cuda --rows 262144 --dim 1024
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pkm.sharded_values import ShardedValueTable
from pkm.sparse_adam import SparseAdam
from pkm.values import ValueTable


def _sync(device: torch.device, group=None) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    if dist.is_initialized():
        dist.barrier(group=group)


def _bench_table(table, args, device: torch.device, rank: int) -> dict:
    opt = SparseAdam([table], lr=1e-3)
    gen = torch.Generator(device="cpu").manual_seed(1000 + rank)
    times = {"forward": [], "backward": [], "step": []}
    comm = {"forward": 0, "backward": 0}
    for it in range(args.warmup + args.steps):
        idx = torch.randint(0, args.rows, (args.tokens, args.k), generator=gen).to(device)
        act = torch.bfloat16 if args.act_dtype == "bf16" else torch.float32  # activation dtype
        w = torch.softmax(torch.randn(args.tokens, args.k, generator=gen), -1).to(device, act).requires_grad_(True)
        grad = torch.randn(args.tokens, args.dim, generator=gen).to(device, act)
        if hasattr(table, "comm_bytes"):
            table.comm_bytes = {"forward": 0, "backward": 0}
        _sync(device)
        t0 = time.perf_counter()
        out = table(idx, w)
        _sync(device)
        t1 = time.perf_counter()
        out.backward(grad)
        _sync(device)
        t2 = time.perf_counter()
        opt.step()
        _sync(device)
        t3 = time.perf_counter()
        if it >= args.warmup:
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["step"].append(t3 - t2)
            if hasattr(table, "comm_bytes"):
                comm = dict(table.comm_bytes)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med["total"] = sum(med.values())
    # fastest whole step: less sensitive than the median to other jobs on a shared machine
    med["min_total"] = min(sum(step) for step in zip(*times.values())) * 1e3
    return {"ms": med, "comm_bytes": comm}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, args) -> None:
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world_size))
    device = torch.device(args.device if args.device == "cpu" else f"cuda:{rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=300))
    results = []
    table = ShardedValueTable(args.rows, args.dim, device=device)
    results.append({"table": "sharded", **_bench_table(table, args, device, rank)})
    if world_size == 1:
        local = ValueTable(args.rows, args.dim, device=device)
        results.append({"table": "local", **_bench_table(local, args, device, rank)})
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run(args, world_size: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(world_size, os.path.join(tmp, "rdv"), tmp, args), nprocs=world_size)
        per_rank = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
    rows = []
    for i, res in enumerate(per_rank[0]):
        # the slowest rank sets the step time; bytes are per rank (rank 0 shown, all similar)
        ms = {k: max(r[i]["ms"][k] for r in per_rank) for k in res["ms"]}
        sent = max(sum(r[i]["comm_bytes"].values()) for r in per_rank)
        rows.append({"P": world_size, "table": res["table"], "ms": ms, "bytes_sent_per_rank": sent,
                     "tokens_per_s": world_size * args.tokens / (ms["total"] / 1e3)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rows", type=int, default=128 * 128)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--k", type=int, default=4 * 32, help="lookups per token (heads * knn)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--act-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="dtype of the lookup weights and output grads (the table stays fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cpus // P)")
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args()
    if args.device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        raise SystemExit(f"--ranks {max(args.ranks)} needs that many GPUs; found {torch.cuda.device_count()}.")

    print(f"N={args.rows} dim={args.dim} tokens/rank={args.tokens} K={args.k} device={args.device} "
          f"act={args.act_dtype} steps={args.steps} (+{args.warmup} warmup) torch={torch.__version__} cpus={os.cpu_count()}")
    print("| P | table | forward ms | backward ms | SparseAdam step ms | total ms (min) | MB sent/rank/step | tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    all_rows = []
    for world_size in args.ranks:
        for row in run(args, world_size):
            ms = row["ms"]
            print(f"| {row['P']} | {row['table']} | {ms['forward']:.1f} | {ms['backward']:.1f} | {ms['step']:.1f} "
                  f"| {ms['total']:.1f} ({ms['min_total']:.1f}) | {row['bytes_sent_per_rank'] / 1e6:.2f} | {row['tokens_per_s']:.0f} |",
                  flush=True)
            all_rows.append(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": all_rows}, f, indent=2)


if __name__ == "__main__":
    main()
