"""Product-key memory library: the layer, value tables with row-sparse grads, sparse Adam."""

from pkm.memory import MemoryOutput, ProductKeyMemory, product_key_topk
from pkm.memory_config import MemoryConfig
from pkm.sparse_adam import SparseAdam
from pkm.values import SparseGrad, ValueTable

__all__ = [
    "MemoryConfig",
    "MemoryOutput",
    "ProductKeyMemory",
    "product_key_topk",
    "SparseAdam",
    "SparseGrad",
    "ValueTable",
]

# --- Model side (pkm/modeling.py, pkm/presets.py), loaded on first use: importing transformers'
# model code takes seconds, which the memory/value code and its spawned worker processes should not pay.
# `import pkm` registers the "bert_pkm" config with AutoConfig at once (transformers' config side:
# about 1 s of CPU, BENCHMARKS.md) and the model classes with their Auto classes when the first
# BertPkmConfig is built (pkm.hf_auto), so `import pkm` is enough for AutoModel*.from_pretrained(folder),
# in any import order.
_LAZY_EXPORTS = {
    **dict.fromkeys(
        (
            "BertPkmConfig", "BertPkmModel", "BertPkmForMaskedLM", "BertPkmForSequenceClassification",
            "BertPkmForQuestionAnswering", "BertPkmForTokenClassification", "BertPkmForMultipleChoice",
            "BertPkmForNextSentencePrediction", "BertPkmForPreTraining", "BertPkmPreTrainedModel",
            "memory_modules", "value_tables", "last_memory_outputs", "parameter_groups",
        ),
        "pkm.modeling",
    ),
    **dict.fromkeys(("init_from_pretrained_bert", "InitReport"), "pkm.init_from_bert"),
    **dict.fromkeys(("preset_config", "PRESETS"), "pkm.presets"),
    "ValueTableCallback": "pkm.hf_trainer",
}
__all__ += list(_LAZY_EXPORTS)

from pkm import hf_auto as _hf_auto  # noqa: E402

_hf_auto.install()


def __getattr__(name: str):
    if name in _LAZY_EXPORTS:
        import importlib

        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f"module 'pkm' has no attribute {name!r}")
