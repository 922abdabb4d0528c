"""Initialise a BERT+PKM model from a plain (memory-less) Hugging Face BERT checkpoint.

Kim & Jung (2020)'s first finding: start from a BERT pretrained without memory and add the memory.
Every weight of the checkpoint that has the same name and shape in the new model is copied; the
memory layers (and anything else the checkpoint lacks, e.g. a new classifier) keep their fresh
initialisation; weights the new model has no place for (e.g. the FFN of a replace-mode layer, the
pooler for an MLM model, the NSP head for any head but ``BertPkmForPreTraining`` and
``BertPkmForNextSentencePrediction``, which load it) are dropped. The report lists all three. Any
BertPkm head class can be built (``model_class``); in residual mode with zero-initialised values
(``mem_value_init="zeros"``) it computes exactly what transformers' BERT class of that head computes
from the same checkpoint (tests/test_bert_heads.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from transformers import BertConfig

from pkm.configuration import BertPkmConfig
from pkm.memory_config import MemoryConfig
from pkm.modeling import BertPkmForMaskedLM, BertPkmPreTrainedModel

__all__ = ["InitReport", "bert_pkm_config_from_bert", "init_from_pretrained_bert", "load_bert_state_dict"]

# Config entries that describe the source file, not the architecture.
_SOURCE_ONLY_CONFIG_KEYS = ("model_type", "architectures", "transformers_version", "_name_or_path")


@dataclass
class InitReport:
    """What ``init_from_pretrained_bert`` did, key by key (new model's state_dict names)."""

    source: str
    loaded: list[str] = field(default_factory=list)  # copied from the checkpoint
    added: list[str] = field(default_factory=list)  # not in the checkpoint: fresh initialisation
    tied: list[str] = field(default_factory=list)  # not in the checkpoint, shared with a loaded weight
    mismatched: list[str] = field(default_factory=list)  # same name, other shape: fresh init
    dropped: list[str] = field(default_factory=list)  # checkpoint keys with no place (checkpoint names)

    @property
    def summary(self) -> str:
        lines = [
            f"initialised from {self.source}: {len(self.loaded)} tensors loaded, "
            f"{len(self.added)} added, {len(self.tied)} tied, {len(self.mismatched)} shape-mismatched, "
            f"{len(self.dropped)} dropped."
        ]
        for label, keys in (
            ("added", self.added),
            ("tied", self.tied),
            ("mismatched", self.mismatched),
            ("dropped", self.dropped),
        ):
            if keys:
                lines.append(f"  {label}: {', '.join(_compress(keys))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary


def _compress(keys: list[str]) -> list[str]:
    """Group keys by their module (``encoder.layer.3.memory.{keys, values.weight, ...}``) so the
    summary stays readable for a 24-layer model."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        head, _, leaf = key.rpartition(".")
        groups.setdefault(head, []).append(leaf)
    return [f"{head}.{{{', '.join(leaves)}}}" if head else ", ".join(leaves) for head, leaves in groups.items()]


def _normalise_key(key: str) -> str:
    """Checkpoint key -> base-model-relative name: strip ``bert.``, old TF-era LayerNorm names."""
    if key.startswith("bert."):
        key = key[len("bert.") :]
    if key.endswith("LayerNorm.gamma"):
        key = key[: -len("gamma")] + "weight"
    elif key.endswith("LayerNorm.beta"):
        key = key[: -len("beta")] + "bias"
    return key


def load_bert_state_dict(path_or_dir: str) -> dict[str, torch.Tensor]:
    """Read a local checkpoint's tensors (safetensors, sharded safetensors, or pytorch_model.bin)
    with normalised names (see ``_normalise_key``)."""
    if os.path.isdir(path_or_dir):
        candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
        found = [c for c in candidates if os.path.isfile(os.path.join(path_or_dir, c))]
        if not found:
            raise ValueError(f"{path_or_dir} holds no model weights (looked for {', '.join(candidates)}).")
        files = [os.path.join(path_or_dir, found[0])]
    elif os.path.isfile(path_or_dir):
        files = [path_or_dir]
    else:
        raise ValueError(f"BERT checkpoint {path_or_dir!r} does not exist (a local folder or file is needed).")
    if files[0].endswith(".index.json"):
        with open(files[0]) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(os.path.dirname(files[0]), s) for s in shard_names]

    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors.torch import load_file

            part = load_file(file, device="cpu")
        else:
            part = torch.load(file, map_location="cpu", weights_only=True)
        for key, tensor in part.items():
            state[_normalise_key(key)] = tensor
    return state


def _source_config(path_or_dir: str) -> BertConfig:
    config_dir = path_or_dir if os.path.isdir(path_or_dir) else os.path.dirname(path_or_dir)
    if not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise ValueError(f"no config.json next to the BERT checkpoint {path_or_dir!r}.")
    with open(os.path.join(config_dir, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "bert":
        raise ValueError(
            f"{path_or_dir!r} is a {model_type!r} checkpoint; only plain BERT ('bert') checkpoints "
            f"can be extended with memory here."
        )
    return BertConfig.from_pretrained(config_dir)


def _architecture_fields(path_or_dir: str) -> dict:
    """The checkpoint's config.json fields that describe the architecture."""
    base = _source_config(path_or_dir).to_dict()
    for key in _SOURCE_ONLY_CONFIG_KEYS:
        base.pop(key, None)
    return base


def bert_pkm_config_from_bert(path_or_dir: str, memory: MemoryConfig | None = None, **overrides) -> BertPkmConfig:
    """The BertPkmConfig for a memory-less BERT checkpoint (reads its config.json only): its
    architecture, ``memory`` (default: ``MemoryConfig()``, one memory in the middle layer), then
    ``overrides`` (any BertPkmConfig field)."""
    memory_fields = (memory or MemoryConfig()).to_bert_pkm_fields()
    return BertPkmConfig(**{**_architecture_fields(path_or_dir), **memory_fields, **overrides})


def init_from_pretrained_bert(
    path_or_dir: str,
    config_overrides: dict | None = None,
    *,
    model_class: type[BertPkmPreTrainedModel] | None = None,
    config: BertPkmConfig | None = None,
    external_values: bool = False,
    **overrides,
) -> tuple[BertPkmPreTrainedModel, InitReport]:
    """Build ``model_class`` (default BertPkmForMaskedLM) from a local memory-less BERT checkpoint.

    ``config``: the BertPkmConfig to build (e.g. from ``bert_pkm_config_from_bert``, already
    checked). Without it, the architecture comes from the checkpoint's config.json and
    ``config_overrides`` (a dict) and/or keyword ``overrides`` set the memory fields
    (memory_layers, memory_mode, mem_*) or anything else. Returns the model in eval mode (like
    ``from_pretrained``) and an InitReport. ``external_values=True``: the memories get no value
    tables (handed in later, see ``ProductKeyMemory.attach_values``).
    """
    model_class = BertPkmForMaskedLM if model_class is None else model_class
    all_overrides = {**(config_overrides or {}), **overrides}
    if config is None:
        config = BertPkmConfig(**{**_architecture_fields(path_or_dir), **all_overrides})
    elif all_overrides:
        raise ValueError(f"pass either a config or overrides {sorted(all_overrides)}, not both.")
    model = model_class(config, external_values=external_values)

    source = load_bert_state_dict(path_or_dir)
    prefix = model.base_model_prefix + "."
    target = model.state_dict()
    tied_to = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    report = InitReport(source=str(path_or_dir))
    to_load: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key, tensor in target.items():
        src_key = key[len(prefix) :] if key.startswith(prefix) else key
        if src_key not in source:
            continue
        used.add(src_key)
        if source[src_key].shape != tensor.shape:
            report.mismatched.append(key)
        else:
            to_load[key] = source[src_key]
    for key in target:
        if key in to_load or key in report.mismatched:
            continue
        if key in tied_to:  # the same tensor as tied_to[key], which is loaded or added
            report.tied.append(key)
        else:
            report.added.append(key)
    report.loaded = sorted(to_load)

    # Checkpoint keys for buffers the new model does not persist (position_ids) are not "dropped".
    non_persistent = {
        (name[len(prefix) :] if name.startswith(prefix) else name)
        for name, _ in model.named_buffers()
        if name not in target
    }
    report.dropped = sorted(k for k in source if k not in used and k not in non_persistent)

    with torch.no_grad():
        missing, unexpected = model.load_state_dict(to_load, strict=False)
    assert not unexpected, unexpected  # only target names were selected
    model.tie_weights()
    model.eval()
    return model, report
