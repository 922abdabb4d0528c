"""``import pkm`` is enough for transformers' Auto classes to load ``bert_pkm`` folders, in any
import order.

Two steps, neither of them inside an import of transformers (a hook that fired while transformers
was half-imported failed: ``import pkm`` then ``from transformers import AutoModel`` loads
``configuration_auto`` in the middle of ``modeling_auto``, where ``BertConfig`` cannot be imported):

1. the config, eagerly: ``install`` (run by ``import pkm``) imports transformers' ``AutoConfig`` and
   ``pkm.configuration`` and calls ``AutoConfig.register("bert_pkm", BertPkmConfig)``. This costs
   ``import pkm`` about a second (BENCHMARKS.md, "import pkm").
2. the model classes, on first use: importing the model code (``transformers.modeling_utils``, BERT's
   modules) costs seconds more, so it waits until a ``BertPkmConfig`` is created, which is what every
   ``AutoModel*.from_pretrained(folder)`` / ``from_config(config)`` does before it looks the model
   class up, and which happens at call time, after every import is done. The hook sits in
   ``pkm.configuration.CONFIG_CREATED_HOOKS`` (this module adds it; the config module knows nothing of
   the model code, so there is no import circle).

``pkm.auto_classes.AUTO_CLASSES`` is the one list of Auto class -> model class; the remote code
written into saved folders (``pkm.remote_code``) takes its ``auto_map`` from it too.
"""

from __future__ import annotations

from pkm.auto_classes import AUTO_CLASSES

__all__ = ["AUTO_CLASSES", "install", "register_config", "register_model_classes"]


def register_config() -> None:
    """``AutoConfig`` learns ``model_type = "bert_pkm"``."""
    from transformers import AutoConfig

    from pkm.configuration import BertPkmConfig

    AutoConfig.register("bert_pkm", BertPkmConfig, exist_ok=True)


def register_model_classes() -> None:
    """Every Auto class of ``AUTO_CLASSES`` learns its BertPkm model class (imports the model code)."""
    import transformers

    from pkm import modeling

    for auto_name, class_name in AUTO_CLASSES.items():
        getattr(transformers, auto_name).register(modeling.BertPkmConfig, getattr(modeling, class_name),
                                                  exist_ok=True)


def _on_config_created(config) -> None:  # noqa: ARG001
    """A one-shot ``CONFIG_CREATED_HOOKS`` entry: the first config registers the model classes."""
    from pkm.configuration import CONFIG_CREATED_HOOKS

    if _on_config_created in CONFIG_CREATED_HOOKS:
        CONFIG_CREATED_HOOKS.remove(_on_config_created)
    register_model_classes()


def install() -> None:
    """Called by ``import pkm``: register the config now, the model classes on first use."""
    from pkm.configuration import CONFIG_CREATED_HOOKS

    register_config()
    if _on_config_created not in CONFIG_CREATED_HOOKS:
        CONFIG_CREATED_HOOKS.append(_on_config_created)
