"""Configuration of BERT with product-key memory layers (``model_type = "bert_pkm"``).

A plain ``BertConfig`` plus where the memory goes (``memory_layers``, ``memory_mode``) and the
memory's own hyper-parameters (``mem_*``, Lample et al. 2019 defaults). Every BERT field keeps its
meaning, so a BERT checkpoint's config.json can be extended field by field.
"""

from __future__ import annotations


from huggingface_hub.dataclasses import strict
from transformers import BertConfig

from pkm.hf_auto import ensure_model_classes_registered, register_config_if_auto_loaded

__all__ = ["BertPkmConfig", "MEMORY_MODES", "QUERY_NORMS", "VALUE_INITS"]

MEMORY_MODES = ("replace", "residual")
QUERY_NORMS = ("batchnorm", "layernorm")
VALUE_INITS = ("normal", "zeros")


@strict
class BertPkmConfig(BertConfig):
    r"""BERT config with product-key memory.

    memory_layers (`list[int]`): 0-based encoder layer indices that hold a memory. ``None`` (the
        default) means one memory in the middle layer, index ``(num_hidden_layers - 1) // 2``
        (layer 6 of 12 counted from 1, Lample's placement); ``[]`` means no memory.
    memory_mode (`str`): ``"replace"``: the memory takes the FFN's place, h' = LN(h + PKM(h));
        ``"residual"`` (ResM, Kim & Jung 2020): h' = LN(h + FFN(h) + PKM(h)).
    mem_n_keys, mem_heads, mem_knn, mem_k_dim: sub-keys per half (n, N = n^2 slots), memory heads
        H, selected slots per head k, key dimension.
    mem_query_norm: ``"batchnorm"`` (Lample's best) or ``"layernorm"``.
    mem_value_init: ``"normal"`` (std dim^-0.5) or ``"zeros"`` (a new memory then adds exactly 0,
        so a model initialised from plain BERT in residual mode reproduces it).
    mem_input_dropout, mem_query_dropout, mem_value_dropout: dropout probabilities.
    """

    model_type = "bert_pkm"

    memory_layers: list[int] | None = None
    memory_mode: str = "residual"
    mem_n_keys: int = 512
    mem_heads: int = 4
    mem_knn: int = 32
    mem_k_dim: int = 256
    mem_query_norm: str = "batchnorm"
    mem_value_init: str = "normal"
    mem_input_dropout: float | int = 0.0
    mem_query_dropout: float | int = 0.0
    mem_value_dropout: float | int = 0.0

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
        # An Auto class is loading a bert_pkm folder (or will build from this config): make sure it
        # finds the model classes (pkm.hf_auto; a no-op while the Auto machinery is not in use).
        ensure_model_classes_registered()

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
        layers = list(self.memory_layers or [])
        bad = [i for i in layers if not 0 <= i < self.num_hidden_layers]
        if bad:
            raise ValueError(
                f"memory_layers {bad} are out of range: the model has {self.num_hidden_layers} "
                f"layers, so indices must be in [0, {self.num_hidden_layers - 1}]."
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"memory_layers {layers} lists a layer more than once.")
        if self.memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory_mode must be one of {MEMORY_MODES}, got {self.memory_mode!r}.")
        if self.mem_query_norm not in QUERY_NORMS:
            raise ValueError(
                f"mem_query_norm must be one of {QUERY_NORMS}, got {self.mem_query_norm!r}."
            )
        if self.mem_value_init not in VALUE_INITS:
            raise ValueError(
                f"mem_value_init must be one of {VALUE_INITS}, got {self.mem_value_init!r}."
            )
        for name in ("mem_n_keys", "mem_heads", "mem_knn", "mem_k_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}.")
        if self.mem_knn > self.mem_n_keys:
            raise ValueError(
                f"mem_knn ({self.mem_knn}) cannot exceed mem_n_keys ({self.mem_n_keys}): each half "
                f"of a query picks its top-k among n sub-keys."
            )
        if self.mem_k_dim % 2 != 0:
            raise ValueError(
                f"mem_k_dim ({self.mem_k_dim}) must be even: a query is split into two halves."
            )
        for name in ("mem_input_dropout", "mem_query_dropout", "mem_value_dropout"):
            p = getattr(self, name)
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {p}.")

    @property
    def num_memory_slots(self) -> int:
        """N = n_keys^2 slots per memory."""
        return self.mem_n_keys**2


# transformers' Auto configs may have loaded while this module imported transformers (pkm.hf_auto)
register_config_if_auto_loaded()
