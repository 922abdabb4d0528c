"""Training throughput in one place: model FLOPs per sequence and MFU (model FLOPs utilisation).

The benchmark (``benchmarks/train_step.py``) and the trainer's log both use these functions, so their
MFU numbers are the same quantity::

    FLOPs per sequence = (6 x N + 12 * s * d * L) * s

with N the non-embedding parameters (everything but the word / position / token-type embeddings,
the MLM decoder tied to the word embeddings, and the PKM value tables, which are lookups too),
s the sequence length, d the hidden size and L the number of layers. 6N per token is the forward
(2N) plus backward (4N) of the matmuls; 12 s d L per token is attention's QK^T and AV products,
forward and backward. It counts the model's useful work, not what an implementation happens to
execute (the MLM head's projection to the vocabulary is the tied embedding and is not counted, so
scoring all positions or only the masked ones gives the same FLOPs). For BERT-large at s = 128:
N = 302M (24 layers) + 1M (MLM head transform), about 2.37e11 FLOPs per sequence.

MFU = achieved model FLOP/s / peak FLOP/s of the accelerator (``peak_tflops``; 790 is the bf16
matmul rate measured on one H200, the default of the benchmark and of ``train.peak_tflops``).
"""

from __future__ import annotations

from torch import nn

__all__ = ["FLOP_FORMULA", "DEFAULT_PEAK_TFLOPS", "flops_per_sequence", "non_embedding_params", "mfu",
           "throughput_metrics"]

FLOP_FORMULA = "FLOPs/sequence = (6 x non-embedding params + 12*s*d*L) x s"
DEFAULT_PEAK_TFLOPS = 790.0  # bf16 dense matmul rate measured on one H200 (issue 12)


def flops_per_sequence(non_embedding: int, seq_len: int, hidden: int, layers: int) -> float:
    """Model FLOPs of one training sequence (forward + backward): (6 N + 12 s d L) s."""
    if min(non_embedding, seq_len, hidden, layers) <= 0:
        raise ValueError(f"flops_per_sequence needs positive sizes, got N={non_embedding}, s={seq_len}, "
                         f"d={hidden}, L={layers}.")
    return float(6 * non_embedding + 12 * seq_len * hidden * layers) * seq_len


def non_embedding_params(model: nn.Module) -> int:
    """Parameters of ``model`` that are not embedding tables: every nn.Embedding's weight (and the
    MLM decoder tied to it, counted once as the same tensor) and every PKM value table are left out.
    Works on a plain Hugging Face BERT, on BertPkm (with its tables inside or taken out by the
    trainer), and through a DeepSpeed engine (``engine.module``)."""
    from pkm.values import ValueTable

    excluded = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Embedding, ValueTable))}
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in excluded or id(p) in seen:
            continue
        seen.add(id(p))
        total += int(getattr(p, "ds_numel", p.numel()))  # ZeRO-3 partitions leave numel() == 0
    return total


def mfu(sequences_per_s: float, flops_per_seq: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation: sequences/s x FLOPs/sequence over the peak (TFLOP/s x 1e12)."""
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be positive, got {peak_tflops}.")
    return sequences_per_s * flops_per_seq / (peak_tflops * 1e12)


def throughput_metrics(sequences: float, tokens: float, elapsed_s: float, flops_per_seq: float,
                       peak_tflops: float) -> dict[str, float]:
    """seq/s, tokens/s, achieved model TFLOP/s and MFU for ``sequences`` in ``elapsed_s`` seconds."""
    if elapsed_s <= 0:
        raise ValueError(f"elapsed_s must be positive, got {elapsed_s}.")
    seq_per_s = sequences / elapsed_s
    return {
        "seq_per_s": seq_per_s,
        "tokens_per_s": tokens / elapsed_s,
        "model_tflops": seq_per_s * flops_per_seq / 1e12,
        "mfu": mfu(seq_per_s, flops_per_seq, peak_tflops),
    }
