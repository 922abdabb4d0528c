"""Configuration of BERT with product-key memory layers (``model_type = "bert_pkm"``).

A plain ``BertConfig`` plus the memory: a ``pkm.memory_config.MemoryConfig`` stored flat under
Hugging Face names (``memory_layers``, ``memory_mode``, ``mem_*``), so config.json files stay plain
JSON and older ones keep loading; ``config.memory`` gives the typed view, and
``BertPkmConfig.with_memory(memory, **bert_fields)`` builds one from it. Every BERT field keeps its
meaning, so a BERT checkpoint's config.json can be extended field by field.
"""

from __future__ import annotations

from collections.abc import Callable

from huggingface_hub.dataclasses import strict
from transformers import BertConfig

from pkm.memory_config import MEMORY_MODES, QUERY_NORMS, VALUE_INITS, MemoryConfig

__all__ = ["BertPkmConfig", "CONFIG_CREATED_HOOKS", "MemoryConfig", "MEMORY_MODES", "QUERY_NORMS", "VALUE_INITS"]

_DEFAULT = MemoryConfig  # its class attributes are the field defaults: one home for them

# Called with every new BertPkmConfig. pkm.hf_auto adds one that registers the model classes with
# transformers' Auto classes on first use, so that this module never imports the model code.
CONFIG_CREATED_HOOKS: list[Callable[["BertPkmConfig"], None]] = []


@strict
class BertPkmConfig(BertConfig):
    r"""BERT config with product-key memory.

    The memory fields are ``MemoryConfig``'s (see it for their meaning), named ``memory_layers``,
    ``memory_mode`` and ``mem_<field>`` (``mem_n_keys`` = n sub-keys per half: N = n^2 slots).
    ``memory_layers=None`` resolves to the middle layer, index ``(num_hidden_layers - 1) // 2``
    (layer 6 of 12 counted from 1, Lample's placement); ``[]`` means no memory.
    """

    model_type = "bert_pkm"

    memory_layers: list[int] | None = None
    memory_mode: str = _DEFAULT.mode
    mem_n_keys: int = _DEFAULT.n_keys
    mem_heads: int = _DEFAULT.heads
    mem_knn: int = _DEFAULT.knn
    mem_k_dim: int = _DEFAULT.k_dim
    mem_query_norm: str = _DEFAULT.query_norm
    mem_value_init: str = _DEFAULT.value_init
    mem_input_dropout: float | int = _DEFAULT.input_dropout
    mem_query_dropout: float | int = _DEFAULT.query_dropout
    mem_value_dropout: float | int = _DEFAULT.value_dropout

    @classmethod
    def with_memory(cls, memory: MemoryConfig, **bert_fields) -> "BertPkmConfig":
        """A config from BERT fields (hidden_size, ...) and a MemoryConfig."""
        clash = sorted(set(bert_fields) & set(memory.to_bert_pkm_fields()))
        if clash:
            raise ValueError(f"{clash} are memory settings: set them in the MemoryConfig, not beside it.")
        return cls(**bert_fields, **memory.to_bert_pkm_fields())

    @property
    def memory(self) -> MemoryConfig:
        """The memory settings as a (validated) MemoryConfig."""
        return MemoryConfig.from_bert_pkm_fields(self)

    def __post_init__(self, **kwargs):
        if self.memory_layers is None:
            self.memory_layers = [(self.num_hidden_layers - 1) // 2]
        else:
            # JSON round trips give lists already; tuples from Python callers are normalised.
            self.memory_layers = sorted(int(i) for i in self.memory_layers)
        super().__post_init__(**kwargs)
        # Validated here (not only in validate_architecture) so bad values raise a plain ValueError
        # at construction: `@strict` wraps validator errors in its own non-ValueError exception.
        self.validate_memory()
        for hook in tuple(CONFIG_CREATED_HOOKS):  # a hook may remove itself
            hook(self)

    def validate_architecture(self):
        """Part of `@strict` validation (``config.validate()``)."""
        super().validate_architecture()
        self.validate_memory()

    def validate_memory(self) -> None:
        """Raise ValueError for memory settings the model cannot be built with."""
        if self.is_decoder or self.add_cross_attention:
            raise ValueError("BertPkm is an encoder: is_decoder and add_cross_attention must be False.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        # MemoryConfig holds the rules for the memory fields; only the layer range needs the model
        self.memory.layer_indices(self.num_hidden_layers)

    @property
    def num_memory_slots(self) -> int:
        """N = n_keys^2 slots per memory."""
        return self.memory.num_slots
