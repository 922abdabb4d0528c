"""Make ``import pkm`` enough for transformers' Auto classes to load ``bert_pkm`` folders, cheaply.

Importing transformers' model code takes seconds, which ``import pkm`` (and every spawned worker of
the value-table code) should not pay. So the registration is done in two lazy steps:

1. the config: right after transformers loads its ``configuration_auto`` module (which any Auto class
   loads first), ``AutoConfig.register("bert_pkm", BertPkmConfig)``. A one-shot import hook does it;
   if that module is loaded already, it is done at once. Only the light config module is imported
   there: the model code cannot be, because transformers may load ``configuration_auto`` halfway
   through importing modules the model code needs.
2. the model classes: when a ``BertPkmConfig`` is created while the Auto machinery is loaded (as
   ``AutoModel*.from_pretrained(folder)`` does before it looks the model class up), ``pkm.modeling``
   is imported, and it registers every BertPkm model class with its Auto class.

``import pkm.modeling`` registers everything at once, as before. When ``configuration_auto`` loads
while ``pkm.configuration`` itself is being imported (it imports transformers), the config module
registers itself at its end instead (``register_config_if_auto_loaded``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

__all__ = ["install", "register_config", "register_config_if_auto_loaded", "ensure_model_classes_registered"]

_CONFIG_AUTO = "transformers.models.auto.configuration_auto"


def register_config() -> None:
    """``AutoConfig`` learns ``model_type = "bert_pkm"``."""
    from transformers.models.auto.configuration_auto import AutoConfig

    from pkm.configuration import BertPkmConfig

    AutoConfig.register("bert_pkm", BertPkmConfig, exist_ok=True)


def register_config_if_auto_loaded() -> None:
    """Called at the end of ``pkm.configuration``'s import."""
    if _CONFIG_AUTO in sys.modules:
        register_config()


def ensure_model_classes_registered() -> None:
    """Import ``pkm.modeling`` (its import registers the model classes) once the Auto machinery is
    in use; a no-op otherwise, so building a config stays cheap."""
    if _CONFIG_AUTO in sys.modules and "pkm.modeling" not in sys.modules:
        importlib.import_module("pkm.modeling")


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for ``configuration_auto`` it takes the regular spec and runs
    ``register_config`` right after the module has executed."""

    def find_spec(self, fullname, path, target=None):  # noqa: ARG002
        if fullname != _CONFIG_AUTO:
            return None
        sys.meta_path.remove(self)  # one shot; and the lookup below must not come back here
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_then_register(module):
            run_module(module)
            _on_config_auto_loaded()

        spec.loader.exec_module = exec_then_register  # this module's loader instance only
        return spec


def _on_config_auto_loaded() -> None:
    config_module = sys.modules.get("pkm.configuration")
    if config_module is not None and not hasattr(config_module, "BertPkmConfig"):
        return  # pkm.configuration is mid-import (it loaded transformers): it registers at its end
    _register_config_safely()


def _register_config_safely() -> None:
    try:
        register_config()
    except Exception as e:  # never break transformers' own import over our registration
        warnings.warn(f"pkm could not register 'bert_pkm' with transformers' AutoConfig: {e}", stacklevel=2)


def install() -> None:
    """Called by ``import pkm``: register now if transformers' Auto configs are loaded, else on
    their first load."""
    if _CONFIG_AUTO in sys.modules:
        _register_config_safely()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
