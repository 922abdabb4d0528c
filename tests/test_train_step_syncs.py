"""A training step without host syncs: index lists instead of boolean masks, same numbers.

The collate makes the flat indices of the predicted positions and of the real tokens on the host;
the MLM head and the memory gather rows with them (no ``nonzero`` on the device), and a batch
without padding goes without its attention mask. Each path is checked bitwise against the boolean
mask path it replaces, and ``HostSyncDetector`` (benchmarks/train_step.py) against the old path, so
the benchmark's sync check (tests/test_benchmarks_train_step.py) can fail.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from benchmarks.train_step import HostSyncDetector
from pkm.modeling import BertPkmForMaskedLM
from pkm.presets import preset_config
from pretrain.data import IGNORE_INDEX, add_positions, collate_mlm
from pretrain.engine import compile_encoder_layers
from pretrain.evaluate import mlm_hits
from pretrain.trainer import model_inputs

pytestmark = pytest.mark.usefixtures("single_torch_thread")


def _model(**overrides) -> BertPkmForMaskedLM:
    torch.manual_seed(0)
    cfg = preset_config("tiny", **{"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, **overrides})
    model = BertPkmForMaskedLM(cfg)
    model.train()
    return model


def _batch(padded: bool, seed: int = 1) -> dict[str, torch.Tensor]:
    """A collated batch of 4 samples (lengths 12 or 9..12), 30% of positions labelled."""
    rng = np.random.default_rng(seed)
    lengths = [12, 9, 12, 10] if padded else [12] * 4
    samples = []
    for n in lengths:
        ids = rng.integers(5, 1000, n)
        labels = np.where(rng.random(n) < 0.3, ids, IGNORE_INDEX)
        labels[1] = ids[1]  # at least one per sample
        samples.append({"input_ids": ids, "labels": labels})
    return collate_mlm(samples, pad_token_id=0, with_positions=True)


def _step(model, batch, seed: int = 7):
    """loss, logits and every gradient of one forward/backward (same dropout draws for a seed)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads, [m.indices for m in out.memory_outputs]


def _assert_same(a, b) -> None:
    loss_a, logits_a, grads_a, idx_a = a
    loss_b, logits_b, grads_b, idx_b = b
    assert torch.equal(loss_a, loss_b) and torch.equal(logits_a, logits_b)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    assert all(torch.equal(x, y) for x, y in zip(idx_a, idx_b))


def test_collate_positions_are_the_boolean_masks_in_row_major_order():
    batch = _batch(padded=True)
    assert torch.equal(batch["masked_positions"], torch.nonzero((batch["labels"] != IGNORE_INDEX).reshape(-1))[:, 0])
    assert torch.equal(batch["token_positions"], torch.nonzero(batch["attention_mask"].reshape(-1))[:, 0])
    assert batch["token_positions"].numel() == 12 + 9 + 12 + 10
    x = torch.randn(*batch["labels"].shape, 3)
    assert torch.equal(x.reshape(-1, 3)[batch["masked_positions"]], x[batch["labels"] != IGNORE_INDEX])
    assert "masked_positions" not in collate_mlm([{"input_ids": np.arange(3), "labels": np.arange(3)}])


def test_position_gather_equals_boolean_mask_path_bitwise():
    """Padded batch: head and memory by index lists == by boolean masks (loss, logits, grads)."""
    model = _model()
    batch = _batch(padded=True)
    old = {k: v for k, v in batch.items() if k not in ("masked_positions", "token_positions")}
    _assert_same(_step(model, old), _step(model, batch))
    # model_inputs keeps the mask of a padded batch (attention needs it)
    assert "attention_mask" in model_inputs(batch)


def test_unpadded_batch_without_attention_mask_is_the_same_step():
    model = _model()
    batch = _batch(padded=False)
    inputs = model_inputs(batch)
    assert "attention_mask" not in inputs and "token_positions" in inputs
    old = {k: v for k, v in batch.items() if k not in ("masked_positions", "token_positions")}
    _assert_same(_step(model, old), _step(model, inputs))


def test_memory_rejects_mask_and_positions_together():
    model = _model()
    memory = model.bert.encoder.layer[1].memory
    x = torch.randn(2, 3, 64)
    with pytest.raises(ValueError, match="either attention_mask or token_positions"):
        memory(x, torch.ones(2, 3), token_positions=torch.arange(6))
    with pytest.raises(ValueError, match="token_positions must be a 1-D integer tensor"):
        memory(x, token_positions=torch.ones(6))


def test_mlm_hits_agree_between_logit_layouts():
    batch = _batch(padded=True)
    labels = batch["labels"]
    full = torch.randn(*labels.shape, 1000)
    full.view(-1, 1000)[batch["masked_positions"][0], labels.reshape(-1)[batch["masked_positions"][0]]] = 99.0
    masked = full[labels != IGNORE_INDEX]
    expected_correct = (masked.argmax(-1) == labels[labels != IGNORE_INDEX]).sum()
    assert expected_correct >= 1
    for logits, positions in ((full, None), (masked, batch["masked_positions"]), (masked, None)):
        correct, n = mlm_hits(logits, labels, positions)
        assert int(correct) == int(expected_correct) and int(n) == int(batch["masked_positions"].numel())


def test_detector_sees_the_boolean_mask_path_and_not_the_index_path():
    """The old path syncs in the MLM head and the memory; the new one in neither. What is left is
    the value table's own grouping (``unique`` sizes its sparse gradient and merges micro-batches)."""
    model = _model()
    batch = _batch(padded=True)
    old = {k: v for k, v in batch.items() if k not in ("masked_positions", "token_positions")}
    for inputs, expect_syncs in ((old, True), (batch, False)):
        model.zero_grad(set_to_none=True)
        with HostSyncDetector() as detector:
            model(**inputs).loss.backward()
        ours = [e for e in detector.events if e["where"].startswith(("pkm/", "pretrain/"))]
        files = {e["where"].split(":")[0] for e in ours}
        if expect_syncs:
            assert {"pkm/modeling.py", "pkm/memory.py"} <= files, detector.events
        else:
            assert files <= {"pkm/values.py"}, detector.events
            assert {e["op"] for e in ours} <= {"unique_consecutive", "_unique2"}, detector.events
    with HostSyncDetector() as detector:
        torch.ones(3).sum().item()
        torch.ones(2).tolist()
    assert [e["op"] for e in detector.events] == ["_local_scalar_dense", "Tensor.tolist"]


def test_compile_encoder_layers_skips_memory_layers_and_keeps_keys():
    model = _model(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.eval()
    batch = _batch(padded=True)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        before = model(**inputs).logits
    keys = list(model.state_dict())
    assert compile_encoder_layers(model, backend="eager") == 1  # layer 0; layer 1 holds the memory
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        after = model(**inputs).logits
    torch.testing.assert_close(after, before)


def test_add_positions_on_a_plain_batch():
    labels = torch.tensor([[-100, 5, -100], [7, -100, -100]])
    batch = add_positions({"labels": labels, "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])})
    assert batch["masked_positions"].tolist() == [1, 3] and batch["token_positions"].tolist() == [0, 1, 2, 3, 4]


def test_one_rank_checks_the_stop_flag_without_touching_the_device():
    """The per-step stop check needs an all-reduce (and its .item()) only with several ranks."""
    from pretrain.stop_flag import StopFlag

    flag = StopFlag()
    meta = torch.device("meta")  # a tensor made on it could not be read: any all-reduce would fail
    assert flag.agreed(world_size=1, device=meta) is False
    flag.requested = True
    assert flag.agreed(world_size=1, device=meta) is True


def test_two_rank_step_has_no_host_sync_from_the_tables_or_the_stop_flag():
    """2 gloo ranks, the real Trainer (tests/test_distributed_trainer.py): a non-log step and its
    stop agreement. With several ranks the token counts' .tolist() before every lookup and the stop
    flag's .item() used to sync every step; left are only the ones a single rank has too (the
    value tables' grouping in pkm/values.py and SparseAdam's, pkm/sparse_adam.py)."""
    from tests.test_distributed_trainer import two_rank_results

    for r in two_rank_results()["ranks"]:
        events = r["own"]["sync_events"]
        ours = [e for e in events if e["where"].startswith(("pkm/", "pretrain/"))]
        files = {e["where"].split(":")[0] for e in ours}
        assert files <= {"pkm/values.py", "pkm/sparse_adam.py"}, ours
        assert {e["op"] for e in ours if e["where"].startswith("pkm/values.py")} <= {"unique_consecutive", "_unique2"}


def test_two_rank_step_sends_exactly_the_unpadded_exchange():
    """``packing: full``: every rank has capacity = B*S tokens, so the fixed-size exchange pads
    nothing; the bytes of one step (forward and backward of the one memory) are those of the exact
    exchange of B*S tokens per rank: ids (int32) and weights (fp32) all-gathered, fp32 activation
    columns and output-grad columns all-to-all'd, fp32 partial weight grads back."""
    from tests.test_distributed_trainer import MICRO, SEQ, WORLD, two_rank_results

    for r in two_rank_results()["ranks"]:
        o = r["own"]
        c, k, dim, width, p = o["capacity"], o["K"], o["dim"], o["width"], WORLD
        assert c == MICRO * SEQ
        forward = (p - 1) * c * k * (4 + 4) + (p - 1) * c * width * 4
        backward = c * (dim - width) * 4 + (p - 1) * c * k * 4
        assert o["comm_bytes"] == {"forward": forward, "backward": backward}


def _under_sync_error(fn) -> None:
    """Run ``fn`` with torch's CUDA sync debug mode set to raise on any host sync."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_of_the_dense_model_never_waits_for_the_device():
    """Memory-less model, unpadded batch with index lists: embeddings, SDPA attention without a
    mask, MLM head by masked_positions, loss and backward run without one host sync."""
    model = _model(memory_layers=[]).cuda()
    inputs = {k: v.cuda() for k, v in model_inputs(_batch(padded=False)).items()}
    _under_sync_error(lambda: model(**inputs).loss.backward())


def _innermost_repo_file(e: BaseException) -> str | None:
    import traceback

    frames = [f.filename for f in traceback.extract_tb(e.__traceback__)]
    ours = [f for f in frames if os.path.basename(os.path.dirname(f)) in ("pkm", "pretrain")]
    return ours[-1] if ours else None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_with_memory_has_no_sync_in_the_layer_integration():
    """With a memory: a sync may remain inside the value table's kernels (pkm/values.py,
    pkm/sharded_values.py: the GPU-kernels issue), never in pkm/memory.py or pkm/modeling.py."""
    model = _model().cuda()
    inputs = {k: v.cuda() for k, v in model_inputs(_batch(padded=False)).items()}
    out = {}

    def forward():
        out["loss"] = model(**inputs).loss

    try:
        _under_sync_error(forward)
    except RuntimeError as e:
        where = _innermost_repo_file(e)
        assert where is not None and not where.endswith(("memory.py", "modeling.py")), (where, e)
        out["loss"] = model(**inputs).loss  # the rest of the check needs the graph
    try:
        _under_sync_error(lambda: out["loss"].backward())
    except RuntimeError as e:  # frames of backward functions may be lost across the autograd engine
        where = _innermost_repo_file(e)
        assert where is None or not where.endswith(("memory.py", "modeling.py")), (where, e)
