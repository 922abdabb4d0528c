"""MemoryConfig: the one typed, validated memory section shared by the run config and BertPkmConfig."""

from __future__ import annotations

import json

import pytest

from pkm.configuration import BertPkmConfig
from pkm.memory import ProductKeyMemory
from pkm.memory_config import BERT_PKM_KEYS, MemoryConfig
from pkm.presets import preset_config, preset_memory


def test_slots_are_n_keys_squared():
    assert MemoryConfig().num_slots == 512**2
    assert MemoryConfig(n_keys=16, knn=4).num_slots == 256
    mem = ProductKeyMemory.from_config(8, 6, MemoryConfig(n_keys=16, heads=2, knn=4, k_dim=8))
    assert mem.size == 256 and mem.value_table.weight.shape == (256, 6)
    assert (mem.n_keys, mem.heads, mem.knn, mem.k_dim) == (16, 2, 4, 8)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(layers=[1, 1]), "more than once"),
        (dict(layers=[-1]), "out of range"),
        (dict(mode="parallel"), "memory mode must be one of"),
        (dict(query_norm="rmsnorm"), "memory query_norm"),
        (dict(value_init="uniform"), "memory value_init"),
        (dict(n_keys=0), "memory n_keys must be a positive integer"),
        (dict(heads=2.5), "memory heads must be a positive integer"),
        (dict(n_keys=16, knn=32), r"memory knn \(32\) cannot exceed n_keys \(16\)"),
        (dict(k_dim=15), "must be even"),
        (dict(value_dropout=1.0), r"memory value_dropout must be in \[0, 1\)"),
    ],
)
def test_bad_settings_are_refused_by_name(fields, match):
    with pytest.raises(ValueError, match=match):
        MemoryConfig(**fields)


def test_every_other_home_uses_the_same_rules():
    with pytest.raises(ValueError, match=r"memory knn \(32\) cannot exceed n_keys \(16\)"):
        BertPkmConfig(mem_n_keys=16)
    with pytest.raises(ValueError, match=r"memory knn \(32\) cannot exceed n_keys \(16\)"):
        ProductKeyMemory(8, 8, n_keys=16)
    with pytest.raises(ValueError, match="out of range: the model has 2 layers"):
        MemoryConfig(layers=[2]).layer_indices(2)
    assert MemoryConfig().layer_indices(12) == [5]  # None: the middle layer


def test_bert_pkm_config_stores_the_same_fields():
    memory = MemoryConfig(layers=[0], mode="replace", n_keys=16, heads=2, knn=4, k_dim=8, query_norm="layernorm",
                          value_init="zeros", input_dropout=0.1, query_dropout=0.2, value_dropout=0.3)
    config = BertPkmConfig.with_memory(memory, num_hidden_layers=2, hidden_size=32, num_attention_heads=2)
    assert config.memory == memory and config.num_memory_slots == 256
    assert config.mem_n_keys == 16 and config.memory_mode == "replace" and config.memory_layers == [0]
    assert set(memory.to_bert_pkm_fields()) == set(BERT_PKM_KEYS.values())
    with pytest.raises(ValueError, match="are memory settings"):
        BertPkmConfig.with_memory(memory, mem_n_keys=32)


def test_old_saved_config_json_still_loads(tmp_path):
    """A config.json as converted checkpoints have written it (flat mem_* keys)."""
    saved = {"model_type": "bert_pkm", "architectures": ["BertPkmForMaskedLM"], "hidden_size": 64,
             "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128, "vocab_size": 50,
             "memory_layers": [1], "memory_mode": "residual", "mem_n_keys": 16, "mem_heads": 2, "mem_knn": 4,
             "mem_k_dim": 16, "mem_query_norm": "batchnorm", "mem_value_init": "normal", "mem_input_dropout": 0.0,
             "mem_query_dropout": 0.0, "mem_value_dropout": 0.0}
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = BertPkmConfig.from_pretrained(tmp_path)
    assert config.memory == MemoryConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=16)
    config.save_pretrained(tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())
    assert {k: written[k] for k in BERT_PKM_KEYS.values()} == {k: saved[k] for k in BERT_PKM_KEYS.values()}


def test_presets_take_a_memory_as_a_whole():
    assert preset_memory("tiny") == MemoryConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=16)
    assert preset_config("tiny").memory == preset_memory("tiny")
    replaced = preset_config("tiny", memory=MemoryConfig(n_keys=32, knn=8))
    assert replaced.memory == MemoryConfig(layers=[0], n_keys=32, knn=8)  # layers None: middle of 2
