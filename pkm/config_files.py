"""Reading a settings file a user hands in: JSON, or YAML when the name ends in .yaml/.yml.

Both the pretraining run config and the finetuning sweep grid are such files; their errors name
the file and say what to do, before any work starts.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read_mapping_file"]


def read_mapping_file(path: str, what: str = "config file") -> dict[str, Any]:
    """The mapping held by ``path`` (JSON, or YAML by extension; YAML needs pyyaml). ``what``
    names the file in errors ("config file", "grid file")."""
    if not os.path.isfile(path):
        raise ValueError(f"{what} '{path}' does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml  # optional dependency
        except ImportError as e:
            raise ValueError(f"{what} '{path}' is YAML but pyyaml is not installed: pip install pyyaml, "
                             "or use JSON.") from e
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{what} '{path}' is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{what} '{path}' is not valid JSON: {e}.") from e
    if not isinstance(data, dict):
        raise ValueError(f"{what} '{path}' must hold a mapping at the top level, got {type(data).__name__}.")
    return data
