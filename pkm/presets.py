"""Named model sizes: ``preset_config(name, **overrides) -> BertPkmConfig``.

* ``tiny``: tests and the CPU demo (hidden 64, 2 layers, a 16^2 = 256-slot memory in layer 1).
* ``bert-base``: BERT-base (12 x 768) with one memory in layer index 5, i.e. the 6th of 12 layers:
  Lample et al. put the memory in layer 6 of their 12-layer models (middle layers worked best, the
  first and last worst) and Kim & Jung add it in a middle layer of BERT too. Memory defaults
  n = 512 (N = 262,144 slots), H = 4, k = 32, k_dim = 256.
* ``bert-large``: BERT-large (24 x 1024, 16 heads) with the memory in layer index 11 (the 12th of
  24, the same relative depth), same memory defaults (one table = 268M parameters).

All use residual memory (ResM) and normal-initialised values; override ``memory_mode="replace"``
for Lample's original placement.
"""

from __future__ import annotations

from typing import Any

from pkm.configuration import BertPkmConfig
from pkm.memory_config import MemoryConfig

__all__ = ["PRESETS", "preset_config", "preset_memory"]

_MEMORY_DEFAULTS: dict[str, Any] = dict(
    memory_mode="residual", mem_n_keys=512, mem_heads=4, mem_knn=32, mem_k_dim=256,
    mem_query_norm="batchnorm", mem_value_init="normal",
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=128,
        **{**_MEMORY_DEFAULTS, "mem_n_keys": 16, "mem_heads": 2, "mem_knn": 4, "mem_k_dim": 16},
        memory_layers=[1],
    ),
    "bert-base": dict(
        vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
        intermediate_size=3072, max_position_embeddings=512, memory_layers=[5], **_MEMORY_DEFAULTS,
    ),
    "bert-large": dict(
        vocab_size=30522, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
        intermediate_size=4096, max_position_embeddings=512, memory_layers=[11], **_MEMORY_DEFAULTS,
    ),
}


def preset_memory(name: str) -> MemoryConfig:
    """The memory the named preset comes with."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return MemoryConfig.from_bert_pkm_fields(PRESETS[name])


def preset_config(name: str, tokenizer: Any = None, memory: MemoryConfig | None = None,
                  **overrides: Any) -> BertPkmConfig:
    """The named preset with ``overrides`` applied (e.g. ``memory_layers=[3, 7]``).

    ``memory`` replaces the preset's memory as a whole (fields it leaves at their defaults take
    MemoryConfig's defaults, not the preset's). ``tokenizer`` (an HF tokenizer) sets
    ``vocab_size=len(tokenizer)`` and its ``pad_token_id``; explicit overrides win. Changing
    ``num_hidden_layers`` without ``memory_layers`` keeps the preset's layers if they still fit,
    else the config validation raises ValueError.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    from_tokenizer: dict[str, Any] = {}
    if tokenizer is not None:
        from_tokenizer["vocab_size"] = len(tokenizer)
        if getattr(tokenizer, "pad_token_id", None) is not None:
            from_tokenizer["pad_token_id"] = tokenizer.pad_token_id
    from_memory = memory.to_bert_pkm_fields() if memory is not None else {}
    return BertPkmConfig(**{**PRESETS[name], **from_tokenizer, **from_memory, **overrides})
