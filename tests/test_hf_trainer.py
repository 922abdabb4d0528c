"""ValueTableCallback: the memory values take part in Hugging Face Trainer finetuning (SparseAdam
after every optimizer step), or stay fixed without piling up gradients."""

from __future__ import annotations

import copy

import pytest
import torch

from pkm.hf_trainer import ValueTableCallback
from pkm.modeling import BertPkmForTokenClassification, value_tables
from pkm.presets import preset_config
from pkm.sparse_adam import SparseAdam


def model_and_loss():
    torch.manual_seed(0)
    model = BertPkmForTokenClassification(preset_config(
        "tiny", vocab_size=60, num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 60, (3, 8), generator=g)
    labels = torch.randint(0, 5, (3, 8), generator=g)
    return model, lambda m: m(input_ids=ids, labels=labels).loss


def test_callback_steps_the_values_as_sparse_adam_does():
    model, loss_of = model_and_loss()
    reference = copy.deepcopy(model)
    callback = ValueTableCallback(model, lr=1e-2)
    ref_opt = SparseAdam(value_tables(reference), lr=1e-2)
    before = value_tables(model)[0].weight.detach().clone()
    for _ in range(2):
        loss_of(model).backward()
        callback.on_optimizer_step(None, None, None)  # what the Trainer calls after optimizer.step()
        loss_of(reference).backward()
        ref_opt.step()
        model.zero_grad()
        reference.zero_grad()
    table = value_tables(model)[0]
    assert table.sparse_grad is None  # nothing piles up between steps
    assert not torch.equal(table.weight, before)
    assert torch.equal(table.weight, value_tables(reference)[0].weight)


def test_frozen_values_stay_and_drop_their_gradients():
    model, loss_of = model_and_loss()
    callback = ValueTableCallback(model, freeze=True)
    before = value_tables(model)[0].weight.detach().clone()
    loss_of(model).backward()
    assert value_tables(model)[0].sparse_grad is not None
    callback.on_optimizer_step(None, None, None)
    assert value_tables(model)[0].sparse_grad is None
    assert torch.equal(value_tables(model)[0].weight, before)
    with pytest.raises(ValueError, match="no memory value tables"):
        ValueTableCallback(torch.nn.Linear(2, 2))


def test_trainer_runs_the_callback(tmp_path):
    """The real Trainer (it needs `accelerate`, not in this project's pins: skipped without it)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    model, _ = model_and_loss()
    g = torch.Generator().manual_seed(2)
    rows = [{"input_ids": torch.randint(5, 60, (8,), generator=g), "labels": torch.randint(0, 5, (8,), generator=g)}
            for _ in range(8)]
    before = value_tables(model)[0].weight.detach().clone()
    args = TrainingArguments(str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to=[],
                             use_cpu=True, save_strategy="no")
    Trainer(model=model, args=args, train_dataset=rows, callbacks=[ValueTableCallback(model)]).train()
    assert not torch.equal(value_tables(model)[0].weight, before)
    assert value_tables(model)[0].sparse_grad is None
