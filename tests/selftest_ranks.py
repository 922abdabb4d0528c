"""Rank functions for tests/test_selftest.py's spawned gloo ranks, in a module of their own so that a
spawned rank imports only what the self-test's checks need (not the test module's launcher helpers)."""

from __future__ import annotations

from types import SimpleNamespace

import torch


def _context(rank: int, world: int):
    import torch.distributed as dist

    from pkm.memory_config import MemoryConfig
    from pretrain.selftest import SelfTestContext

    memory = MemoryConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=16)
    # the checks read these fields of the run's BertPkmConfig only
    model_config = SimpleNamespace(hidden_size=64, memory_layers=[1], memory=memory)
    cfg = SimpleNamespace(data=SimpleNamespace(max_seq_len=64))
    ds = {"train_micro_batch_size_per_gpu": 2}
    return SelfTestContext(cfg, ds, model_config, torch.device("cpu"), rank, world,
                           dist.new_group(list(range(world))), torch.float32)


# each a wrong exchange with the right shapes: forward rows to the wrong tokens, backward output
# grads to the wrong tokens, lookup-weight partial dots counted twice
SABOTAGE = {
    "forward": ("_columns_to_owners", lambda original: lambda self, bag, counts, n: original(self, bag, counts, n).roll(1, 0)),
    "backward": ("_owners_to_columns", lambda original: lambda self, grad, counts: original(self, grad, counts).roll(1, 0)),
    "weight grads": ("_partials_to_owners", lambda original: lambda self, part, counts, n: 2 * original(self, part, counts, n)),
}


def checks_with_and_without_sabotage(rank: int, world: int):
    """The (collectives, sharded values) verdicts of correct tables, then {sabotage: sharded-values
    verdict} with each exchange of SABOTAGE broken in turn."""
    from pkm.sharded_values import ShardedValueTable
    from pretrain.selftest import check_collectives, check_sharded_values

    ctx = _context(rank, world)
    right = (check_collectives(ctx), check_sharded_values(ctx))
    wrong = {}
    for name, (method, broken) in SABOTAGE.items():
        original = getattr(ShardedValueTable, method)
        setattr(ShardedValueTable, method, broken(original))
        try:
            wrong[name] = check_sharded_values(ctx)
        finally:
            setattr(ShardedValueTable, method, original)
    return right, wrong
