"""Files written atomically get the mode the umask gives ordinary files, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat

import pytest
import torch


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_json_honours_the_umask(tmp_path, umask):
    from atomic_files import current_umask, write_json_atomic

    assert current_umask() == umask
    path = tmp_path / "a.json"
    write_json_atomic(path, {"x": 1})
    assert _mode(path) == 0o666 & ~umask
    with open(tmp_path / "plain.json", "w") as f:  # what an ordinary file beside it gets
        f.write("{}")
    assert _mode(path) == _mode(tmp_path / "plain.json")


def test_value_shards_honour_the_umask(tmp_path, umask):
    from pkm.checkpoint_values import META_FILE, save_value_shards, shard_file_name
    from pkm.values import ValueTable

    save_value_shards(tmp_path, {"mem": ValueTable(8, 4)}, None)
    for name in (shard_file_name(0, 1), META_FILE):
        assert _mode(tmp_path / name) == 0o666 & ~umask, name
    assert torch.load(tmp_path / shard_file_name(0, 1), weights_only=True)["tables"]["mem"]["weight"].shape == (8, 4)
