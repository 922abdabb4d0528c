"""GPU part of the PKM layer benchmark (``benchmarks/pkm_layer.py --device cuda``).

In one run, at 4k / 16k / 64k tokens and in fp32 and bf16 (autocast), the median CUDA-event time of
forward + backward + update of:

* ours with the Triton kernels (``pkm/triton_kernels.py``) — the default on CUDA;
* the same with the one-kernel selection (``fused_topk``; opt-in until these numbers decide);
* ours with the torch-op path (``table.triton = optimizer.triton = False``);
* XLM's ``HashingMemory`` (``pq_fast``, dense EmbeddingBag values, fused torch Adam) when its source
  is given with ``--xlm-src`` (a checkout of facebookresearch/XLM; not vendored);
* the FFN the memory sits beside (d -> 4d -> d, GELU, fused AdamW).

Then each value kernel alone at 16k tokens (bf16 activations) with its achieved bytes/s, by its own
byte count, against the measured device-to-device copy bandwidth; and the value step at a fixed
16k touched rows for N = 128^2, 512^2, 1024^2 (it must stay flat in N).

Layer shape (BERT-large): d = 1024, N = 512^2, 4 heads, top-32, k_dim 256, BatchNorm query.
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
import sys

import torch
from torch import nn

from pkm import ProductKeyMemory, SparseAdam, SparseGrad, ValueTable
from pkm import triton_kernels
from pkm.memory import _select_torch
from pkm.sparse_adam import _bump_row_steps
from pkm.values import sort_lookups


def cuda_ms(fn, iters: int, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` by CUDA events (each call timed on its own)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), 10)
    return 2 * nbytes / (ms / 1e3)


def _autocast(dtype: torch.dtype):
    return torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)


def ours_step_fn(args, x, grad_out, dtype, use_triton: bool, fused_topk: bool = False):
    mem = ProductKeyMemory(args.dim, args.dim, n_keys=args.n_keys, heads=args.heads, knn=args.knn,
                           k_dim=args.k_dim).cuda()
    mem.values.triton = use_triton
    mem.fused_topk = fused_topk
    dense = [p for p in mem.parameters() if p.requires_grad]
    dense_opt = torch.optim.AdamW(dense, lr=1e-4, fused=True)
    value_opt = SparseAdam([mem.values], lr=1e-3)
    value_opt.triton = use_triton

    def step():
        with _autocast(dtype):
            out = mem(x).output
        out.backward(grad_out.to(out.dtype))
        dense_opt.step()
        value_opt.step()
        dense_opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


def xlm_step_fn(args, x, grad_out, dtype):
    if args.xlm_src not in sys.path:
        sys.path.insert(0, args.xlm_src)
    from xlm.model.memory import HashingMemory

    parser = argparse.ArgumentParser()
    HashingMemory.register_args(parser)
    params = parser.parse_args([
        "--mem_implementation", "pq_fast", "--mem_n_keys", str(args.n_keys), "--mem_heads", str(args.heads),
        "--mem_knn", str(args.knn), "--mem_k_dim", str(args.k_dim), "--mem_query_batchnorm", "true",
        "--mem_sparse", "false",
    ])
    params.optimizer = "adam"
    HashingMemory.check_params(params)
    mem = HashingMemory.build(args.dim, args.dim, params).cuda()
    opt = torch.optim.Adam(mem.parameters(), lr=1e-3, fused=True)

    def step():
        with _autocast(dtype):
            out = mem(x)
        out.backward(grad_out.to(out.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


def ffn_step_fn(args, x, grad_out, dtype):
    d = args.dim
    ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)).cuda()
    opt = torch.optim.AdamW(ffn.parameters(), lr=1e-4, fused=True)

    def step():
        with _autocast(dtype):
            out = ffn(x)
        out.backward(grad_out.to(out.dtype))
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


def bench_layers(args) -> list[dict]:
    rows = []
    print(f"\n== layer fwd+bwd+update, d={args.dim}, N={args.n_keys}^2, H={args.heads}, k={args.knn}, "
          f"k_dim={args.k_dim}; median of {args.iters} (ms) ==")
    print("| tokens | dtype | ours (Triton) | ours (Triton + fused top-k) | ours (torch ops) | XLM | FFN | ours / XLM |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for tokens in args.token_counts:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            x = torch.randn(tokens, args.dim, device="cuda", requires_grad=True)
            grad_out = torch.randn(tokens, args.dim, device="cuda")
            res = {"tokens": tokens, "dtype": str(dtype).replace("torch.", "")}
            makers = {
                "ours_triton": lambda: ours_step_fn(args, x, grad_out, dtype, True),
                "ours_fused_topk": lambda: ours_step_fn(args, x, grad_out, dtype, True, fused_topk=True),
                "ours_torch": lambda: ours_step_fn(args, x, grad_out, dtype, False),
                "ffn": lambda: ffn_step_fn(args, x, grad_out, dtype),
            }
            if args.xlm_src:
                makers["xlm"] = lambda: xlm_step_fn(args, x, grad_out, dtype)
            for name, make in makers.items():
                try:
                    res[name] = cuda_ms(make(), args.iters)
                except torch.OutOfMemoryError:
                    res[name] = None
                except Exception as e:  # e.g. a kernel the installed Triton cannot compile: report, go on
                    print(f"# {name} at {tokens} tokens, {res['dtype']}: failed: {type(e).__name__}: {e}", flush=True)
                    res[name] = None
                torch.cuda.empty_cache()
            rows.append(res)
            fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
            ratio = (f"{res['ours_triton'] / res['xlm']:.2f}"
                     if res.get("xlm") and res.get("ours_triton") else "-")
            print(f"| {tokens} | {res['dtype']} | {fmt(res['ours_triton'])} | {fmt(res.get('ours_fused_topk'))} | "
                  f"{fmt(res['ours_torch'])} | "
                  f"{fmt(res.get('xlm'))} | {fmt(res['ffn'])} | {ratio} |", flush=True)
    return rows


def bench_kernels(args, bandwidth: float) -> list[dict]:
    """Each value kernel alone at ``args.kernel_tokens`` tokens, bf16 activations, real PKM indices."""
    tokens, d = args.kernel_tokens, args.dim
    torch.manual_seed(0)
    mem = ProductKeyMemory(d, d, n_keys=args.n_keys, heads=args.heads, knn=args.knn, k_dim=args.k_dim).cuda()
    with torch.no_grad(), _autocast(torch.bfloat16):
        res = mem(torch.randn(tokens, d, device="cuda"))
    k = args.heads * args.knn
    idx = res.indices.reshape(tokens, k).contiguous()
    w = res.weights.reshape(tokens, k).to(torch.bfloat16).contiguous()
    grad_out = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16)
    table = mem.values.weight.detach()
    order = sort_lookups(idx)
    offsets = torch.cat([order.offsets, order.offsets.new_tensor([idx.numel()])])
    uniq = order.rows.numel()
    lookups = idx.numel()
    grad_vals = torch.randn(uniq, d, device="cuda")
    opt = SparseAdam([mem.values], lr=1e-3)
    row_counts = torch.zeros(table.shape[0], device="cuda")
    sub = torch.randn(2 * args.heads, tokens, args.n_keys, device="cuda", dtype=torch.bfloat16)  # sub-key scores

    def adam():
        mem.values.sparse_grad = SparseGrad(order.rows, grad_vals)
        opt.step()

    f32, act, i64 = 4, 2, 8
    kernels = {
        # name: (fn, bytes it must move)
        "bag_forward": (lambda: triton_kernels.bag_forward(table, idx, w),
                        lookups * (d * f32 + i64 + act) + tokens * d * act),
        "row_grouped_backward (default launch, incl. segment plan)": (
            lambda: triton_kernels.row_grouped_backward(table, order.rows, offsets, order.perm, w, grad_out),
            uniq * (d * f32 + i64 + 2 * i64 + d * f32) + lookups * (i64 + act + d * act + 2 * f32)),
        "segment plan alone (sized by host bounds, no sync)": (
            lambda: triton_kernels.plan_segments(order.rows, offsets, lookups, 64), None),
        "sort_lookups (torch)": (lambda: sort_lookups(idx), None),
        # the selection from the sub-key scores: one kernel, and the torch ops it replaces
        "product_topk (one kernel)": (lambda: triton_kernels.product_topk(sub, args.knn), sub.numel() * act),
        "selection as torch ops (topk, candidates, topk)": (
            lambda: _select_torch(sub.view(args.heads, 2, tokens, args.n_keys), args.knn), sub.numel() * act),
        "sparse_adam (step: counts, corrections and update in one kernel)": (
            adam, uniq * (7 * d * f32 + i64 + 2 * f32)),
        # what that kernel absorbed: the per-row counts and corrections as the torch path's ops
        "per-row counts + bias corrections as torch ops (before)": (
            lambda: _bump_row_steps(row_counts, order.rows, 0.9, 0.999), None),
    }
    # launch variants of the row-grouped backward (block_d, block_r, seg, num_warps): the value table
    # with dots, and a sub-key-like table (128 columns, 4096 rows, ~1000 lookups per row) without
    GL = triton_kernels.GroupedLaunch
    for launch in (GL(256, 8, 32, 4), GL(256, 16, 32, 4), GL(256, 8, 64, 4), GL(128, 16, 32, 4),
                   GL(512, 4, 32, 4), GL(512, 8, 32, 8), GL(1024, 2, 32, 8), GL(1024, 4, 32, 8),
                   GL(1024, 4, 64, 8), GL(1024, 1, 1 << 30, 8)):
        kernels[f"row_grouped {tuple(launch)}"] = (
            lambda launch=launch: triton_kernels.row_grouped_backward(
                table, order.rows, offsets, order.perm, w, grad_out, True, launch),
            uniq * (d * f32 + i64 + 2 * i64 + d * f32) + lookups * (i64 + act + d * act + 2 * f32))
    sets, n, half = 2 * args.heads, args.n_keys, args.k_dim // 2
    sk_idx = (torch.randint(0, n, (tokens * sets, args.knn), device="cuda")
              + torch.arange(sets, device="cuda").repeat(tokens).unsqueeze(1) * n)
    sk_w = torch.randn(tokens * sets, args.knn, device="cuda")
    sk_rows = torch.randn(tokens * sets, half, device="cuda")
    sk_order = sort_lookups(sk_idx)
    sk_offsets = torch.cat([sk_order.offsets, sk_order.offsets.new_tensor([sk_idx.numel()])])
    sk_table = torch.randn(sets * n, half, device="cuda")
    for launch in (GL(128, 16, 32, 4), GL(128, 8, 32, 4), GL(128, 16, 64, 4), GL(64, 16, 32, 2),
                   GL(128, 16, 16, 4)):
        kernels[f"sub-key grad {tuple(launch)}"] = (
            lambda launch=launch: triton_kernels.row_grouped_backward(
                sk_table, sk_order.rows, sk_offsets, sk_order.perm, sk_w, sk_rows, False, launch),
            sets * n * (half * f32 + i64) + sk_idx.numel() * (i64 + f32 + half * f32))
    out = []
    print(f"\n== value kernels alone: {tokens} tokens, bf16 activations, {lookups} lookups, "
          f"{uniq} distinct rows; copy bandwidth {bandwidth / 1e12:.2f} TB/s ==")
    print("| kernel | ms | GB moved | achieved TB/s | % of copy |")
    print("|---|---:|---:|---:|---:|")
    for name, (fn, nbytes) in kernels.items():
        try:
            ms = cuda_ms(fn, args.iters)
        except Exception as e:  # a launch variant the installed Triton cannot compile: report, go on
            print(f"| {name} | failed: {type(e).__name__} | - | - | - |", flush=True)
            continue
        row = {"kernel": name, "ms": ms, "bytes": nbytes}
        if nbytes:
            row["tbps"] = nbytes / (ms / 1e3) / 1e12
            row["pct_copy"] = 100 * nbytes / (ms / 1e3) / bandwidth
            print(f"| {name} | {ms:.3f} | {nbytes / 1e9:.2f} | {row['tbps']:.2f} | {row['pct_copy']:.0f}% |")
        else:
            print(f"| {name} | {ms:.3f} | - | - | - |")
        out.append(row)
    return out


def use_fastest_launches(kernel_rows: list[dict]) -> dict:
    """Make the row-grouped backward use, for the rest of this run, the launch the sweep found
    fastest for the value table (dots, wide) and for the sub-keys (no dots, 128 columns); printed, so
    the layer table says what it measured. The library default is set from these results."""
    def best(prefix):
        rows = [r for r in kernel_rows if r["kernel"].startswith(prefix)]
        name = min(rows, key=lambda r: r["ms"])["kernel"]
        return triton_kernels.GroupedLaunch(*ast.literal_eval(name[len(prefix):]))  # the printed tuple

    values, subkeys = best("row_grouped "), best("sub-key grad ")
    triton_kernels.default_grouped_launch = lambda cols: values if cols >= 256 else subkeys
    print(f"\nlayer rows below use the fastest launches of the sweep: value table {tuple(values)}, "
          f"sub-keys {tuple(subkeys)} (block_d, block_r, seg, num_warps)")
    return {"values": list(values), "subkeys": list(subkeys)}


def bench_value_step(args) -> list[dict]:
    """SparseAdam step for the same 16k touched rows at growing N: flat in N is the point."""
    d, touched = args.dim, args.touched_rows
    rows = torch.randperm(128 * 128, device="cuda")[:touched].sort().values
    grad_values = torch.randn(touched, d, device="cuda")
    out = []
    print(f"\n== value step, {touched} touched rows x {d} (ms) ==")
    print("| N | Triton | torch ops |")
    print("|---:|---:|---:|")
    for n in (128, 512, 1024):
        table = ValueTable(n * n, d, device="cuda")
        res = {"N": n * n}
        for name, flag in (("triton", True), ("torch", False)):
            opt = SparseAdam([table], lr=1e-3)
            opt.triton = flag

            def step():
                table.sparse_grad = SparseGrad(rows, grad_values)
                opt.step()

            res[name] = cuda_ms(step, args.iters)
            del opt
        print(f"| {n * n} | {res['triton']:.3f} | {res['torch']:.3f} |")
        out.append(res)
        del table
        torch.cuda.empty_cache()
    return out


def profile_step(args, path: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    tokens = args.kernel_tokens
    x = torch.randn(tokens, args.dim, device="cuda", requires_grad=True)
    grad_out = torch.randn(tokens, args.dim, device="cuda")
    step = ours_step_fn(args, x, grad_out, torch.bfloat16, True)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    with open(path, "w") as f:
        f.write(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40))
    print(f"profile of 3 steps ({tokens} tokens, bf16, Triton) written to {path}")


def run(args) -> None:
    import triton

    props = torch.cuda.get_device_properties(0)
    print(f"GPU {props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"CUDA {torch.version.cuda}, driver {_driver_version()}")
    bandwidth = copy_bandwidth()
    print(f"device copy bandwidth: {bandwidth / 1e12:.2f} TB/s (read + write)")
    results = {"gpu": props.name, "torch": torch.__version__, "triton": triton.__version__,
               "driver": _driver_version(), "copy_tbps": bandwidth / 1e12}
    results["kernels"] = bench_kernels(args, bandwidth)
    results["launch_used"] = use_fastest_launches(results["kernels"])
    if not args.skip_layer:
        results["layers"] = bench_layers(args)
    if not args.skip_opt:
        results["value_step"] = bench_value_step(args)
    if args.profile_out:
        profile_step(args, args.profile_out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _driver_version() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"
