"""Evaluation on the validation shards: MLM loss / accuracy and the memory usage metrics.

Every rank evaluates its share of the validation split (the same fixed masks every time: the
masking is seeded by (seed, epoch 0, sample index)); sums are all-reduced, so the numbers do not
depend on the world size except through which samples fall in the capped window. All ranks run
the same number of forward passes, because the sharded value lookup is a collective.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

import torch
import torch.distributed as dist

__all__ = ["ValidationData", "evaluate_mlm", "mlm_hits"]


class ValidationData:
    """The validation split, sharded over ranks, in a fixed order (no shuffle, one epoch)."""

    def __init__(self, shard_dir: str, split: str, max_seq_len: int, packing: str, mask_prob: float,
                 whole_word_masking: bool, seed: int, micro_batch: int, rank: int, world_size: int) -> None:
        from pretrain.data import MLMDataset

        self.dataset = MLMDataset(shard_dir, split=split, max_seq_len=max_seq_len, packing=packing,
                                  mask_prob=mask_prob, whole_word_masking=whole_word_masking, seed=seed)
        self.micro_batch = micro_batch
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_config(cls, cfg: Any, micro_batch: int, rank: int, world_size: int) -> "ValidationData":
        """The validation split of a run config (``pretrain.config.RunConfig``), this rank's share."""
        d = cfg.data
        return cls(d.shard_dir, d.val_split, d.max_seq_len, d.packing, d.mlm_probability, d.whole_word_masking,
                   cfg.train.seed, micro_batch, rank, world_size)

    def _sampler(self):
        from pretrain.data import MLMSampler

        return MLMSampler(len(self.dataset), rank=self.rank, world_size=self.world_size, seed=0,
                          shuffle=False, num_epochs=1)

    def num_batches(self, cap: int = 0) -> int:
        """Micro-batches this rank has (at most ``cap`` when cap > 0)."""
        n = -(-len(self._sampler()) // self.micro_batch)
        return min(n, cap) if cap > 0 else n

    def batches(self, n: int) -> Iterator[dict[str, torch.Tensor]]:
        keys: list[tuple[int, int]] = []
        done = 0
        for key in self._sampler():
            if done >= n:
                return
            keys.append(key)
            if len(keys) == self.micro_batch:
                yield self.dataset.collate([self.dataset[k] for k in keys])
                keys, done = [], done + 1
        if keys and done < n:
            yield self.dataset.collate([self.dataset[k] for k in keys])


def mlm_hits(logits: torch.Tensor, labels: torch.Tensor,
             masked_positions: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
    """(correct predictions, predicted positions) of one micro-batch, without a host sync when
    ``masked_positions`` are known or the logits cover every position. logits: [M, vocab] (only the
    labelled positions, in row-major order) or [B, S, vocab]; labels [B, S] (-100: not predicted)."""
    if logits.dim() == 3:
        predicted = labels != -100  # [B, S]
        return ((logits.argmax(-1) == labels) & predicted).sum(), predicted.sum()
    if masked_positions is not None:
        target = labels.reshape(-1).index_select(0, masked_positions)  # [M]
    else:
        target = labels[labels != -100]  # [M]; a boolean index syncs on a GPU
    return (logits.argmax(-1) == target).sum(), target.numel()


def _all_reduce(t: torch.Tensor, group: Any, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _perplexity(mean_loss: float) -> float:
    """exp(loss), capped at exp(50) for a finite loss; NaN and inf stay what they are (``min``
    would turn NaN into the cap)."""
    if not math.isfinite(mean_loss):
        return mean_loss if mean_loss > 0 else float("nan")
    return math.exp(min(50.0, mean_loss))


@torch.no_grad()
def evaluate_mlm(
    model: Any,
    val_data: ValidationData,
    max_batches: int,
    device: torch.device,
    num_rows: list[int],
    group: Any = None,
) -> tuple[dict[str, float], list[Any]]:
    """MLM loss/accuracy over (at most ``max_batches`` per rank of) the validation split, and one
    filled ``MemoryUsage`` per memory layer (already all-reduced when computed with the group).

    ``model`` is the DeepSpeed engine (or any module taking the batch dict and returning .loss/.logits);
    it is put in eval mode and back in train mode afterwards. Its BatchNorm running statistics are
    first averaged over the ranks of ``group`` (``pkm.memory.average_batchnorm_statistics``).
    """
    from pkm.memory import average_batchnorm_statistics
    from pkm.modeling import last_memory_outputs
    from pkm.usage import MemoryUsage

    # every rank evaluates with the same running statistics: their mean over the ranks
    average_batchnorm_statistics(model, group)
    was_training = model.training
    model.eval()
    usages = [MemoryUsage(n, device=device) for n in num_rows]
    n_local = val_data.num_batches(max_batches)
    n = int(_all_reduce(torch.tensor([n_local], device=device), group, op=dist.ReduceOp.MIN).item())
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # sum loss*M, correct, M, tokens
    for batch in val_data.batches(n):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch["labels"]
        selected = labels != -100  # [B, S]
        out = model(**batch, masked_logits_only=True)  # logits [M, vocab]
        m = selected.sum()
        # a batch without masked tokens has a NaN mean over nothing and weight 0; any other
        # non-finite loss is the model's (a diverged run) and must show in the result
        sums[0] += torch.where(m > 0, out.loss.double() * m, torch.zeros((), dtype=torch.float64, device=device))
        sums[1] += mlm_hits(out.logits, labels)[0]
        sums[2] += m
        sums[3] += batch["attention_mask"].sum()
        for usage, mo in zip(usages, last_memory_outputs(model)):
            usage.update(mo.indices, mo.weights)
    _all_reduce(sums, group)
    loss_sum, correct, masked, tokens = sums.tolist()
    metrics = {
        "loss": loss_sum / masked if masked else float("nan"),
        "mlm_acc": correct / masked if masked else float("nan"),
        "perplexity": _perplexity(loss_sum / masked) if masked else float("nan"),
        "tokens": tokens,
        "batches_per_rank": float(n),
    }
    if was_training:
        model.train()
    return metrics, usages
