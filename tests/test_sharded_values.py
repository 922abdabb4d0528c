"""Column-sharded value tables on spawned gloo ranks, held against the single-process layer.

One spawn of 3 CPU ranks serves every multi-rank test (process start-up dominates the cost): the
world group gives P = 3 and a sub-group of ranks {0, 1} gives P = 2 (so the table is exercised on a
group that is not WORLD). The scenarios run inside the workers; the assertions run here, against
references computed in this process.

Sizes are tiny: N = 64 rows, value dim 7 (uneven over 2 and 3 ranks), K = heads * knn = 8.
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pkm.checkpoint_values import (
    load_value_shards,
    save_value_shards,
)
from pkm.memory import ProductKeyMemory
from pkm.sharded_values import (
    ShardedValueTable,
    attach_sharded_values,
    column_bounds,
    data_parallel_grad_scale,
)
from pkm.sparse_adam import SparseAdam
from pkm.value_step import global_grad_norm
from pkm.values import ValueTable

ATOL = 1e-5
CFG = dict(input_dim=16, output_dim=7, n_keys=8, heads=2, knn=4, k_dim=8, query_norm="layernorm")
N_ROWS, DIM, K = 64, 7, 8
T_TOTAL = 14
COUNTS_A = {3: [5, 0, 9], 2: [3, 11], 1: [T_TOTAL]}  # uneven, one rank empty (P=3)
COUNTS_B = {3: [4, 7, 3], 2: [9, 5]}  # the mean-loss test needs tokens on every rank
COUNTS_C = {3: [2, 0, 12], 2: [14, 0]}
# fixed-capacity exchange: uneven counts (padding, an empty rank) and every rank full (no padding)
CAPACITY_UNEVEN = {3: ([5, 0, 9], 10), 2: ([3, 11], 12)}
CAPACITY_FULL = {3: ([4, 4, 4], 4), 2: ([6, 6], 6)}
BIG = {**CFG, "n_keys": 32}  # N = 1024 rows x 7: the largest tensor by far when held in full
BIG_FULL = 32 * 32 * DIM
ADAM = dict(lr=0.05, betas=(0.9, 0.99), eps=1e-3)  # eps large enough that the grad scale matters
DENSE_LR = 0.5


# --------------------------------------------------------------------------------------------------
# run a function on P spawned gloo ranks
# --------------------------------------------------------------------------------------------------


def _entry(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)  # 2 shared cores: no intra-op oversubscription
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),  # a deadlock fails the test instead of hanging it
    )
    try:
        result = fn(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    else:
        dist.barrier()  # nobody tears the group down while a peer still talks on it
    finally:
        dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 300.0) -> list:
    """Run ``fn(rank, *args)`` on ``world_size`` spawned gloo ranks (file:// rendezvous, so no
    port can clash); returns each rank's return value in rank order."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        ctx = mp.start_processes(
            _entry, args=(world_size, init_file, tmp, fn, args), nprocs=world_size,
            join=False, start_method="spawn",
        )
        end = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > end:
                    raise TimeoutError(f"ranks did not finish within {timeout_s} s")
        except Exception as exc:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            errors = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp)) if f.endswith(".err")]
            results_complete = all(os.path.exists(os.path.join(tmp, f"rank{r}.pt")) for r in range(world_size))
            # gloo sometimes aborts a process in its exit handlers after destroy_process_group
            # (SIGABRT, no traceback). When every rank finished and saved its result, the work under
            # test is complete and the results are checked below; anything else is a failure.
            shutdown_abort = isinstance(exc, mp.ProcessExitedException) and exc.signal_name == "SIGABRT"
            if errors or not (results_complete and shutdown_abort):
                raise AssertionError("\n".join(errors) or str(exc)) from exc
        return [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


# --------------------------------------------------------------------------------------------------
# shared data and helpers
# --------------------------------------------------------------------------------------------------


def _make_data() -> dict:
    g = torch.Generator().manual_seed(1234)
    torch.manual_seed(0)
    mem = ProductKeyMemory(**CFG)
    idx = torch.randint(0, N_ROWS, (T_TOTAL, K), generator=g)
    idx[0, :3] = 5  # duplicates within a token ...
    idx[9, 0] = 5  # ... and across tokens (on another rank)
    return {
        "state": mem.state_dict(),
        "x": [torch.randn(T_TOTAL, CFG["input_dim"], generator=g) for _ in range(2)],
        "y": [torch.randn(T_TOTAL, DIM, generator=g) for _ in range(2)],
        "probe": torch.randn(T_TOTAL, DIM, generator=g),
        "idx": idx,
        "idx_no_row0": torch.where(idx == 0, 1, idx),  # row 0 untouched: padding must not write it
        "w": torch.randn(T_TOTAL, K, generator=g),
        "probe2": torch.randn(T_TOTAL, DIM, generator=g),
    }


def _slices(counts: list[int]) -> list[slice]:
    out, start = [], 0
    for c in counts:
        out.append(slice(start, start + c))
        start += c
    return out


def _dense_grad(table: ValueTable) -> torch.Tensor:
    """table.sparse_grad as a dense [N, cols] tensor (zeros if none)."""
    dense = torch.zeros_like(table.weight)
    if table.sparse_grad is not None:
        dense[table.sparse_grad.rows] = table.sparse_grad.values
    return dense


def _dense_params(mem: ProductKeyMemory) -> list[tuple[str, torch.nn.Parameter]]:
    """Query net and keys (the value table has requires_grad=False)."""
    return [(n, p) for n, p in mem.named_parameters() if p.requires_grad]


def _memory(state: dict, external_values: bool = False) -> ProductKeyMemory:
    """The memory of ``state``; with external_values, without a table (one is handed in later)."""
    mem = ProductKeyMemory(**CFG, external_values=external_values)
    mem.load_state_dict({k: v for k, v in state.items() if not (external_values and k.startswith("values."))})
    return mem


def _with_shard(state: dict, group, grad_reduction: str) -> tuple[ProductKeyMemory, ShardedValueTable]:
    """The memory of ``state`` built without a table, handed this rank's shard of state's table."""
    mem = _memory(state, external_values=True)
    table = ShardedValueTable.from_full(state["values.weight"], group=group, grad_reduction=grad_reduction)
    mem.attach_values(table)
    return mem, table


class LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any op creates while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def _table_step(table: ValueTable, opt: SparseAdam, idx, w, probe) -> dict:
    """Table-level lookup, backward with a fixed probe, one SparseAdam step."""
    w = w.clone().requires_grad_(True)
    out = table(idx, w)
    (out * probe).sum().backward()
    value_grad = _dense_grad(table)
    rows = table.sparse_grad.rows.clone() if table.sparse_grad is not None else None  # the rows touched
    opt.step()  # (zeroes the grads)
    return {"out": out.detach(), "w_grad": w.grad, "value_grad": value_grad, "rows": rows,
            "weight": table.weight.detach().clone(),
            "exp_avg": opt.state[table.weight]["exp_avg"].clone(),
            "row_step": opt.state[table.weight]["row_step"].clone()}


# --------------------------------------------------------------------------------------------------
# scenarios run on the ranks
# --------------------------------------------------------------------------------------------------


def _scenario_layer(group, counts, data, ckpt_dir) -> dict:
    """Full layer with sharded values ("sum"): outputs, dense grads, value grads; table-level
    outputs and lookup-weight grads (duplicates, an empty rank, an all-empty call, bf16); one
    SparseAdam step; byte counts; then save the shard checkpoint."""
    r = dist.get_rank(group)
    sl = _slices(counts)[r]
    mem, table = _with_shard(data["state"], group, "sum")
    tables = {"mem": table}
    assert "values.weight" not in mem.state_dict()  # the shard is not a submodule
    out = mem(data["x"][0][sl]).output
    (out * data["probe"][sl]).sum().backward()
    res = {"out": out.detach(), "bounds": (table.col_start, table.col_end),
           "dense_grads": {n: p.grad.clone() for n, p in _dense_params(mem)},
           "value_grad": _dense_grad(table), "grad_norm": global_grad_norm([table])}
    opt = SparseAdam([table], **ADAM)
    opt.step()
    res["weight_after_step"] = table.weight.detach().clone()
    state = opt.state[table.weight]
    res["nbytes"] = {"weight": table.weight.nbytes, "exp_avg": state["exp_avg"].nbytes,
                     "exp_avg_sq": state["exp_avg_sq"].nbytes, "row_step": state["row_step"].nbytes}
    save_value_shards(ckpt_dir, tables, opt)

    # table level on a fresh shard of the same values: lookup-weight grads and duplicates
    t2 = ShardedValueTable.from_full(data["state"]["values.weight"], group=group, grad_reduction="sum")
    w = data["w"][sl].clone().requires_grad_(True)
    o2 = t2(data["idx"][sl], w)
    (o2 * data["probe"][sl]).sum().backward()
    res.update(table_out=o2.detach(), table_w_grad=w.grad, table_value_grad=_dense_grad(t2))
    # every rank empty: still a valid (communication-free) call with a backward
    t2.zero_grad()
    w0 = torch.zeros(0, K, requires_grad=True)
    o0 = t2(torch.zeros(0, K, dtype=torch.long), w0)
    o0.sum().backward()
    res["empty_shape"] = tuple(o0.shape)
    res["empty_grad_none"] = t2.sparse_grad is None
    # bf16 activations: the lookup returns bf16, gathered weights travel as bf16
    ob = t2(data["idx"][sl], data["w"][sl].to(torch.bfloat16))
    res["bf16_out"] = ob.detach()
    res["comm_bytes"] = dict(t2.comm_bytes)
    return res


def _scenario_mean(group, counts, data) -> dict:
    """Two data-parallel steps: loss_r = per-rank mean, dense grads averaged over ranks (as DDP /
    DeepSpeed do), value shard with grad_reduction="mean" and SparseAdam."""
    P, r = dist.get_world_size(group), dist.get_rank(group)
    sl = _slices(counts)[r]
    mem, table = _with_shard(data["state"], group, "mean")
    assert mem.value_table is table
    dense = torch.optim.SGD([p for _, p in _dense_params(mem)], lr=DENSE_LR)
    opt = SparseAdam([table], **ADAM)
    value_grads = []
    for step in range(2):
        out = mem(data["x"][step][sl]).output
        loss = ((out - data["y"][step][sl]) ** 2).sum(-1).mean()
        loss.backward()
        for _, p in _dense_params(mem):
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(P)
        value_grads.append(_dense_grad(table))
        dense.step()
        dense.zero_grad()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in _dense_params(mem)},
            "weight": table.weight.detach().clone(), "value_grads": value_grads,
            "scale": data_parallel_grad_scale(group)}


def _scenario_load(group, counts, data, ckpt_dir) -> dict:
    """Load a checkpoint written by another number of ranks, then a lookup + backward + step."""
    r = dist.get_rank(group)
    sl = _slices(counts)[r]
    table = ShardedValueTable(N_ROWS, DIM, group=group, init="zeros", grad_reduction="sum")
    opt = SparseAdam([table], lr=123.0)  # hyperparams come from the checkpoint
    load_value_shards(ckpt_dir, {"mem": table}, opt)
    res = {"bounds": (table.col_start, table.col_end), "loaded_weight": table.weight.detach().clone(),
           "loaded_exp_avg_sq": opt.state[table.weight]["exp_avg_sq"].clone(),
           "lr": opt.param_groups[0]["lr"]}
    res.update(_table_step(table, opt, data["idx"][sl], data["w"][sl], data["probe2"][sl]))
    return res


def _scenario_handed_in(group, counts, data) -> dict:
    """Memories built without tables get fresh shards from attach_sharded_values: no op on this rank
    creates a tensor of a full table's size (construction, shard init, forward, backward)."""
    sl = _slices(counts)[dist.get_rank(group)]
    with LargestTensor() as seen:
        model = torch.nn.ModuleDict({name: ProductKeyMemory(**BIG, external_values=True) for name in ("a", "b")})
        tables = attach_sharded_values(model, group=group, seed=5)
        out = model["a"](data["x"][0][sl]).output + model["b"](data["x"][1][sl]).output
        (out * data["probe"][sl]).sum().backward()
    assert all(m.value_table is tables[n] for n, m in model.items())
    return {"largest": seen.largest, "names": list(tables), "grad": tables["a"].sparse_grad is not None,
            "weights": {n: t.weight.detach().clone() for n, t in tables.items()}}


def _scenario_capacity(group, counts, capacity, data) -> dict:
    """Table-level lookup, backward and one SparseAdam step through the fixed-capacity exchange
    (``token_capacity``), and the bytes the same lookup sends with the counts exchange."""
    r = dist.get_rank(group)
    sl = _slices(counts)[r]
    res = {}
    for name, cap in (("fixed", capacity), ("counts", None)):
        table = ShardedValueTable.from_full(data["state"]["values.weight"], group=group, grad_reduction="sum",
                                            token_capacity=cap)
        step = _table_step(table, SparseAdam([table], **ADAM), data["idx_no_row0"][sl], data["w"][sl],
                           data["probe"][sl])
        step["comm_bytes"] = dict(table.comm_bytes)
        res[name] = step
    too_many = ShardedValueTable.from_full(data["state"]["values.weight"], group=group, token_capacity=1)
    try:
        too_many(data["idx"][:2], data["w"][:2])  # raises on every rank before any collective
    except ValueError as e:
        res["too_many"] = str(e)
    return res


def _scenario_frozen(group, counts, data) -> dict:
    """Query net and keys frozen (requires_grad False): the lookup weights need no gradient, and the
    shard must still get its value gradient (the autograd anchor)."""
    sl = _slices(counts)[dist.get_rank(group)]
    mem, table = _with_shard(data["state"], group, "sum")
    mem.requires_grad_(False)
    out = mem(data["x"][0][sl]).output
    (out * data["probe"][sl]).sum().backward()
    return {"value_grad": _dense_grad(table), "rows": table.sparse_grad.rows.clone()}


def _worker(rank: int, data: dict, ckpt: dict) -> dict:
    world = dist.group.WORLD
    pair = dist.new_group([0, 1])  # every rank must call new_group, members or not
    single = dist.new_group([0])  # P = 1: the communication-free path
    in_pair = rank < 2
    res: dict = {}
    if rank == 0:
        res["layer1"] = _scenario_layer(single, COUNTS_A[1], data, ckpt["1s"])
    res["layer3"] = _scenario_layer(world, COUNTS_A[3], data, ckpt[3])
    if in_pair:
        res["layer2"] = _scenario_layer(pair, COUNTS_A[2], data, ckpt[2])
    res["mean3"] = _scenario_mean(world, COUNTS_B[3], data)
    if in_pair:
        res["mean2"] = _scenario_mean(pair, COUNTS_B[2], data)
    res["handed3"] = _scenario_handed_in(world, COUNTS_B[3], data)
    if in_pair:
        res["handed2"] = _scenario_handed_in(pair, COUNTS_B[2], data)
    dist.barrier()  # every checkpoint is complete
    res["load2to3"] = _scenario_load(world, COUNTS_C[3], data, ckpt[2])
    if in_pair:
        res["load3to2"] = _scenario_load(pair, COUNTS_C[2], data, ckpt[3])
        res["load1to2"] = _scenario_load(pair, COUNTS_C[2], data, ckpt[1])
    for kind, cases in (("uneven", CAPACITY_UNEVEN), ("full", CAPACITY_FULL)):
        res[f"cap3_{kind}"] = _scenario_capacity(world, *cases[3], data)
        if in_pair:
            res[f"cap2_{kind}"] = _scenario_capacity(pair, *cases[2], data)
    res["frozen3"] = _scenario_frozen(world, COUNTS_A[3], data)
    if in_pair:
        res["frozen2"] = _scenario_frozen(pair, COUNTS_A[2], data)
    return res


# --------------------------------------------------------------------------------------------------
# single-process references and the one spawn
# --------------------------------------------------------------------------------------------------


def _reference_layer(data: dict) -> dict:
    mem = _memory(data["state"])
    out = mem(data["x"][0]).output
    (out * data["probe"]).sum().backward()
    ref = {"out": out.detach(), "dense_grads": {n: p.grad.clone() for n, p in _dense_params(mem)},
           "value_grad": _dense_grad(mem.values)}
    opt = SparseAdam([mem.values], **ADAM)
    opt.step()
    ref["table"], ref["opt"] = mem.values, opt
    ref["weight_after_step"] = mem.values.weight.detach().clone()
    t2 = ValueTable(N_ROWS, DIM)
    t2.weight.data.copy_(_memory(data["state"]).values.weight)
    w = data["w"].clone().requires_grad_(True)
    o2 = t2(data["idx"], w)
    (o2 * data["probe"]).sum().backward()
    ref.update(table_out=o2.detach(), table_w_grad=w.grad, table_value_grad=_dense_grad(t2))
    ref["bf16_out"] = t2(data["idx"], data["w"].to(torch.bfloat16)).detach()
    return ref


def _reference_mean(data: dict, counts: list[int]) -> dict:
    """Single process, global batch, loss = mean over ranks of the per-rank mean losses."""
    mem = _memory(data["state"])
    dense = torch.optim.SGD([p for _, p in _dense_params(mem)], lr=DENSE_LR)
    opt = SparseAdam([mem.values], **ADAM)
    value_grads = []
    for step in range(2):
        out = mem(data["x"][step]).output
        per_rank = [((out[s] - data["y"][step][s]) ** 2).sum(-1).mean() for s in _slices(counts)]
        (sum(per_rank) / len(counts)).backward()
        value_grads.append(_dense_grad(mem.values))
        dense.step()
        dense.zero_grad()
        opt.step()
    return {"params": {n: p.detach().clone() for n, p in _dense_params(mem)},
            "weight": mem.values.weight.detach().clone(), "value_grads": value_grads}


def _reference_tokens(data: dict, n: int) -> dict:
    """The local table on the first ``n`` tokens: _table_step and the touched rows."""
    table = ValueTable(N_ROWS, DIM)
    table.weight.data.copy_(data["state"]["values.weight"])
    return _table_step(table, SparseAdam([table], **ADAM), data["idx_no_row0"][:n], data["w"][:n],
                       data["probe"][:n])


def _reference_frozen(data: dict) -> dict:
    mem = _memory(data["state"])
    mem.requires_grad_(False)
    out = mem(data["x"][0]).output
    (out * data["probe"]).sum().backward()
    return {"value_grad": _dense_grad(mem.values), "rows": mem.values.sparse_grad.rows.clone()}


_RUNS: dict = {}


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """The one spawn of 3 ranks and the single-process references (shared with
    tests/test_checkpoint_values.py: computed once per session)."""
    if not _RUNS:
        _RUNS.update(_make_runs(tmp_path_factory))
    return _RUNS


def _make_runs(tmp_path_factory) -> dict:
    data = _make_data()
    root = tmp_path_factory.mktemp("value_ckpts")
    ckpt = {p: str(root / f"p{p}") for p in (1, "1s", 2, 3)}
    ref = _reference_layer(data)
    save_value_shards(ckpt[1], {"mem": ref["table"]}, ref["opt"])  # the 1-rank checkpoint
    # the state every load scenario starts from, continued one step in this process
    cont = ValueTable(N_ROWS, DIM, init="zeros")
    cont_opt = SparseAdam([cont], **ADAM)
    load_value_shards(ckpt[1], {"mem": cont}, cont_opt)
    ref["after_load"] = _table_step(cont, cont_opt, data["idx"], data["w"], data["probe2"])
    results = run_on_ranks(_worker, 3, data, ckpt)
    refs = {"layer": ref, "mean": {p: _reference_mean(data, COUNTS_B[p]) for p in (2, 3)},
            "tokens": {n: _reference_tokens(data, n) for n in {sum(c[0]) for c in (*CAPACITY_UNEVEN.values(),
                                                                                      *CAPACITY_FULL.values())}},
            "frozen": _reference_frozen(data)}
    return {"data": data, "ckpt": ckpt, "ref": refs, "ranks": results}


def _ranks(runs, key: str) -> list[dict]:
    return [r[key] for r in runs["ranks"] if key in r]


def _cat_cols(per_rank: list[dict], key: str) -> torch.Tensor:
    return torch.cat([r[key] for r in per_rank], dim=1)


def _close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("P", [1, 2, 3])
def test_layer_matches_single_process(runs, P):
    ranks, ref = _ranks(runs, f"layer{P}"), runs["ref"]["layer"]
    assert len(ranks) == P
    assert [r["bounds"] for r in ranks] == column_bounds(DIM, P)
    # outputs at full width for each rank's own tokens (a rank may have none)
    assert [r["out"].shape[0] for r in ranks] == COUNTS_A[P]
    _close(torch.cat([r["out"] for r in ranks]), ref["out"])
    # query/key grads: each rank's grad of its own loss; their sum is the global batch's grad
    for name, g in ref["dense_grads"].items():
        _close(sum(r["dense_grads"][name] for r in ranks), g)
    assert ref["dense_grads"]["keys"].abs().sum() > 0  # the comparison is not vacuous
    # value grads: every shard holds the grad of its columns over all ranks' tokens
    _close(_cat_cols(ranks, "value_grad"), ref["value_grad"])
    for r in ranks:  # the global norm (for clipping) is the same on every rank
        _close(r["grad_norm"].float(), ref["value_grad"].norm())
    # table level: lookup-weight grads, duplicates, bf16 activations
    _close(torch.cat([r["table_out"] for r in ranks]), ref["table_out"])
    _close(torch.cat([r["table_w_grad"] for r in ranks]), ref["table_w_grad"])
    _close(_cat_cols(ranks, "table_value_grad"), ref["table_value_grad"])
    bf16 = torch.cat([r["bf16_out"] for r in ranks])
    assert bf16.dtype == torch.bfloat16
    _close(bf16.float(), ref["bf16_out"].float(), atol=2e-2)
    assert all(r["empty_shape"] == (0, DIM) and r["empty_grad_none"] for r in ranks)
    # P = 1 sends nothing; otherwise every rank takes part in both directions
    assert all((r["comm_bytes"]["forward"] > 0 and r["comm_bytes"]["backward"] > 0) == (P > 1) for r in ranks)


@pytest.mark.parametrize("P", [1, 2, 3])
def test_optimizer_step_on_shards_matches_unsharded(runs, P):
    ranks, ref = _ranks(runs, f"layer{P}"), runs["ref"]["layer"]
    before = _memory(runs["data"]["state"]).values.weight
    assert not torch.allclose(ref["weight_after_step"], before)
    _close(_cat_cols(ranks, "weight_after_step"), ref["weight_after_step"])


@pytest.mark.parametrize("P", [2, 3])
def test_grad_scale_mean_matches_global_batch_with_averaged_loss(runs, P):
    ranks, ref = _ranks(runs, f"mean{P}"), runs["ref"]["mean"][P]
    assert all(r["scale"] == pytest.approx(1.0 / P) for r in ranks)
    for step in range(2):
        _close(torch.cat([r["value_grads"][step] for r in ranks], dim=1), ref["value_grads"][step])
    _close(_cat_cols(ranks, "weight"), ref["weight"])
    for name, p in ref["params"].items():
        for r in ranks:  # dense params stay replicated
            _close(r["params"][name], p)
    # the factor matters: the unscaled (summed) grad is P times the reference
    assert not torch.allclose(ranks[0]["value_grads"][0] * P, ref["value_grads"][0][:, : ranks[0]["value_grads"][0].shape[1]])


def test_no_rank_allocates_a_full_table(runs):
    for P in (2, 3):
        ranks = _ranks(runs, f"handed{P}")
        assert len(ranks) == P and all(r["names"] == ["a", "b"] and r["grad"] for r in ranks)
        assert all(0 < r["largest"] <= -(-DIM // P) * 32 * 32 for r in ranks), [r["largest"] for r in ranks]
    # the probe is not blind: a memory that builds its own table creates one of full size
    with LargestTensor() as seen:
        ProductKeyMemory(**BIG)
    assert seen.largest == BIG_FULL


def test_fresh_shards_form_the_same_table_for_any_rank_count(runs):
    """Each column has its own seeded generator: 2 and 3 ranks start from identical tables, and
    two memories from different ones."""
    two = {n: _cat_cols([r["weights"] for r in _ranks(runs, "handed2")], n) for n in ("a", "b")}
    three = {n: _cat_cols([r["weights"] for r in _ranks(runs, "handed3")], n) for n in ("a", "b")}
    for name in ("a", "b"):
        assert two[name].shape == (32 * 32, DIM)
        torch.testing.assert_close(two[name], three[name], atol=0, rtol=0)
    assert not torch.equal(two["a"], two["b"])
    torch.testing.assert_close(two["a"].std(), torch.tensor(DIM**-0.5), atol=0.02, rtol=0)


def test_attach_refuses_memories_that_own_a_full_table():
    with pytest.raises(ValueError, match=r"memories \['mem'\] own full value tables: build the model with external_values=True"):
        attach_sharded_values([("mem", ProductKeyMemory(**CFG))])


@pytest.mark.parametrize("P", [1, 2, 3])
def test_each_rank_holds_its_columns_only(runs, P):
    ranks = _ranks(runs, f"layer{P}")
    full = N_ROWS * DIM * 4
    widths = [e - s for s, e in (r["bounds"] for r in ranks)]
    assert sum(widths) == DIM and max(widths) - min(widths) <= 1
    for r, width in zip(ranks, widths):
        assert width in (DIM // P, -(-DIM // P))
        for key in ("weight", "exp_avg", "exp_avg_sq"):
            assert r["nbytes"][key] == N_ROWS * width * 4 <= full // P + N_ROWS * 4
        assert r["nbytes"]["row_step"] == N_ROWS * 4  # per-row counts: the same on every shard
    assert sum(r["nbytes"]["weight"] for r in ranks) == full


def test_construction_errors():
    with pytest.raises(ValueError, match="at least one column"):
        column_bounds(2, 3)
    assert column_bounds(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert column_bounds(8, 2) == [(0, 4), (4, 8)]
    if not dist.is_initialized():
        with pytest.raises(ValueError, match="initialised torch.distributed"):
            ShardedValueTable(N_ROWS, DIM)


@pytest.mark.parametrize("P", [2, 3])
@pytest.mark.parametrize("kind", ["uneven", "full"])
def test_fixed_capacity_exchange_matches_single_process(runs, P, kind):
    """Padded to a fixed capacity (no token count read on the host): the same outputs, lookup-weight
    grads, value grads, touched rows and SparseAdam step as the local table on the same tokens."""
    counts, capacity = (CAPACITY_UNEVEN if kind == "uneven" else CAPACITY_FULL)[P]
    ranks = [r["fixed"] for r in _ranks(runs, f"cap{P}_{kind}")]
    ref = runs["ref"]["tokens"][sum(counts)]
    assert [r["out"].shape[0] for r in ranks] == counts
    _close(torch.cat([r["out"] for r in ranks]), ref["out"])
    _close(torch.cat([r["w_grad"] for r in ranks]), ref["w_grad"])
    _close(_cat_cols(ranks, "value_grad"), ref["value_grad"])
    # padding touches no row: the same rows, the same per-row step counts, the same weights
    assert 0 not in ref["rows"].tolist()  # (so a padding slot sent to row 0 would show)
    for r in ranks:
        assert torch.equal(r["rows"], ref["rows"])
        assert torch.equal(r["row_step"], ref["row_step"])
    _close(_cat_cols(ranks, "weight"), ref["weight"])


@pytest.mark.parametrize("P", [2, 3])
def test_fixed_capacity_sends_no_more_than_the_counts_exchange_when_ranks_are_full(runs, P):
    """Every rank at the capacity (packing "full"): no padding travels, and the counts' all-gather
    is saved; with padding the traffic is that of C tokens per rank."""
    k, f32, i32 = K, 4, 4
    for kind, cases in (("full", CAPACITY_FULL), ("uneven", CAPACITY_UNEVEN)):
        counts, capacity = cases[P]
        for rank, res in enumerate(_ranks(runs, f"cap{P}_{kind}")):
            width = column_bounds(DIM, P)[rank][1] - column_bounds(DIM, P)[rank][0]
            fixed, exact = res["fixed"]["comm_bytes"], res["counts"]["comm_bytes"]
            rows = capacity if kind == "uneven" else counts[rank]
            expect_fwd = (P - 1) * capacity * k * (i32 + f32) + (P * capacity - capacity) * width * f32
            expect_bwd = capacity * (DIM - width) * f32 + (P - 1) * capacity * k * f32
            assert (fixed["forward"], fixed["backward"]) == (expect_fwd, expect_bwd), (kind, rank, fixed)
            if kind == "full":
                assert rows == capacity
                assert fixed["forward"] == exact["forward"] - 8 * (P - 1)  # only the counts are gone
                assert fixed["backward"] == exact["backward"]
            assert "token_capacity is 1" in res["too_many"]


@pytest.mark.parametrize("P", [2, 3])
def test_frozen_query_net_still_gives_the_values_their_gradient(runs, P):
    ranks, ref = _ranks(runs, f"frozen{P}"), runs["ref"]["frozen"]
    assert ref["value_grad"].abs().sum() > 0
    _close(_cat_cols(ranks, "value_grad"), ref["value_grad"])
    assert all(torch.equal(r["rows"], ref["rows"]) for r in ranks)
