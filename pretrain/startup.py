"""Preparing a run on every rank at once: one verdict, then the checks that need every rank.

A single process prepares as before (``prepare_run``, shard scan included). Under a launcher
(WORLD_SIZE > 1) every rank prepares its own view, the process group starts even when that failed
(it is how the other ranks learn of it), and then, in order, every rank raises the same
``StartupError`` if:

1. any rank's preparation failed (``first_failure``: the first failure's message, naming its rank
   and host), so no node exits alone while the others wait in the rendezvous;
2. ``train.out_dir`` is not one folder every rank reads and writes (``check_folder_shared``);
3. the ranks would resume from different checkpoints (``agree_on_resume``);
4. the shards are unusable, scanned once per view of the shard folder (``check_shards_once``).

All of it happens before the model, DeepSpeed or the data loaders are built, within seconds.
"""

from __future__ import annotations

import os

__all__ = ["prepare_on_every_rank"]


def _error_text(e: Exception) -> str:
    return str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"


def prepare_on_every_rank(argv: list[str]):
    """``prepare_run`` for this rank, agreed with every other rank; raises ValueError (every rank
    the same one) with what to fix. Leaves the process group initialised in a multi-rank run."""
    from pretrain.main import _check_shards, parse_cli, prepare_run

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return prepare_run(*parse_cli(argv))

    from pretrain.distributed import init_distributed
    from pretrain.shared_storage import agree_on_resume, check_folder_shared, first_failure

    prep, error = None, None
    try:
        prep = prepare_run(*parse_cli(argv), check_data=False)
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not only ValueError
        error = _error_text(e)
    # a rank whose config did not parse has no timeout of its own: DeepSpeed's default; it only has to
    # reach the verdict exchange, which the other ranks enter at once
    init_distributed(timeout_s=prep.cfg.train.collective_timeout_s if prep is not None else None)
    first_failure(error)
    check_folder_shared(prep.cfg.train.out_dir)
    agree_on_resume(prep.resume_from)
    try:
        from data_prep import load_manifest

        tokenizer_vocab = int(load_manifest(prep.cfg.data.shard_dir).get("tokenizer", {}).get("vocab_size", 0)) or None
    except Exception as e:  # noqa: BLE001
        tokenizer_vocab, error = None, _error_text(e)
    first_failure(error)
    _check_shards(prep.cfg, tokenizer_vocab, prep.model_config.vocab_size)  # collective: one scan per view
    return prep
