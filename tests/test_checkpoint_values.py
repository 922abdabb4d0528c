"""pkm.checkpoint_values: value tables with their SparseAdam state saved per column shard, loaded
onto another number of ranks (resharded on load or offline) and into one unsharded table.

The sharded checkpoints come from the 3-rank spawn of tests/test_sharded_values.py (``runs``):
checkpoints written by 1, 2 and 3 ranks, loaded by 2 or 3 ranks, continued one step and held
against the single-process reference.
"""

from __future__ import annotations

import os

import pytest
import torch

from pkm.checkpoint_values import (
    META_FILE,
    load_full_values,
    load_value_shards,
    reshard_value_checkpoint,
    save_value_shards,
    shard_file_name,
)
from pkm.sharded_values import column_bounds
from pkm.sparse_adam import SparseAdam
from pkm.values import ValueTable
from tests.test_sharded_values import ADAM, COUNTS_C, DIM, N_ROWS, _cat_cols, _close, _ranks, runs  # noqa: F401


@pytest.mark.parametrize("case,src,counts", [("load2to3", 2, COUNTS_C[3]), ("load3to2", 3, COUNTS_C[2]),
                                             ("load1to2", 1, COUNTS_C[2])])
def test_reshard_on_load_then_identical_forward_and_step(runs, case, src, counts):  # noqa: F811
    ranks, ref = _ranks(runs, case), runs["ref"]["layer"]
    cont = ref["after_load"]
    assert [r["bounds"] for r in ranks] == column_bounds(DIM, len(counts))
    assert all(r["lr"] == ADAM["lr"] for r in ranks)  # hyperparams restored from the metadata
    _close(_cat_cols(ranks, "loaded_weight"), ref["weight_after_step"])
    _close(_cat_cols(ranks, "loaded_exp_avg_sq"), ref["opt"].state[ref["table"].weight]["exp_avg_sq"])
    _close(torch.cat([r["out"] for r in ranks]), cont["out"])
    _close(torch.cat([r["w_grad"] for r in ranks]), cont["w_grad"])
    _close(_cat_cols(ranks, "weight"), cont["weight"])
    _close(_cat_cols(ranks, "exp_avg"), cont["exp_avg"])
    for r in ranks:
        torch.testing.assert_close(r["row_step"], cont["row_step"], atol=0, rtol=0)


@pytest.mark.parametrize("src", [2, 3])
def test_sharded_checkpoint_loads_into_one_unsharded_table(runs, src):  # noqa: F811
    ref = runs["ref"]["layer"]
    table = ValueTable(N_ROWS, DIM, init="zeros")
    opt = SparseAdam([table])
    load_value_shards(runs["ckpt"][src], {"mem": table}, opt)
    _close(table.weight, ref["weight_after_step"])
    ref_state = ref["opt"].state[ref["table"].weight]
    for key in ("exp_avg", "exp_avg_sq", "row_step"):
        _close(opt.state[table.weight][key], ref_state[key])
    full = load_full_values(runs["ckpt"][src])["mem"]
    torch.testing.assert_close(full.weight, table.weight, atol=0, rtol=0)


def test_offline_reshard_is_exact(runs, tmp_path):  # noqa: F811
    src = runs["ckpt"][3]
    reshard_value_checkpoint(src, tmp_path / "p2", 2)
    reshard_value_checkpoint(tmp_path / "p2", tmp_path / "p1", 1)
    assert sorted(os.listdir(tmp_path / "p2")) == sorted([META_FILE] + [shard_file_name(r, 2) for r in range(2)])
    a, b = load_full_values(src)["mem"], load_full_values(tmp_path / "p1")["mem"]
    for key in ("weight", "exp_avg", "exp_avg_sq", "row_step"):
        torch.testing.assert_close(getattr(a, key), getattr(b, key), atol=0, rtol=0)
    assert not [f for f in os.listdir(tmp_path / "p2") if f.startswith(".tmp-")]  # no temp leftovers


def test_checkpoint_errors_are_clear(tmp_path):
    table = ValueTable(N_ROWS, DIM)
    save_value_shards(tmp_path / "one", {"mem": table}, None)
    reshard_value_checkpoint(tmp_path / "one", tmp_path / "two", 2)
    for n, d in ((N_ROWS + 1, DIM), (N_ROWS, DIM + 1)):
        with pytest.raises(ValueError, match="checkpoint .* holds 64 x 7"):
            load_value_shards(tmp_path / "two", {"mem": ValueTable(n, d)})
    with pytest.raises(ValueError, match="not in checkpoint"):
        load_value_shards(tmp_path / "two", {"other": ValueTable(N_ROWS, DIM)})
    os.remove(tmp_path / "two" / shard_file_name(1, 2))
    before = table.weight.clone()
    with pytest.raises(ValueError, match="missing shard file.*values_shard_00001-of-00002.pt"):
        load_value_shards(tmp_path / "two", {"mem": table})
    torch.testing.assert_close(table.weight, before, atol=0, rtol=0)  # nothing was modified
    with pytest.raises(ValueError, match="is missing"):
        load_full_values(tmp_path / "nothing")
    opt = SparseAdam([ValueTable(N_ROWS, DIM)])
    with pytest.raises(ValueError, match="does not hold"):
        save_value_shards(tmp_path / "x", {"mem": table}, opt)
