"""The memory values under the Hugging Face ``Trainer``.

The value tables are no dense parameters (``requires_grad=False``; backward accumulates a row-sparse
gradient in ``table.sparse_grad``), so the Trainer's optimizer never sees them, and nothing would
clear their gradients. ``ValueTableCallback`` steps them with ``pkm.SparseAdam`` right after each
optimizer step, at a constant learning rate of their own; with ``freeze=True`` it drops their
gradients instead, so the values stay fixed and nothing piles up:

    trainer = Trainer(model=model, args=args, train_dataset=train,
                      callbacks=[ValueTableCallback(model, lr=1e-3)])

(The Trainer's gradient clipping covers the dense parameters only; ``finetune/`` clips both by one
global norm.)
"""

from __future__ import annotations

from torch import nn
from transformers.trainer_callback import TrainerCallback

from pkm.modeling import value_tables
from pkm.sparse_adam import SparseAdam

__all__ = ["ValueTableCallback"]


class ValueTableCallback(TrainerCallback):
    """Step (or, ``freeze=True``, clear) the memory value tables after every Trainer optimizer step."""

    def __init__(self, model: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0, freeze: bool = False) -> None:
        self.tables = value_tables(model)
        if not self.tables:
            raise ValueError(f"{type(model).__name__} has no memory value tables: the callback is not needed.")
        self.optimizer = None if freeze else SparseAdam(self.tables, lr=lr, weight_decay=weight_decay)

    def on_optimizer_step(self, args, state, control, **kwargs):  # noqa: ARG002
        if self.optimizer is not None:
            self.optimizer.step()  # also clears each table's sparse_grad
        else:
            for table in self.tables:
                table.zero_grad()
