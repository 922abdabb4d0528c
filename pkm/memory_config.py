"""The product-key memory's settings, in one typed, validated place (``MemoryConfig``).

Size at a glance: a memory has ``n_keys`` sub-keys per half (n), so **N = n_keys ** 2 slots**; every
slot is one value row of width ``hidden_size``. n = 512 (the default) gives N = 262,144 slots, i.e.
201M values per memory at hidden 768. Each token's query picks ``knn`` slots per head, ``heads``
heads, so ``heads * knn`` value rows per token.

Used by the run config (``model.memory``, e.g. ``--model.memory.n_keys=256``) and by
``BertPkmConfig``, which stores the same fields flat under their Hugging Face names
(``memory_layers``, ``memory_mode``, ``mem_*``; see ``BERT_PKM_KEYS``) so saved config.json files
keep loading. The rules live in ``MemoryConfig.__post_init__`` only; the other places build a
``MemoryConfig`` to check their values. Light module: no torch, no transformers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MemoryConfig", "MEMORY_MODES", "QUERY_NORMS", "VALUE_INITS", "BERT_PKM_KEYS"]

MEMORY_MODES = ("replace", "residual")
QUERY_NORMS = ("batchnorm", "layernorm")
VALUE_INITS = ("normal", "zeros")


@dataclass
class MemoryConfig:
    """Where the memories go and their hyper-parameters (defaults: Lample et al. 2019).

    layers: 0-based encoder layers that hold a memory; ``None``: one memory in the middle layer,
        index ``(num_hidden_layers - 1) // 2`` (Lample's placement); ``[]``: no memory.
    mode: ``"residual"`` (ResM, Kim & Jung 2020): h' = LN(h + FFN(h) + PKM(h)); ``"replace"``
        (Lample): the memory takes the FFN's place, h' = LN(h + PKM(h)).
    n_keys: sub-keys per half, n. The memory has **N = n_keys ** 2 slots** (512 -> 262,144).
    heads: memory heads H, each with its own query and sub-keys, one shared value table.
    knn: slots each head selects per token, k (at most n_keys).
    k_dim: query / key dimension (even: a query is split into two halves of k_dim / 2).
    query_norm: ``"batchnorm"`` (Lample's best) or ``"layernorm"``.
    value_init: ``"normal"`` (std hidden^-0.5) or ``"zeros"`` (a new memory then adds exactly 0, so
        a model initialised from a plain BERT in residual mode reproduces it).
    input_dropout, query_dropout, value_dropout: dropout probabilities in [0, 1).
    """

    layers: list[int] | None = None
    mode: str = "residual"
    n_keys: int = 512
    heads: int = 4
    knn: int = 32
    k_dim: int = 256
    query_norm: str = "batchnorm"
    value_init: str = "normal"
    input_dropout: float = 0.0
    query_dropout: float = 0.0
    value_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.layers is not None:
            # JSON gives lists, Python callers may pass tuples: one sorted list of ints
            self.layers = sorted(int(i) for i in self.layers)
            if any(i < 0 for i in self.layers):
                raise ValueError(f"memory layers {self.layers} are out of range: indices are 0-based (>= 0).")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(f"memory layers {self.layers} lists a layer more than once.")
        if self.mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {MEMORY_MODES}, got {self.mode!r}.")
        if self.query_norm not in QUERY_NORMS:
            raise ValueError(f"memory query_norm must be one of {QUERY_NORMS}, got {self.query_norm!r}.")
        if self.value_init not in VALUE_INITS:
            raise ValueError(f"memory value_init must be one of {VALUE_INITS}, got {self.value_init!r}.")
        for name in ("n_keys", "heads", "knn", "k_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"memory {name} must be a positive integer, got {value!r}.")
        if self.knn > self.n_keys:
            raise ValueError(
                f"memory knn ({self.knn}) cannot exceed n_keys ({self.n_keys}): each half of a query "
                f"picks its top-k among n sub-keys."
            )
        if self.k_dim % 2 != 0:
            raise ValueError(f"memory k_dim ({self.k_dim}) must be even: a query is split into two halves.")
        for name in ("input_dropout", "query_dropout", "value_dropout"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
                raise ValueError(f"memory {name} must be in [0, 1), got {p!r}.")
            setattr(self, name, float(p))

    @property
    def num_slots(self) -> int:
        """N = n_keys ** 2 slots (value rows) per memory."""
        return self.n_keys**2

    def layer_indices(self, num_hidden_layers: int) -> list[int]:
        """The memory layers of a model with ``num_hidden_layers`` layers (``None`` resolved to the
        middle one); raises ValueError for a layer the model does not have."""
        layers = [(num_hidden_layers - 1) // 2] if self.layers is None else list(self.layers)
        bad = [i for i in layers if i >= num_hidden_layers]
        if bad:
            raise ValueError(
                f"memory layers {bad} are out of range: the model has {num_hidden_layers} layers, so "
                f"indices must be in [0, {num_hidden_layers - 1}]."
            )
        return layers

    def replace(self, **changes: Any) -> MemoryConfig:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # -- the flat Hugging Face names (BertPkmConfig, saved config.json files) ----------------------

    def to_bert_pkm_fields(self) -> dict[str, Any]:
        """{"memory_layers": ..., "memory_mode": ..., "mem_n_keys": ..., ...} for BertPkmConfig."""
        return {BERT_PKM_KEYS[f.name]: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_bert_pkm_fields(cls, fields: Mapping[str, Any] | Any) -> MemoryConfig:
        """From a BertPkmConfig (or a mapping of its field names); absent fields take the defaults."""
        get = fields.get if isinstance(fields, Mapping) else lambda k, d: getattr(fields, k, d)
        missing = object()
        values = {name: get(key, missing) for name, key in BERT_PKM_KEYS.items()}
        return cls(**{name: v for name, v in values.items() if v is not missing})


# MemoryConfig field -> BertPkmConfig field
BERT_PKM_KEYS: dict[str, str] = {
    f.name: ("memory_" if f.name in ("layers", "mode") else "mem_") + f.name for f in dataclasses.fields(MemoryConfig)
}
