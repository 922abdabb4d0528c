"""Batches from tokenized rows: dynamic padding, seeded shuffling per epoch."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


class Rows(torch.utils.data.Dataset):
    """Column-wise token lists (input_ids, attention_mask, token_type_ids, labels ...) as rows."""

    def __init__(self, columns: dict[str, Sequence]):
        lengths = {len(v) for v in columns.values()}
        assert len(lengths) == 1, f"columns of different lengths: {lengths}"
        self.columns = columns
        self.n = lengths.pop()

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.columns.items()}


def make_collate(pad_token_id: int):
    """Pad list-valued fields to the longest row of the batch; scalars become a 1-D tensor."""
    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        out = {}
        for key in rows[0]:
            values = [r[key] for r in rows]
            if isinstance(values[0], (list, tuple)):
                width = max(len(v) for v in values)
                pad = pad_token_id if key == "input_ids" else 0
                out[key] = torch.tensor([list(v) + [pad] * (width - len(v)) for v in values],
                                        dtype=torch.long)
            else:
                dtype = torch.float32 if isinstance(values[0], float) else torch.long
                out[key] = torch.tensor(values, dtype=dtype)
        return out
    return collate


def train_loader_factory(rows: Rows, batch_size: int, seed: int, pad_token_id: int):
    """make_loader(epoch): a fresh shuffle for each epoch, the same for the same (seed, epoch)."""
    collate = make_collate(pad_token_id)

    def make_loader(epoch: int) -> Iterator[dict]:
        gen = torch.Generator().manual_seed(seed * 1000 + epoch)
        return iter(torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=True,
                                                generator=gen, collate_fn=collate))
    return make_loader


def eval_loader(rows: Rows, batch_size: int, pad_token_id: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=False,
                                       collate_fn=make_collate(pad_token_id))


def steps_per_epoch(n_rows: int, batch_size: int) -> int:
    return (n_rows + batch_size - 1) // batch_size
