"""Benchmark: one PKM layer vs the FFN it augments, and the sparse value-optimizer step vs dense Adam.

Prints, in one run:
1. median wall time of forward + backward + update for
   - one ProductKeyMemory layer (N = n^2 = 512^2, H = 4, k = 32, k_dim = 256, d = 768) with AdamW on
     the query net and keys and SparseAdam on the values, and
   - the FFN it augments (d -> 4d -> d, GELU, AdamW),
   on the same 4096 tokens (input requires grad in both, as inside a model);
2. the value-optimizer step at N = 128^2, 512^2, 1024^2 for the same set of ~16k unique touched rows,
   beside a dense torch.optim.Adam step over the whole table.

Usage: python benchmarks/pkm_layer.py [--iters 5] [--tokens 4096] [--dim 768] [--opt-dim 768]
       [--threads N] [--skip-layer] [--skip-opt] [--profile] [--compare-torch-adam]
       python benchmarks/pkm_layer.py --device cuda [--xlm-src PATH] [--json out.json] [--profile-out prof.txt]

``--device cuda`` runs the GPU benchmark instead (benchmarks/pkm_layer_gpu.py: Triton kernels vs the
torch-op path vs XLM's HashingMemory vs the FFN at 4k/16k/64k tokens in fp32 and bf16, each value
kernel's bytes/s against the copy bandwidth, and the value step against N), at d = 1024 by default.

--compare-torch-adam adds, interleaved in the same run, the PKM step with SparseAdam's torch-op path
(``native = False``) beside the default (fused C kernel on CPU when a compiler exists), and the same
pair for the optimizer-step table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
from torch import nn

from pkm import ProductKeyMemory, SparseAdam, SparseGrad, ValueTable


def timed(fn, iters: int, warmup: int = 1) -> tuple[float, float]:
    """Median wall and median process-CPU seconds per call (CPU time is less sensitive to other
    processes sharing the cores)."""
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(iters):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def bench_layer(args) -> None:
    torch.manual_seed(0)
    d, tokens = args.dim, args.tokens
    x = torch.randn(tokens, d, requires_grad=True)
    grad_out = torch.randn(tokens, d)

    mem = ProductKeyMemory(d, d, n_keys=args.n_keys, heads=args.heads, knn=args.knn, k_dim=args.k_dim)
    dense = [p for p in mem.parameters() if p.requires_grad]
    mem_opt = torch.optim.AdamW(dense, lr=1e-4)
    value_opt = SparseAdam([mem.values], lr=1e-3)
    torch_opt = SparseAdam([mem.values], lr=1e-3)  # same table, own state: the torch-op path
    torch_opt.native = False
    touched = []

    def pkm_step(opt: SparseAdam = value_opt) -> None:
        res = mem(x)
        res.output.backward(grad_out)
        touched.append(mem.values.sparse_grad.rows.numel())
        mem_opt.step()
        opt.step()
        mem_opt.zero_grad(set_to_none=True)
        x.grad = None

    ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
    ffn_opt = torch.optim.AdamW(ffn.parameters(), lr=1e-4)

    def ffn_step() -> None:
        ffn(x).backward(grad_out)
        ffn_opt.step()
        ffn_opt.zero_grad(set_to_none=True)
        x.grad = None

    # interleave the two so a burst of load from other processes hits both alike
    pkm_w, pkm_c, ffn_w, ffn_c, tor_w, tor_c = [], [], [], [], [], []
    torch_step = lambda: pkm_step(torch_opt)  # noqa: E731
    pkm_step(), ffn_step()  # warm-up (optimizer state allocation, allocator)
    if args.compare_torch_adam:
        torch_step()
    for _ in range(args.iters):
        w, c = timed(pkm_step, 1, warmup=0)
        pkm_w.append(w), pkm_c.append(c)
        if args.compare_torch_adam:
            w, c = timed(torch_step, 1, warmup=0)
            tor_w.append(w), tor_c.append(c)
        w, c = timed(ffn_step, 1, warmup=0)
        ffn_w.append(w), ffn_c.append(c)
    pw, pc = statistics.median(pkm_w), statistics.median(pkm_c)
    fw, fc = statistics.median(ffn_w), statistics.median(ffn_c)
    print(f"\n== layer: {tokens} tokens, d={d}; PKM N={args.n_keys}^2={args.n_keys ** 2}, H={args.heads}, "
          f"k={args.knn}, k_dim={args.k_dim}; median of {args.iters} ==")
    print(f"unique value rows touched per step: {statistics.median(touched):.0f} "
          f"(of {args.tokens * args.heads * args.knn} lookups)")
    print(f"{'':28s}{'wall ms':>10s}{'cpu ms':>10s}")
    print(f"{'PKM fwd+bwd+update':28s}{pw * 1e3:10.1f}{pc * 1e3:10.1f}")
    print(f"{'FFN fwd+bwd+update':28s}{fw * 1e3:10.1f}{fc * 1e3:10.1f}")
    print(f"{'PKM / FFN':28s}{pw / fw:10.2f}{pc / fc:10.2f}")
    if args.compare_torch_adam:
        tw, tc = statistics.median(tor_w), statistics.median(tor_c)
        print(f"{'PKM, torch-op SparseAdam':28s}{tw * 1e3:10.1f}{tc * 1e3:10.1f}")
        print(f"{'  / FFN':28s}{tw / fw:10.2f}{tc / fc:10.2f}")
    from pkm.sparse_adam import native_available

    print(f"SparseAdam fused C kernel: {'on' if value_opt.native and native_available() else 'off'}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            pkm_step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def bench_value_step(args) -> None:
    torch.manual_seed(0)
    d = args.opt_dim
    touched_rows = args.touched_rows
    smallest = 128 * 128
    rows = torch.randperm(smallest)[:touched_rows].sort().values  # same rows for every N
    grad_values = torch.randn(touched_rows, d)
    print(f"\n== value optimizer step: {touched_rows} unique touched rows, dim={d}; median of {args.iters} ==")
    print(f"{'N':>10s}{'table GB':>10s}{'sparse ms':>11s}{'(cpu ms)':>10s}{'dense Adam ms':>15s}{'(cpu ms)':>10s}")
    base = None
    for n in (128, 512, 1024):
        num_rows = n * n
        table = ValueTable(num_rows, d)
        opt = SparseAdam([table], lr=1e-3)

        def sparse_step() -> None:
            table.sparse_grad = SparseGrad(rows, grad_values)
            opt.step()

        sw, sc = timed(sparse_step, args.iters)
        base = base or sw
        torch_txt = ""
        if args.compare_torch_adam:
            opt.native = False
            tw, tc = timed(sparse_step, args.iters)
            opt.native = True
            torch_txt = f"   torch-op path {tw * 1e3:.1f} ms (cpu {tc * 1e3:.1f})"
        del opt
        dense_txt = "-", "-"
        # dense Adam needs param + grad + 2 moments; run it only where it fits comfortably
        need = 4 * num_rows * d * 4
        if need < 0.6 * _available_bytes():
            param = nn.Parameter(table.weight.detach())
            param.grad = torch.randn_like(param)
            dense = torch.optim.Adam([param], lr=1e-3)
            dw, dc = timed(dense.step, max(2, args.iters // 2))
            dense_txt = f"{dw * 1e3:.1f}", f"{dc * 1e3:.1f}"
            del dense, param
        else:
            dense_txt = f"skip ({need / 2**30:.0f} GB)", "-"
        print(f"{num_rows:>10d}{num_rows * d * 4 / 2**30:10.2f}{sw * 1e3:11.1f}{sc * 1e3:10.1f}"
              f"{dense_txt[0]:>15s}{dense_txt[1]:>10s}{torch_txt}")
        del table
    print("(sparse step time ratio t(1024^2)/t(128^2) is printed by the rows above: compare column 3)")


def _available_bytes() -> int:
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:  # pragma: no cover
        return 8 << 30


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--dim", type=int, default=None, help="model dim (default 768 on CPU, 1024 on CUDA)")
    ap.add_argument("--n-keys", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--knn", type=int, default=32)
    ap.add_argument("--k-dim", type=int, default=256)
    ap.add_argument("--opt-dim", type=int, default=768, help="value dim for the optimizer-step benchmark")
    ap.add_argument("--touched-rows", type=int, default=16384)
    ap.add_argument("--skip-layer", action="store_true")
    ap.add_argument("--skip-opt", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one PKM step")
    ap.add_argument("--compare-torch-adam", action="store_true",
                    help="also time the PKM step / value step with SparseAdam's torch-op path, interleaved")
    ap.add_argument("--xlm-src", default=None, help="CUDA: a facebookresearch/XLM checkout, to time its HashingMemory")
    ap.add_argument("--token-counts", type=lambda v: [int(x) for x in v.split(",")], default=[4096, 16384, 65536],
                    help="CUDA: comma-separated token counts of the layer table")
    ap.add_argument("--kernel-tokens", type=int, default=16384, help="CUDA: tokens for the per-kernel table")
    ap.add_argument("--json", default=None, help="CUDA: write all numbers to this JSON file")
    ap.add_argument("--profile-out", default=None, help="CUDA: write a torch.profiler table of one step here")
    args = ap.parse_args()
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is visible to torch.")
        args.dim = args.dim or 1024
        args.iters = max(args.iters, 10)
        import pkm_layer_gpu  # beside this script

        pkm_layer_gpu.run(args)
        return
    args.dim = args.dim or 768
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, nproc {os.cpu_count()}, "
          f"{platform.processor() or platform.machine()}")
    if not args.skip_layer:
        bench_layer(args)
    if not args.skip_opt:
        bench_value_step(args)


if __name__ == "__main__":
    main()
