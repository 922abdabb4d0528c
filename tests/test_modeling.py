"""BERT + product-key memory models: shapes, masked-position MLM head, HF save/load and Auto
classes, gradients into the memory, parameter groups, presets, config validation."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMaskedLM,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
)

from pkm.memory import ProductKeyMemory
from pkm.modeling import (
    BertPkmConfig,
    BertPkmForMaskedLM,
    BertPkmForQuestionAnswering,
    BertPkmForSequenceClassification,
    BertPkmModel,
    last_memory_outputs,
    memory_modules,
    parameter_groups,
    value_tables,
)
from pkm.presets import PRESETS, preset_config
from pkm.values import ValueTable

VOCAB = 100
MODES = ["replace", "residual"]


def tiny_config(mode: str = "residual", **overrides) -> BertPkmConfig:
    kw = dict(
        vocab_size=VOCAB, max_position_embeddings=32, memory_mode=mode,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return preset_config("tiny", **{**kw, **overrides})


def batch(seed: int = 0, batch_size: int = 3, seq_len: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (batch_size, seq_len), generator=g)
    mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    mask[0, seq_len - 3 :] = 0  # padding in the first sequence
    labels = torch.full((batch_size, seq_len), -100)
    labels[:, 2] = ids[:, 2]
    labels[1, 5] = ids[1, 5]
    return ids, mask, labels


@pytest.mark.parametrize("mode", MODES)
def test_forward_shapes(mode):
    torch.manual_seed(0)
    cfg = tiny_config(mode)
    ids, mask, _ = batch()
    mlm = BertPkmForMaskedLM(cfg).eval()
    out = mlm(ids, attention_mask=mask)
    assert out.logits.shape == (3, 10, VOCAB)
    # one memory (layer 1); indices/weights only for the real (non-padded) tokens
    assert len(out.memory_outputs) == 1
    mem = out.memory_outputs[0]
    assert mem.indices.shape == (int(mask.sum()), cfg.mem_heads, cfg.mem_knn)
    assert mem.weights.shape == mem.indices.shape
    assert mem.output.shape == (3, 10, cfg.hidden_size)
    assert mem.output[0, -3:].abs().max() == 0  # padded positions get no memory output
    # the detached copy kept on the base model
    kept = last_memory_outputs(mlm)
    assert len(kept) == 1 and torch.equal(kept[0].indices, mem.indices)
    assert not kept[0].weights.requires_grad

    # structure: replace has no FFN in the memory layer, residual keeps it
    layer = mlm.bert.encoder.layer[1]
    assert hasattr(layer, "memory") and hasattr(layer, "intermediate") == (mode == "residual")
    assert not hasattr(mlm.bert.encoder.layer[0], "memory")

    cls = BertPkmForSequenceClassification(tiny_config(mode, num_labels=3)).eval()
    assert cls(ids, attention_mask=mask).logits.shape == (3, 3)
    qa = BertPkmForQuestionAnswering(cfg).eval()
    out = qa(ids, attention_mask=mask, start_positions=torch.tensor([1, 2, 3]),
             end_positions=torch.tensor([2, 4, 30]))
    assert out.start_logits.shape == (3, 10) and out.end_logits.shape == (3, 10)
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("mode", MODES)
def test_masked_position_logits_equal_full_logits(mode):
    torch.manual_seed(0)
    model = BertPkmForMaskedLM(tiny_config(mode)).train()  # training: BatchNorm uses batch stats
    ids, mask, labels = batch()
    masked = model(ids, attention_mask=mask, labels=labels)  # default in training: masked only
    full = model(ids, attention_mask=mask, labels=labels, masked_logits_only=False)
    selected = labels != -100
    assert masked.logits.shape == (int(selected.sum()), VOCAB)
    assert full.logits.shape == (3, 10, VOCAB)
    torch.testing.assert_close(masked.logits, full.logits[selected], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked.loss, full.loss, rtol=0, atol=1e-6)
    ref_loss = torch.nn.functional.cross_entropy(full.logits[selected], labels[selected])
    torch.testing.assert_close(masked.loss, ref_loss, rtol=0, atol=1e-6)
    # eval or no labels: full logits
    model.eval()
    assert model(ids, attention_mask=mask, labels=labels).logits.shape == (3, 10, VOCAB)
    model.train()
    assert model(ids, attention_mask=mask).logits.shape == (3, 10, VOCAB)
    with pytest.raises(ValueError):
        model(ids, attention_mask=mask, masked_logits_only=True)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_keys_query_net_and_values(mode):
    torch.manual_seed(0)
    model = BertPkmForMaskedLM(tiny_config(mode)).train()
    ids, mask, labels = batch()
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    (mem,) = memory_modules(model)
    for name, p in [("keys", mem.keys), ("query_proj", mem.query_proj.weight),
                    ("query_norm", mem.query_norm.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    table = mem.value_table
    assert table.weight.grad is None and not table.weight.requires_grad
    assert table.sparse_grad is not None and table.sparse_grad.values.abs().sum() > 0
    # rows with a gradient are exactly the rows the real tokens selected
    used = torch.unique(model.bert.last_memory_outputs[0].indices)
    assert torch.equal(table.sparse_grad.rows, used)


def test_sequence_classification_regression_and_classification():
    torch.manual_seed(0)
    ids, mask, _ = batch()
    reg = BertPkmForSequenceClassification(tiny_config(num_labels=1)).eval()
    target = torch.tensor([0.5, -1.0, 2.0])
    out = reg(ids, attention_mask=mask, labels=target)
    torch.testing.assert_close(out.loss, torch.nn.functional.mse_loss(out.logits.squeeze(-1), target))
    clf = BertPkmForSequenceClassification(tiny_config(num_labels=3)).eval()
    y = torch.tensor([0, 2, 1])
    out = clf(ids, attention_mask=mask, labels=y)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, y))


def test_save_pretrained_from_pretrained_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = BertPkmForMaskedLM(tiny_config("residual", hidden_dropout_prob=0.1)).train()
    ids, mask, labels = batch()
    for seed in range(3):  # move BatchNorm running stats away from their init
        model(*batch(seed)[:1], attention_mask=batch(seed)[1])
    with torch.no_grad():  # values differ from any fresh init
        value_tables(model)[0].weight.add_(torch.randn_like(value_tables(model)[0].weight))
    model.eval()
    ref = model(ids, attention_mask=mask)
    model.save_pretrained(tmp_path)

    loaded = BertPkmForMaskedLM.from_pretrained(tmp_path)
    src, dst = model.state_dict(), loaded.state_dict()
    assert src.keys() == dst.keys()
    for key in src:  # includes values.weight and query_norm.running_mean/var/num_batches_tracked
        assert torch.equal(src[key], dst[key]), key
    assert int(loaded.bert.encoder.layer[1].memory.query_norm.num_batches_tracked) == 3
    assert not value_tables(loaded)[0].weight.requires_grad  # stays out of dense optimizers
    out = loaded(ids, attention_mask=mask)
    assert torch.equal(out.logits, ref.logits)

    assert isinstance(AutoConfig.from_pretrained(tmp_path), BertPkmConfig)
    auto_mlm = AutoModelForMaskedLM.from_pretrained(tmp_path)
    assert isinstance(auto_mlm, BertPkmForMaskedLM)
    assert torch.equal(auto_mlm(ids, attention_mask=mask).logits, ref.logits)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, BertPkmModel)
    torch.testing.assert_close(
        base(ids, attention_mask=mask).last_hidden_state,
        model.bert(ids, attention_mask=mask).last_hidden_state, rtol=0, atol=0,
    )
    seq = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)
    assert isinstance(seq, BertPkmForSequenceClassification)
    assert torch.equal(value_tables(seq)[0].weight, value_tables(model)[0].weight)
    assert isinstance(AutoModelForQuestionAnswering.from_pretrained(tmp_path), BertPkmForQuestionAnswering)


def test_parameter_groups_partition_dense_parameters():
    model = BertPkmForMaskedLM(tiny_config(memory_layers=[0, 1]))
    groups = parameter_groups(model, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"dense_decay", "dense_no_decay", "memory_dense"}
    assert by_name["dense_decay"]["weight_decay"] == 0.01
    assert by_name["dense_no_decay"]["weight_decay"] == 0.0
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))  # no parameter twice (tied decoder/embedding included)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    tables = {id(t.weight) for t in value_tables(model)}
    assert len(tables) == 2 and not tables & set(ids)
    mems = memory_modules(model)
    assert all(isinstance(m, ProductKeyMemory) for m in mems) and len(mems) == 2
    memory_ids = {id(p) for p in by_name["memory_dense"]["params"]}
    for m in mems:
        assert {id(m.keys), id(m.query_proj.weight), id(m.query_norm.weight)} <= memory_ids
    no_decay = {id(p) for p in by_name["dense_no_decay"]["params"]}
    assert id(model.bert.embeddings.LayerNorm.weight) in no_decay
    assert id(model.bert.encoder.layer[0].attention.self.query.bias) in no_decay
    decay = {id(p) for p in by_name["dense_decay"]["params"]}
    assert id(model.bert.embeddings.word_embeddings.weight) in decay
    assert id(model.bert.encoder.layer[0].attention.self.query.weight) in decay
    with pytest.raises(ValueError):
        parameter_groups(model, weight_decay=-1.0)


def test_model_built_for_handed_in_value_tables():
    """external_values=True: no memory allocates a table; the ones handed in are what value_tables
    reports, and they stay out of parameters(), the state_dict and the dense groups."""
    torch.manual_seed(0)
    reference = BertPkmForMaskedLM(tiny_config(memory_layers=[0, 1])).eval()
    torch.manual_seed(0)
    model = BertPkmForMaskedLM(tiny_config(memory_layers=[0, 1]), external_values=True).eval()
    assert not any(".values." in k for k in model.state_dict())
    assert not any(m.owns_values for m in memory_modules(model))
    with pytest.raises(ValueError, match="attach_values"):
        value_tables(model)
    handed = []
    for own, mem in zip(memory_modules(reference), memory_modules(model)):
        table = ValueTable(mem.size, mem.output_dim)
        table.weight.data.copy_(own.value_table.weight)
        mem.attach_values(table)
        handed.append(table)
    assert value_tables(model) == handed
    assert not {id(t.weight) for t in handed} & {id(p) for p in model.parameters()}
    grouped = {id(p) for g in parameter_groups(model, 0.01) for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    model.load_state_dict({k: v for k, v in reference.state_dict().items() if ".values." not in k})
    ids, mask, _ = batch()
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


def test_presets():
    tiny = preset_config("tiny", vocab_size=50)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.memory_layers) == (64, 2, [1])
    model = BertPkmForMaskedLM(tiny)
    assert model(torch.randint(0, 50, (2, 6))).logits.shape == (2, 6, 50)
    base = preset_config("bert-base")
    assert (base.hidden_size, base.num_hidden_layers, base.memory_layers) == (768, 12, [5])
    large = preset_config("bert-large")
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (1024, 24, 16)
    assert (large.mem_n_keys, large.mem_heads, large.mem_knn, large.mem_k_dim) == (512, 4, 32, 256)
    assert set(PRESETS) == {"tiny", "bert-base", "bert-large"}
    class FakeTokenizer:  # the two things preset_config reads from an HF tokenizer
        pad_token_id = 3

        def __len__(self):
            return 77

    from_tok = preset_config("tiny", tokenizer=FakeTokenizer())
    assert (from_tok.vocab_size, from_tok.pad_token_id) == (77, 3)
    assert preset_config("tiny", tokenizer=FakeTokenizer(), vocab_size=80).vocab_size == 80
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("bert-huge")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(memory_layers=[2]), "out of range"),
        (dict(memory_layers=[-1]), "out of range"),
        (dict(memory_layers=[1, 1]), "more than once"),
        (dict(memory_mode="parallel"), "memory mode"),
        (dict(mem_query_norm="rmsnorm"), "query_norm"),
        (dict(mem_value_init="uniform"), "value_init"),
        (dict(mem_knn=32), "knn"),
        (dict(mem_k_dim=15), "even"),
        (dict(mem_value_dropout=1.0), "value_dropout"),
    ],
)
def test_config_validation(overrides, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**overrides)


def test_config_defaults_and_roundtrip():
    cfg = BertPkmConfig()  # BERT-base sized, one memory in the middle layer
    assert cfg.model_type == "bert_pkm" and cfg.memory_layers == [5] and cfg.memory_mode == "residual"
    assert BertPkmConfig(num_hidden_layers=24).memory_layers == [11]
    cfg = tiny_config("replace", memory_layers=(1, 0))
    again = BertPkmConfig.from_dict(cfg.to_dict())
    assert again.memory_layers == [0, 1] and again.memory_mode == "replace"
    assert again.mem_n_keys == 16 and again.num_memory_slots == 256
