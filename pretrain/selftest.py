"""Cluster self-test: run it with the real job's launcher, configs and overrides before a long run.

    deepspeed [the job's launcher options] --module pretrain.selftest \\
        --deepspeed_config ds_configs/<x>.json --config <run config> [--section.key=value ...]
    torchrun [the job's options] -m pretrain.selftest --deepspeed_config ... --config ...
    ./run.sh selftest --deepspeed_config ... --config ...      (PKM_NUM_PROCS ranks, as ./run.sh pretrain)

On the real backend and world size, in a minute or two, it checks what a multi-node run otherwise
finds out hours in:

  collectives          all_gather, all_to_all (uneven splits), all_reduce, broadcast, barrier on a
                       group of their own (as the value tables have), results checked exactly
  sharded values       a sharded table's lookup, backward and SparseAdam step against one
                       unsharded table on the same random data (every rank's tokens concatenated)
  checkpoint folder    train.out_dir is one folder every rank reads and writes (nonce files), and a
                       value-shard save, reshard (P -> Q ranks) and load round trip there is exact
                       (in a selftest-<id> subfolder, removed afterwards with everything it wrote)
  all-to-all bandwidth the lookup's exchanges at the run's size: the all-gather of ids and weights
                       (tokens per micro-batch x heads x knn) and the all-to-all of the looked-up
                       rows (tokens per micro-batch x hidden size) in the activation dtype

Rank 0 prints a verdict table (check, status, detail); every rank exits 1 if any check failed on
any rank (2: the configs are wrong). Nothing of the training data is read. Collectives time out
after DEEPSPEED_TIMEOUT minutes (5 here unless set), so a broken network ends the test too.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable

os.environ.setdefault("DEEPSPEED_TIMEOUT", "5")  # minutes; read when deepspeed is first imported

if __package__ in (None, ""):
    sys.exit("error: run the self-test as a module: python -m pretrain.selftest ... or deepspeed --module pretrain.selftest ...")

import torch  # noqa: E402

__all__ = ["SelfTestContext", "CHECKS", "main"]

OK, FAIL, SKIP, INFO = "ok", "FAIL", "skip", "info"
EPS32 = torch.finfo(torch.float32).eps
_TEST_ROWS = 8192  # rows of the test table: enough for collisions and spread, small on any device
_TEST_TOKENS = 192  # tokens per rank for the equivalence check (its reference runs every rank's tokens)


@dataclass
class SelfTestContext:
    cfg: Any  # RunConfig
    ds: dict[str, Any]  # the resolved DeepSpeed config
    model_config: Any  # BertPkmConfig
    device: torch.device
    rank: int
    world: int
    group: Any  # the tables' kind of group: dist.new_group over every rank
    act_dtype: torch.dtype

    @property
    def memory(self):
        return self.model_config.memory if self.model_config.memory_layers else None


# --------------------------------------------------------------------------------------------------
# 1. collectives
# --------------------------------------------------------------------------------------------------


def check_collectives(ctx: SelfTestContext) -> tuple[str, str]:
    import torch.distributed as dist

    if ctx.world == 1:
        return SKIP, "one rank: the value tables issue no collective"
    r, P, dev, g = ctx.rank, ctx.world, ctx.device, ctx.group
    wrong = []
    # all_gather (the tables' all_gather_single / all_gather_into_tensor)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    mine = torch.arange(3, dtype=torch.int64, device=dev) + 10 * r
    out = torch.empty(3 * P, dtype=torch.int64, device=dev)
    gather(out, mine, group=g)
    want = torch.cat([torch.arange(3, dtype=torch.int64) + 10 * p for p in range(P)])
    if not torch.equal(out.cpu(), want):
        wrong.append("all_gather")
    # all_to_all with uneven splits: rank r sends r + q + 1 floats to rank q
    send_sizes = [r + q + 1 for q in range(P)]
    recv_sizes = [p + r + 1 for p in range(P)]
    send = torch.cat([torch.arange(n, dtype=torch.float32) + 1000 * r + 10 * q for q, n in enumerate(send_sizes)])
    recv = torch.empty(sum(recv_sizes), dtype=torch.float32, device=dev)
    dist.all_to_all_single(recv, send.to(dev), output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=g)
    want = torch.cat([torch.arange(n, dtype=torch.float32) + 1000 * p + 10 * r for p, n in enumerate(recv_sizes)])
    if not torch.equal(recv.cpu(), want):
        wrong.append("all_to_all (uneven)")
    # all_to_all with an empty block (a rank with zero tokens sends nothing)
    send_sizes = [0 if q == (r + 1) % P else 2 for q in range(P)]
    recv_sizes = [0 if r == (p + 1) % P else 2 for p in range(P)]
    send = torch.full((sum(send_sizes),), float(r), device=dev)
    recv = torch.empty(sum(recv_sizes), device=dev)
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes, group=g)
    want = torch.cat([torch.full((n,), float(p)) for p, n in enumerate(recv_sizes)])
    if not torch.equal(recv.cpu(), want):
        wrong.append("all_to_all (empty blocks)")
    # all_reduce: sum and max (the value-grad norm and the stop flag use them)
    x = torch.tensor([r + 1.0, float(r)], device=dev)
    dist.all_reduce(x, group=g)
    if x.cpu().tolist() != [P * (P + 1) / 2, P * (P - 1) / 2]:
        wrong.append("all_reduce(sum)")
    x = torch.tensor([float(r)], device=dev)
    dist.all_reduce(x, op=dist.ReduceOp.MAX, group=g)
    if x.item() != P - 1:
        wrong.append("all_reduce(max)")
    # broadcast from the first and the last rank
    for src in (0, P - 1):
        x = torch.full((4,), float(r), device=dev)
        dist.broadcast(x, src=dist.get_global_rank(g, src) if g is not None else src, group=g)
        if x.cpu().tolist() != [float(src)] * 4:
            wrong.append(f"broadcast(src={src})")
    dist.barrier(group=g)
    if wrong:
        return FAIL, "wrong results: " + ", ".join(wrong)
    return OK, f"all_gather, all_to_all (uneven, empty blocks), all_reduce (sum, max), broadcast, barrier on {P} ranks"


# --------------------------------------------------------------------------------------------------
# 2. sharded lookup + backward + SparseAdam == one unsharded table
# --------------------------------------------------------------------------------------------------


@dataclass
class _RandomData:
    full_weight: torch.Tensor  # [N, d]
    indices: list[torch.Tensor]  # per rank [T_r, K]
    weights: list[torch.Tensor]  # per rank [T_r, K]
    grads: list[torch.Tensor]  # per rank [T_r, d]: the output gradient


def _random_data(ctx: SelfTestContext, num_rows: int, dim: int, k: int, seed: int) -> _RandomData:
    """The same data on every rank: every rank's tokens (uneven counts, one rank with none when
    P > 2), drawn from generators seeded by (seed, rank)."""
    gen = torch.Generator().manual_seed(seed)
    full = torch.randn(num_rows, dim, generator=gen) / math.sqrt(dim)
    idx, w, g = [], [], []
    for p in range(ctx.world):
        gp = torch.Generator().manual_seed(seed * 1000 + p + 1)
        t = 0 if (ctx.world > 2 and p == ctx.world - 1) else _TEST_TOKENS - 17 * (p % 3)
        idx.append(torch.randint(0, num_rows, (t, k), generator=gp))
        w.append(torch.softmax(torch.randn(t, k, generator=gp), dim=1))
        g.append(torch.randn(t, dim, generator=gp))
    return _RandomData(full, idx, w, g)


def _table_dims(ctx: SelfTestContext) -> tuple[int, int, int]:
    """(rows, dim, lookups per token) of the test table: the run's value dim and heads x knn, and
    at most _TEST_ROWS rows."""
    mem = ctx.memory
    dim = ctx.model_config.hidden_size
    k = (mem.heads * mem.knn) if mem else 8
    rows = min(mem.num_slots, _TEST_ROWS) if mem else _TEST_ROWS
    return rows, dim, k


def _lookup_and_step(table, data: _RandomData, rank: int, device: torch.device, lr: float):
    """Lookup this rank's tokens, backward the given output grad, one SparseAdam step.
    -> (output [T, d], weights grad [T, K], sparse grad (rows, values) cloned, optimizer)."""
    from pkm.sparse_adam import SparseAdam

    w = data.weights[rank].detach().clone().to(device).requires_grad_(True)  # a leaf of its own
    out = table(data.indices[rank].to(device), w)
    (out * data.grads[rank].to(device)).sum().backward()
    sg = table.sparse_grad
    grad = (sg.rows.clone(), sg.values.clone()) if sg is not None else None
    opt = SparseAdam([table], lr=lr)
    opt.step()
    return out.detach(), w.grad.detach(), grad, opt


def _abs_bound(full_abs: torch.Tensor, idx: torch.Tensor, w_abs: torch.Tensor, g_abs: torch.Tensor):
    """sum |w v| per output element, sum |w g| per table element, sum |v g| per lookup: the scale of
    each computed quantity, from which its rounding bound follows (n * eps * sum |a_i b_i|)."""
    from pkm.values import ValueTable

    t = ValueTable(full_abs.shape[0], full_abs.shape[1], init="zeros")
    with torch.no_grad():
        t.weight.copy_(full_abs)
    t.triton = False
    wa = w_abs.clone().requires_grad_(True)
    out = t(idx, wa)
    (out * g_abs).sum().backward()
    return out.detach(), t.sparse_grad, wa.grad.detach()


def check_sharded_values(ctx: SelfTestContext) -> tuple[str, str]:
    from pkm.sharded_values import ShardedValueTable
    from pkm.values import ValueTable

    rows, dim, k = _table_dims(ctx)
    if dim < ctx.world:
        return FAIL, f"the value dim {dim} cannot be split over {ctx.world} ranks"
    data = _random_data(ctx, rows, dim, k, seed=20)
    lr = 1e-2
    sharded = ShardedValueTable.from_full(data.full_weight.to(ctx.device), group=ctx.group, grad_reduction="sum",
                                          device=ctx.device)
    s_out, s_wgrad, s_grad, _ = _lookup_and_step(sharded, data, ctx.rank, ctx.device, lr)
    # the reference: one table, every rank's tokens concatenated (what "sum" must equal)
    local = ValueTable(rows, dim, init="zeros", device=ctx.device)
    with torch.no_grad():
        local.weight.copy_(data.full_weight)
    cat = _RandomData(data.full_weight, [torch.cat(data.indices)], [torch.cat(data.weights)], [torch.cat(data.grads)])
    l_out, l_wgrad, l_grad, _ = _lookup_and_step(local, cat, 0, ctx.device, lr)
    start = sum(x.shape[0] for x in data.indices[: ctx.rank])
    mine = slice(start, start + data.indices[ctx.rank].shape[0])
    c0, c1 = sharded.col_start, sharded.col_end
    # rounding bounds from the arithmetic: each side sums n terms in fp32 (n = K for an output
    # element, the lookups of a row for a value grad, d + P for a lookup weight's grad)
    b_out, b_grad, b_wgrad = _abs_bound(data.full_weight.abs(), cat.indices[0], cat.weights[0].abs(), cat.grads[0].abs())
    counts = torch.bincount(cat.indices[0].reshape(-1), minlength=rows)
    problems = []

    def close(name, a, b, bound):
        a, b = a.float().cpu(), b.float().cpu()
        if a.shape != b.shape:
            problems.append(f"{name}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
            return
        excess = (a - b).abs() - bound.cpu()
        if excess.numel() and excess.max().item() > 0:
            problems.append(f"{name}: differs by {(a - b).abs().max().item():.3g} (bound exceeded by {excess.max().item():.3g})")

    close("lookup output", s_out, l_out[mine], 2 * k * EPS32 * b_out[mine] + 1e-30)
    close("lookup-weight grad", s_wgrad, l_wgrad[mine], 2 * (dim + ctx.world) * EPS32 * b_wgrad[mine] + 1e-30)
    if (s_grad is None) != (l_grad is None):
        problems.append("value grad: present on one side only")
    elif s_grad is not None:
        if not torch.equal(s_grad[0].cpu(), l_grad[0].cpu()):
            problems.append("value grad: other rows touched")
        else:
            rows_hit = l_grad[0].cpu()
            n = counts[rows_hit].float().unsqueeze(1)
            bound = 2 * n * EPS32 * b_grad.values[:, c0:c1].cpu() + 1e-30
            close("value grad", s_grad[1], l_grad[1][:, c0:c1], bound)
            # SparseAdam, step 1: update = lr * g / (|g| + eps) per element (bias corrections cancel);
            # its sensitivity to the grad's rounding is lr * eps_adam / (|g| + eps_adam)^2, plus the
            # rounding of the update and of the weight (a few ulps)
            g_ref = l_grad[1][:, c0:c1].float().cpu()
            eps_adam = 1e-8
            sens = lr * eps_adam / (g_ref.abs() + eps_adam) ** 2
            w_ref = local.weight.detach()[rows_hit.to(ctx.device)][:, c0:c1].cpu()
            step_bound = sens * bound + 8 * EPS32 * (w_ref.abs() + lr)
            close("SparseAdam step", sharded.weight.detach()[rows_hit.to(ctx.device)].cpu(), w_ref, step_bound)
            untouched = torch.ones(rows, dtype=torch.bool)
            untouched[rows_hit] = False
            if not torch.equal(sharded.weight.detach().cpu()[untouched], data.full_weight[untouched][:, c0:c1]):
                problems.append("SparseAdam changed rows no token looked up")
    if problems:
        return FAIL, "; ".join(problems)
    return OK, (f"{rows} x {dim} table, K={k}, {sum(x.shape[0] for x in data.indices)} tokens over {ctx.world} ranks: "
                "lookup, backward, SparseAdam step match one table")


# --------------------------------------------------------------------------------------------------
# 3. the checkpoint folder: shared, writable, and a save / reshard / load round trip
# --------------------------------------------------------------------------------------------------


def _remove_folders(folders: list[str]) -> None:
    """rmdir each (innermost first): a folder that holds anything else stays."""
    for folder in folders:
        try:
            os.rmdir(folder)
        except OSError:
            pass


def check_checkpoint_folder(ctx: SelfTestContext) -> tuple[str, str]:
    import torch.distributed as dist

    from pkm.checkpoint_values import META_FILE, load_value_shards, reshard_value_checkpoint, save_value_shards
    from pkm.checkpoint_values import shard_file_name
    from pkm.sharded_values import ShardedValueTable
    from pkm.sparse_adam import SparseAdam
    from pretrain.shared_storage import all_hosts, control_group, shared_folder_problems

    out_dir = ctx.cfg.train.out_dir
    created_out_dir = [not os.path.isdir(out_dir)] if ctx.rank == 0 else [False]
    box = [uuid.uuid4().hex[:12] if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, group=control_group())
    sub = os.path.join(out_dir, f"selftest-{box[0]}")
    hosts = all_hosts()
    problems = [p for p in shared_folder_problems(sub) if p]
    if problems:
        if ctx.rank == 0:  # the probe made the subfolder (and maybe out_dir): nothing else was written
            _remove_folders([sub] + ([out_dir] if created_out_dir[0] else []))
        return FAIL, (f"train.out_dir '{out_dir}' is not one folder every rank reads and writes (checkpoints need "
                      f"it): {'; '.join(problems[:3])}")
    rows, dim, k = _table_dims(ctx)
    data = _random_data(ctx, rows, dim, k, seed=21)
    table = ShardedValueTable.from_full(data.full_weight.to(ctx.device), group=ctx.group, device=ctx.device)
    *_, opt = _lookup_and_step(table, data, ctx.rank, ctx.device, 1e-2)
    q = 1 if ctx.world > 1 else min(2, dim)  # another layout than the run's
    src, dst = os.path.join(sub, f"P{ctx.world}"), os.path.join(sub, f"Q{q}")
    error = None
    try:
        save_value_shards(src, {"selftest": table}, opt, barrier=False)
    except Exception as e:  # noqa: BLE001 - reported below, after every rank is past the barrier
        error = f"save: {type(e).__name__}: {e}"
    dist.barrier(group=control_group())
    if ctx.rank == 0 and error is None:
        try:
            reshard_value_checkpoint(src, dst, q)
        except Exception as e:  # noqa: BLE001
            error = f"reshard: {type(e).__name__}: {e}"
    dist.barrier(group=control_group())
    back = ShardedValueTable(rows, dim, group=ctx.group, init="zeros", device=ctx.device)
    back_opt = SparseAdam([back], lr=1.0)
    try:
        if error is None:
            load_value_shards(dst, {"selftest": back}, back_opt)
            saved, loaded = opt.state[table.weight], back_opt.state[back.weight]
            same = torch.equal(back.weight, table.weight) and all(
                torch.equal(saved[key], loaded[key]) for key in ("exp_avg", "exp_avg_sq", "row_step"))
            if not same:
                error = f"the tables loaded from {q} rank(s) differ from the ones saved"
            elif back_opt.param_groups[0]["lr"] != opt.param_groups[0]["lr"]:
                error = "the optimizer's learning rate did not come back"
    except Exception as e:  # noqa: BLE001
        error = f"load: {type(e).__name__}: {e}"
    dist.barrier(group=control_group())
    if ctx.rank == 0:  # remove exactly what this test wrote
        for folder, n in ((src, ctx.world), (dst, q)):
            for name in [META_FILE] + [shard_file_name(r, n) for r in range(n)]:
                try:
                    os.remove(os.path.join(folder, name))
                except FileNotFoundError:
                    pass
        _remove_folders([dst, src, sub] + ([out_dir] if created_out_dir[0] else []))
    if error:
        return FAIL, f"value-shard round trip in '{sub}': {error}"
    return OK, (f"'{out_dir}' shared by {ctx.world} rank(s) on {len(set(hosts))} host(s); value shards saved by "
                f"{ctx.world}, resharded to {q}, loaded back exactly")


# --------------------------------------------------------------------------------------------------
# 4. all-to-all bandwidth at the run's size
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_collective(fn: Callable[[], None], device: torch.device, group, budget_s: float = 5.0) -> float:
    """Median seconds of ``fn`` (2 warm-up calls, then up to 20 timed or ``budget_s``); every rank
    times the same number of calls (the count is agreed through an all_reduce)."""
    import torch.distributed as dist

    for _ in range(2):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    one = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
    dist.all_reduce(one, op=dist.ReduceOp.MAX, group=_cpu_group())
    iters = int(max(3, min(20, budget_s // max(one.item(), 1e-6))))
    times = []
    for _ in range(iters):
        dist.barrier(group=_cpu_group())
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _cpu_group():
    from pretrain.shared_storage import control_group

    return control_group()


def check_bandwidth(ctx: SelfTestContext) -> tuple[str, str]:
    import torch.distributed as dist

    from pkm.sharded_values import column_bounds

    if ctx.world == 1:
        return SKIP, "one rank: the value tables issue no collective"
    mem = ctx.memory
    if mem is None:
        return SKIP, "the model has no memory layer"
    P, dev, g = ctx.world, ctx.device, ctx.group
    tokens = ctx.ds["train_micro_batch_size_per_gpu"] * ctx.cfg.data.max_seq_len  # an upper bound per micro-batch
    lookups = mem.heads * mem.knn
    dim = ctx.model_config.hidden_size
    widths = [e - s for s, e in column_bounds(dim, P)]
    elem = torch.empty((), dtype=ctx.act_dtype).element_size()
    # the forward's all-gather: every rank's ids (int32) and weights
    ids = torch.zeros(tokens, lookups, dtype=torch.int32, device=dev)
    ws = torch.zeros(tokens, lookups, dtype=ctx.act_dtype, device=dev)
    all_ids = ids.new_empty(P * tokens, lookups)
    all_ws = ws.new_empty(P * tokens, lookups)
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_gather():
        gather(all_ids, ids, group=g)
        gather(all_ws, ws, group=g)

    # the forward's all-to-all: [sum T, d/P] bag columns out, [T, d] rows in (the backward sends the same)
    send = torch.zeros(P * tokens * widths[ctx.rank], dtype=ctx.act_dtype, device=dev)
    recv = torch.zeros(tokens * dim, dtype=ctx.act_dtype, device=dev)
    in_sizes = [tokens * widths[ctx.rank]] * P
    out_sizes = [tokens * w for w in widths]

    def all_to_all():
        dist.all_to_all_single(recv, send, output_split_sizes=out_sizes, input_split_sizes=in_sizes, group=g)

    t_gather = _time_collective(all_gather, dev, g)
    t_a2a = _time_collective(all_to_all, dev, g)
    gather_bytes = (P - 1) * tokens * lookups * (4 + elem)  # received per rank
    a2a_bytes = (P - 1) * tokens * widths[ctx.rank] * elem  # sent per rank to the others
    dtype = str(ctx.act_dtype).removeprefix("torch.")
    return INFO, (f"per rank and micro-batch ({tokens} tokens, K={lookups}, d={dim}, {dtype}): all-gather ids+weights "
                  f"{gather_bytes / 2**20:.2f} MiB in {t_gather * 1e3:.2f} ms ({gather_bytes / t_gather / 1e9:.2f} GB/s), "
                  f"all-to-all rows {a2a_bytes / 2**20:.2f} MiB in {t_a2a * 1e3:.2f} ms "
                  f"({a2a_bytes / t_a2a / 1e9:.2f} GB/s); a lookup does both, its backward the all-to-all again")


CHECKS: list[tuple[str, Callable[[SelfTestContext], tuple[str, str]]]] = [
    ("collectives", check_collectives),
    ("sharded values", check_sharded_values),
    ("checkpoint folder", check_checkpoint_folder),
    ("all-to-all bandwidth", check_bandwidth),
]


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


def _context(argv: list[str], group) -> SelfTestContext:
    """The run's configs, checked as the job would check them (without its data or checkpoints)."""
    import json

    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pretrain.config import apply_overrides, config_from_dict, read_config_file
    from pretrain.main import _model_config, parse_cli, resolve_ds_config

    config_path, ds_path, run_over, ds_over = parse_cli(argv)
    cfg = config_from_dict(apply_overrides(read_config_file(config_path) if config_path else {}, run_over))
    if not ds_path or not os.path.isfile(ds_path):
        raise ValueError(f"DeepSpeed config {ds_path!r} does not exist: pass the job's --deepspeed_config.")
    with open(ds_path, encoding="utf-8") as f:
        ds_raw = apply_overrides(json.load(f), ds_over)
    world = dist.get_world_size()
    accel = get_accelerator()
    ds = resolve_ds_config(cfg, ds_raw, world, accel.device_name() != "cpu", ds_name=f"'{ds_path}'")
    model_config = _model_config(cfg, None, cfg.data.max_seq_len, world)
    bf16 = bool((ds.get("bf16") or ds.get("bfloat16") or {}).get("enabled"))
    fp16 = bool((ds.get("fp16") or {}).get("enabled"))
    act = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    return SelfTestContext(cfg, ds, model_config, torch.device(accel.current_device_name()), dist.get_rank(),
                           world, group, act)


def _combine(per_rank: list[list[tuple[str, str, str]]]) -> list[tuple[str, str, str]]:
    """One row per check: FAIL when any rank failed (its first failure's detail, with the ranks that
    failed), otherwise rank 0's row."""
    rows = []
    for i, (name, status, detail) in enumerate(per_rank[0]):
        failed = [r for r, results in enumerate(per_rank) if results[i][1] == FAIL]
        if failed:
            first = per_rank[failed[0]][i][2]
            ranks = ", ".join(map(str, failed[:8])) + ("..." if len(failed) > 8 else "")
            rows.append((name, FAIL, f"rank(s) {ranks}: {first}"))
        else:
            rows.append((name, status, detail))
    return rows


def format_table(rows: list[tuple[str, str, str]]) -> str:
    w0 = max(len("check"), *(len(r[0]) for r in rows))
    w1 = max(len("status"), *(len(r[1]) for r in rows))
    lines = [f"{'check':<{w0}}  {'status':<{w1}}  detail", f"{'-' * w0}  {'-' * w1}  {'-' * 6}"]
    lines += [f"{name:<{w0}}  {status:<{w1}}  {detail}" for name, status, detail in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from pretrain.distributed import init_distributed
    from pretrain.main import _single_process_env
    from pretrain.shared_storage import control_group, first_failure

    _single_process_env()
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    init_distributed()
    try:
        # every rank makes the groups first, in the same order, whatever fails later
        control_group()
        group = dist.new_group(list(range(dist.get_world_size()))) if dist.get_world_size() > 1 else None
        error, ctx = None, None
        try:
            ctx = _context(argv, group)  # the tables get a group of their own, as in training
        except Exception as e:  # noqa: BLE001 - every rank must hear of it
            error = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        try:
            first_failure(error)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        results = []
        for name, check in CHECKS:
            t0 = time.perf_counter()
            try:
                status, detail = check(ctx)
            except Exception as e:  # noqa: BLE001 - a check that raises fails; the others still run
                status, detail = FAIL, f"{type(e).__name__}: {e}"
                if os.environ.get("PKM_SELFTEST_TRACEBACK"):
                    traceback.print_exc()
            results.append((name, status, f"{detail} [{time.perf_counter() - t0:.1f} s]"))
        per_rank: list[Any] = [None] * ctx.world
        if ctx.world > 1:
            dist.all_gather_object(per_rank, results, group=control_group())
        else:
            per_rank = [results]
        rows = _combine(per_rank)
        failed = any(status == FAIL for _, status, _ in rows)
        if ctx.rank == 0:
            print(f"pkm-bert self-test: {ctx.world} rank(s), backend {dist.get_backend()}, device {ctx.device.type}")
            print(format_table(rows))
            print("verdict: " + ("FAIL" if failed else "PASS"))
            sys.stdout.flush()
        return 1 if failed else 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
