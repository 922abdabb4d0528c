"""Memory usage metrics on hand-built index streams: every expected value is worked out by hand."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from pkm.usage import (
    MemoryUsage,
    StalenessTracker,
    default_bin_edges,
    gini_coefficient,
    kl_to_uniform,
    summarize,
)

# N = 8 slots, one head, k = 2. Three tokens:
#   t0: slots (0, 1) weights (0.75, 0.25)  -> top-1 slot 0
#   t1: slots (2, 0) weights (1.00, 0.00)  -> top-1 slot 2 (a zero-weight selection still counts)
#   t2: slots (0, 1) weights (0.75, 0.25)  -> top-1 slot 0
# selections c = (3, 2, 1, 0, ...) -> usage 3/8
# mass m = (1.5, 0.5, 1.0, 0, ...), total 3 -> p = (1/2, 1/6, 1/3)
# top-1 slots {0, 2} -> top1_usage 2/8
IDX = torch.tensor([[0, 1], [2, 0], [0, 1]])
W = torch.tensor([[0.75, 0.25], [1.0, 0.0], [0.75, 0.25]])
KL = 0.5 * math.log(0.5 * 8) + (1 / 6) * math.log(8 / 6) + (1 / 3) * math.log(8 / 3)
# Gini by formula on sorted masses (0,0,0,0,0,0.5,1,1.5), ranks 6..8:
# (3*0.5 + 5*1 + 7*1.5) / (8 * 3) = 17/24; pairwise check: sum_{i<j}|x_i-x_j| = 15 + 2 = 17, 2*17/(2*8*3).
GINI = 17 / 24


def test_hand_built_stream_one_head():
    mu = MemoryUsage(8)
    mu.update(IDX, W)
    m = mu.compute()
    assert m["usage"] == 3 / 8
    assert m["top1_usage"] == 2 / 8
    assert m["tokens"] == 3
    assert m["kl_uniform"] == pytest.approx(KL, abs=1e-12)
    assert m["gini"] == pytest.approx(GINI, abs=1e-12)
    assert mu.selection_counts().tolist() == [3, 2, 1, 0, 0, 0, 0, 0]
    assert mu.weight_mass().tolist() == [1.5, 0.5, 1.0, 0, 0, 0, 0, 0]
    assert mu.top1_counts().tolist() == [2, 0, 1, 0, 0, 0, 0, 0]


def test_stream_split_over_batches_and_shapes_equals_one_batch():
    mu = MemoryUsage(8)
    mu.update(IDX[:1].unsqueeze(1), W[:1].unsqueeze(1))  # [T, 1, K] form
    mu.update(IDX[1:].int(), W[1:].to(torch.bfloat16))  # int32 indices, bf16 weights (exact here)
    m = mu.compute()
    assert (m["usage"], m["top1_usage"], m["tokens"]) == (3 / 8, 2 / 8, 3)
    assert m["kl_uniform"] == pytest.approx(KL, abs=1e-12)
    assert m["gini"] == pytest.approx(GINI, abs=1e-12)


def test_heads_are_pooled_over_one_table():
    # One token, two heads sharing the 8-slot table:
    #   head 0: slots (3, 4) weights (0.25, 0.75) -> top-1 slot 4
    #   head 1: slots (5, 3) weights (1.0, 0.0)   -> top-1 slot 5
    # selections {3: 2, 4: 1, 5: 1} -> usage 3/8; top-1 {4, 5} -> 2/8
    # mass (3: 0.25, 4: 0.75, 5: 1.0), total 2 -> p = (1/8, 3/8, 1/2)
    mu = MemoryUsage(8)
    mu.update(torch.tensor([[[3, 4], [5, 3]]]), torch.tensor([[[0.25, 0.75], [1.0, 0.0]]]))
    m = mu.compute()
    assert (m["usage"], m["top1_usage"], m["tokens"]) == (3 / 8, 2 / 8, 1)
    kl = (1 / 8) * math.log(1) + (3 / 8) * math.log(3) + 0.5 * math.log(4)
    assert m["kl_uniform"] == pytest.approx(kl, abs=1e-12)
    # sorted (0,0,0,0,0,.25,.75,1): (3*.25 + 5*.75 + 7*1) / (8*2) = 11.5/16
    assert m["gini"] == pytest.approx(11.5 / 16, abs=1e-12)


def test_extremes_uniform_and_one_slot():
    n = 16
    mu = MemoryUsage(n)
    mu.update(torch.arange(n).view(4, 4), torch.full((4, 4), 0.25))
    m = mu.compute()
    assert m["usage"] == 1.0
    assert m["kl_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert m["gini"] == pytest.approx(0.0, abs=1e-12)
    assert m["top1_usage"] == 4 / n  # argmax keeps the first of equal weights: slots 0, 4, 8, 12

    mu.reset()
    mu.update(torch.tensor([[7, 7], [7, 7]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    m = mu.compute()
    assert (m["usage"], m["top1_usage"], m["tokens"]) == (1 / n, 1 / n, 2)
    assert m["kl_uniform"] == pytest.approx(math.log(n), abs=1e-12)
    assert m["gini"] == pytest.approx((n - 1) / n, abs=1e-12)


def test_empty_window():
    m = MemoryUsage(4).compute()
    assert (m["usage"], m["top1_usage"], m["tokens"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["kl_uniform"]) and math.isnan(m["gini"])


def test_free_functions_match_pairwise_definitions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(50, generator=g, dtype=torch.float64) * (torch.rand(50, generator=g) > 0.5)
    pairwise = (x[:, None] - x[None, :]).abs().sum() / (2 * x.numel() * x.sum())
    assert gini_coefficient(x) == pytest.approx(float(pairwise), abs=1e-12)
    p = x / x.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    assert kl_to_uniform(x) == pytest.approx(math.log(50) - float(entropy), abs=1e-12)


def test_counts_merge_and_load_counts_sum_windows():
    a, b, whole = MemoryUsage(8), MemoryUsage(8), MemoryUsage(8)
    a.update(IDX[:2], W[:2])
    b.update(IDX[2:], W[2:])
    whole.update(IDX, W)
    # What the trainer does across ranks: all_reduce(SUM) of counts(), then load_counts().
    summed = a.counts() + b.counts()
    c = MemoryUsage(8)
    c.load_counts(summed)
    assert c.compute() == whole.compute()
    a.merge(b)
    assert a.compute() == whole.compute()
    assert torch.equal(a.counts(), whole.counts())
    # counts() is a copy: changing it leaves the accumulator alone
    cnt = whole.counts()
    cnt.zero_()
    assert whole.compute()["tokens"] == 3


def test_bad_input_is_a_value_error():
    mu = MemoryUsage(8)
    with pytest.raises(ValueError, match="same shape"):
        mu.update(IDX, W[:, :1])
    with pytest.raises(ValueError, match="tokens, heads, knn"):
        mu.update(IDX.view(-1), W.view(-1))
    with pytest.raises(ValueError, match="integer"):
        mu.update(IDX.float(), W)
    with pytest.raises(ValueError, match="num_rows"):
        MemoryUsage(0)
    with pytest.raises(ValueError, match="shape"):
        mu.load_counts(torch.zeros(5))
    with pytest.raises(ValueError, match="merge"):
        mu.merge(MemoryUsage(4))
    with pytest.raises(IndexError):  # out-of-range slot: caught by index_add_ on CPU
        mu.update(torch.tensor([[8]]), torch.tensor([[1.0]]))


# Staleness, N = 6, created at step 0:
#   step 1: rows 0, 1 updated; step 2: rows 1, 2, 2; step 5: row 3; rows 4, 5 never.
# last update = (1, 2, 2, 5, 0, 0) -> at step 6 steps since update = (5, 4, 4, 1, 6, 6).
def _tracker() -> StalenessTracker:
    st = StalenessTracker(6)
    st.mark_updated(torch.tensor([0, 1]), 1)
    st.mark_updated(torch.tensor([1, 2, 2]), 2)
    st.mark_updated(torch.tensor([[3]]), 5)
    return st


def test_staleness_hand_built_sequence():
    st = _tracker()
    assert st.steps_since_update(6).tolist() == [5, 4, 4, 1, 6, 6]
    assert st.stale_fraction(6, 1) == 1.0
    assert st.stale_fraction(6, 4) == 5 / 6  # not updated in steps 3..6: all but row 3
    assert st.stale_fraction(6, 5) == 3 / 6  # rows 0, 4, 5
    assert st.stale_fraction(6, 7) == 0.0
    assert st.histogram(6, [0, 1, 2, 4, 8]).tolist() == [0, 1, 0, 5]
    assert st.histogram(6, [0, 5]).tolist() == [3]  # ages >= 5 fall outside the last edge
    assert default_bin_edges(6) == [0, 1, 2, 4, 8, math.inf]
    assert st.histogram(6).tolist() == [0, 1, 0, 5, 0]
    assert int(st.histogram(1000).sum()) == 6  # default edges count every slot


def test_staleness_start_step_and_errors():
    st = StalenessTracker(3, start_step=10)
    assert st.steps_since_update(12).tolist() == [2, 2, 2]
    st.mark_updated(torch.tensor([1]), 11)
    assert st.stale_fraction(12, 2) == 2 / 3
    with pytest.raises(ValueError, match="backwards"):
        st.mark_updated(torch.tensor([0]), 10)
    with pytest.raises(ValueError, match="backwards"):
        st.steps_since_update(5)
    with pytest.raises(ValueError, match="window_steps"):
        st.stale_fraction(12, 0)
    with pytest.raises(ValueError, match="increasing"):
        st.histogram(12, [0, 0, 4])
    with pytest.raises(ValueError, match="integer"):
        st.mark_updated(torch.tensor([0.0]), 12)


def test_staleness_state_dict_round_trip(tmp_path):
    st = _tracker()
    torch.save(st.state_dict(), tmp_path / "st.pt")
    back = StalenessTracker(6)
    back.load_state_dict(torch.load(tmp_path / "st.pt", weights_only=True))
    assert back.steps_since_update(6).tolist() == [5, 4, 4, 1, 6, 6]
    with pytest.raises(ValueError, match="backwards"):  # the latest step came back too
        back.mark_updated(torch.tensor([4]), 4)
    back.mark_updated(torch.tensor([4]), 6)
    assert back.stale_fraction(6, 4) == 4 / 6
    with pytest.raises(ValueError, match="slots"):
        StalenessTracker(5).load_state_dict(st.state_dict())


def test_summarize_keys_and_values():
    mu = MemoryUsage(8)
    mu.update(IDX, W)
    out = summarize(mu.compute(), _tracker(), step=6, window_steps=4)
    assert set(out) == {
        "memory/usage", "memory/kl_uniform", "memory/gini", "memory/top1_usage", "memory/tokens",
        "memory/stale_frac", "memory/stale_steps_mean",
    }
    assert out["memory/usage"] == 3 / 8
    assert out["memory/stale_frac"] == 5 / 6
    assert out["memory/stale_steps_mean"] == 26 / 6
    assert all(isinstance(v, float) for v in out.values())
    assert set(summarize(None, _tracker(), 6, 4, prefix="memory/layer3/")) == {
        "memory/layer3/stale_frac", "memory/layer3/stale_steps_mean"}
    with pytest.raises(ValueError, match="window_steps"):
        summarize(mu.compute(), _tracker())


def test_compute_over_a_process_group_sums_ranks(tmp_path):
    # Two gloo ranks, each with half the stream; compute(group) must give the whole stream's
    # metrics and leave each rank's local window untouched (so a second call is the same).
    script = textwrap.dedent(
        """
        import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp
        from pkm.usage import MemoryUsage
        IDX = torch.tensor([[0, 1], [2, 0], [0, 1]]); W = torch.tensor([[0.75, 0.25], [1.0, 0.0], [0.75, 0.25]])
        def run(rank, path):
            dist.init_process_group("gloo", init_method="file://" + path, rank=rank, world_size=2)
            mu = MemoryUsage(8)
            sl = slice(0, 2) if rank == 0 else slice(2, 3)
            mu.update(IDX[sl], W[sl])
            local = mu.compute()
            m1 = mu.compute(process_group=dist.group.WORLD)
            m2 = mu.compute(process_group=dist.group.WORLD)
            assert m1 == m2 and m1["tokens"] == 3 and m1["usage"] == 3 / 8 and m1["top1_usage"] == 2 / 8, m1
            assert mu.compute() == local
            dist.barrier()  # no teardown while the peer still talks on the group
            dist.destroy_process_group()
        if __name__ == "__main__":
            mp.spawn(run, args=(sys.argv[1],), nprocs=2)
        """
    )
    (tmp_path / "ranks.py").write_text(script)
    res = subprocess.run(
        [sys.executable, str(tmp_path / "ranks.py"), str(tmp_path / "rendezvous")],
        capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_update_on_cuda_has_no_host_sync():
    mu = MemoryUsage(512 * 512, device="cuda")
    idx = torch.randint(0, 512 * 512, (4096, 4, 32), device="cuda")
    w = torch.softmax(torch.randn(4096, 4, 32, device="cuda"), -1).to(torch.bfloat16)
    st = StalenessTracker(512 * 512, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mu.update(idx, w)
        st.mark_updated(idx.reshape(-1), 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mu.compute()["tokens"] == 4096
