"""pretrain/shared_storage.py and check_shards_once: the start-up agreement between ranks, on 2
spawned gloo ranks (a folder per rank stands for node-local storage, faked host names for two
nodes), and the Docker volume check."""

from __future__ import annotations

import json
import os

import pytest

from pretrain import shared_storage


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from tests.storage_ranks import all_cases
    from tests.test_sharded_values import run_on_ranks

    root = tmp_path_factory.mktemp("storage")
    ckpt = root / "ckpt" / "step_00000004"  # rank 0 resumes from it, rank 1 starts new
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(json.dumps({"format_version": 2, "step": 4}))
    os.environ["PKM_SHARED_FS_WAIT_S"] = "1"  # inherited by the spawned ranks
    try:
        return run_on_ranks(all_cases, 2, str(root))
    finally:
        del os.environ["PKM_SHARED_FS_WAIT_S"]


def test_preparation_verdict_is_every_ranks(cases):
    for rank in (0, 1):
        assert cases[rank]["verdict ok"] == "ok"
        # rank 0 prepared fine and still exits, with rank 1's message and its name
        assert cases[rank]["verdict rank 1 fails"].startswith("raised: rank 1 (host ")
        assert cases[rank]["verdict rank 1 fails"].endswith("data.shard_dir 'x' does not exist")


def test_out_dir_must_be_one_folder(cases):
    for rank in (0, 1):
        assert cases[rank]["shared folder"] == "ok"
        assert cases[rank]["shared folder probes left"] == ""
        own = cases[rank]["own folder"]  # each rank's own message names its own folder
        assert own.startswith(f"raised: train.out_dir '") and "is not one folder shared by every rank" in own
        assert "rank 1 (host" in own and "does not see the file rank 0" in own
        assert cases[rank]["data folder shared"] == "True" and cases[rank]["data folder own"] == "False"


def test_ranks_agree_on_the_step_to_resume(cases):
    for rank in (0, 1):
        assert cases[rank]["same resume"] == "ok"
        msg = cases[rank]["resume differs"]
        assert "the ranks do not agree on the checkpoint to resume" in msg
        assert "rank 0 (host" in msg and "step 4 (step_00000004)" in msg and "a new run (no checkpoint)" in msg


def test_a_save_sees_every_ranks_files(cases):
    for rank in (0, 1):
        assert cases[rank]["every rank wrote (shared)"] == "ok"
        msg = cases[rank]["every rank wrote (own)"]
        assert "is incomplete: the ranks do not share the checkpoint folder" in msg
        assert "wrote train_state/rank_00001.pt, which rank 0" in msg and "does not see" in msg


def test_docker_out_dir_outside_the_checkpoint_volume(tmp_path, monkeypatch):
    volume = tmp_path / "checkpoints"
    volume.mkdir()
    marker = tmp_path / ".dockerenv"
    monkeypatch.setattr(shared_storage, "CONTAINER_MARKER", str(marker))
    monkeypatch.setattr(shared_storage, "CHECKPOINT_VOLUME", str(volume))
    monkeypatch.setattr(shared_storage.os.path, "ismount", lambda p: os.path.realpath(p) == str(volume))
    shared_storage.check_out_dir_on_a_volume("runs/x")  # not in a container: nothing to say
    marker.write_text("")
    with pytest.raises(ValueError, match=r"train.out_dir 'runs/x' .* is not under the .*checkpoints volume"):
        shared_storage.check_out_dir_on_a_volume("runs/x")
    shared_storage.check_out_dir_on_a_volume(str(volume / "run1"))


def test_shards_are_scanned_once_per_view(cases):
    results = [c["scan"] for c in cases]
    assert results[0]["shared"] == ["shared"] and results[1]["shared"] == []  # rank 0 for everyone
    assert results[0]["copies on two hosts"] == ["copy_0"] and results[1]["copies on two hosts"] == ["copy_1"]
    assert results[0]["corrupt scanned by"] == ["corrupt"] and results[1]["corrupt scanned by"] == []
    for r in results:  # the rank that did not scan exits with the scanner's verdict
        assert r["corrupt"].startswith("raised: rank 0 (host ") and "holds token id 99999" in r["corrupt"]
        assert r["slow scan"] == "ok"  # 3 s of scanning under a 1-s collective timeout
