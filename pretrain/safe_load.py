"""Loading checkpoint files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary Python objects, so a crafted ``.pt`` file runs
code when it is opened. This project's own files (train state, value shards, value scheduler) hold
only tensors, containers and numbers and load with ``weights_only=True``. DeepSpeed's own loaders
(``engine.load_checkpoint``, ``zero_to_fp32``) pass ``weights_only=False`` themselves; around them,
``deepspeed_files_loaded_safely`` forces torch's restricted unpickler for every load
(``TORCH_FORCE_WEIGHTS_ONLY_LOAD``) and allows, besides tensors and plain data, only the few
DeepSpeed classes its checkpoints contain (``DEEPSPEED_SAFE_GLOBALS``: plain records whose
construction runs no user code). A file holding anything else is refused with ``UnsafeCheckpointError``.
"""

from __future__ import annotations

import os
import pickle
from contextlib import contextmanager
from typing import Any, Iterator

import torch

__all__ = ["UnsafeCheckpointError", "deepspeed_safe_globals", "deepspeed_files_loaded_safely", "load_weights_only",
           "numpy_rng_globals"]

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds Python objects the restricted unpickler refuses to build."""


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed 0.19 pickles into its optimizer states (ZeRO 1-3, fp32/bf16/fp16):
    the static and dynamic loss scalers (numbers only), the ZeRO stage enum and a fragment-address
    record (two ints). Found with ``torch.serialization.get_unsafe_globals_in_checkpoint``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def numpy_rng_globals() -> list[Any]:
    """What a numpy RNG state pickled as an ndarray needs (train states written before the RNG
    states became tensors): array reconstruction of a uint32 array, no object arrays."""
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 moved it (np.core warns there)
    reconstruct = core.multiarray._reconstruct
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def _refusal(path: str, err: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"checkpoint file '{path}' holds Python objects that are not plain tensors or data ({err.__class__.__name__}: "
        f"{str(err).splitlines()[0]}); it is refused because unpickling it could run code. Only load "
        "checkpoints written by this project's pretraining (see README, 'What a checkpoint must be trusted with')."
    )


def load_weights_only(path: str, extra_globals: list[Any] | None = None, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)``, with a clear error instead of torch's long one."""
    try:
        with torch.serialization.safe_globals(list(extra_globals or [])):
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


@contextmanager
def deepspeed_files_loaded_safely(what: str) -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed's included) uses the restricted unpickler and may
    build only ``deepspeed_safe_globals()``. ``what`` names the folder for the error message.

    The switch is an environment variable torch reads on every load, so it is process-wide while
    the block runs: load checkpoints from one thread."""
    saved = {k: os.environ.get(k) for k in (_FORCE, _FORCE_NO)}
    os.environ[_FORCE] = "1"
    os.environ.pop(_FORCE_NO, None)
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    except pickle.UnpicklingError as e:
        raise _refusal(what, e) from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
