"""The cluster self-test (pretrain/selftest.py) on 2 gloo ranks, as CI can run it.

- under the deepspeed launcher with the job's configs: every check passes, the verdict table is
  printed once, and nothing is left in train.out_dir;
- two "nodes" (torchrun) with an out_dir each: the checkpoint-folder check fails, every rank exits
  non-zero;
- in-process on spawned ranks: the sharded-values check fails when the sharded lookup is wrong
  (its columns delivered to the wrong tokens), so its pass above means something.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_pretrain import REPO, RANK_ENV, TINY_MEMORY, _free_port

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
DS_CONFIG = os.path.join(REPO, "ds_configs", "tiny_zero2_fp32.json")
ENV = {**os.environ, **RANK_ENV, "PYTHONUNBUFFERED": "1", "PKM_SHARED_FS_WAIT_S": "2", "DEEPSPEED_TIMEOUT": "2"}
CHECK_NAMES = ("collectives", "sharded values", "checkpoint folder", "all-to-all bandwidth")


VENV = os.path.dirname(os.path.dirname(sys.executable))


def _venv_is_set_up() -> bool:
    """run.sh's setup stamp for this checkout's requirements is in the venv (so it would not install)."""
    import hashlib

    text = b"".join(open(os.path.join(REPO, n), "rb").read() for n in ("requirements.txt", "constraints.txt",
                                                                       "pyproject.toml"))
    return os.path.isfile(os.path.join(VENV, ".setup-" + hashlib.sha256(text).hexdigest()[:16]))


def _config(tmp_path, out_dir: str) -> str:
    cfg = {"model": {"preset": "tiny", "memory": dict(TINY_MEMORY)},
           "data": {"shard_dir": str(tmp_path / "no_data_needed"), "max_seq_len": 64},
           "train": {"out_dir": out_dir}}
    path = str(tmp_path / "selftest_run.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def _table(output: str) -> dict[str, tuple[str, str]]:
    rows = {}
    for line in output.splitlines():
        for name in CHECK_NAMES:
            if line.startswith(name + "  "):
                status, _, detail = line[len(name):].strip().partition("  ")
                rows[name] = (status, detail.strip())
    return rows


def test_selftest_passes_on_two_gloo_ranks(tmp_path):
    out = str(tmp_path / "run")
    os.makedirs(out)
    with open(os.path.join(out, "notes.txt"), "w") as f:
        f.write("the user's file")
    args = ["--deepspeed_config", DS_CONFIG, "--config", _config(tmp_path, out), "--data.max_seq_len=32"]
    port = _free_port()
    env = {**ENV, "PKM_VENV": VENV, "PKM_LAUNCHER_ARGS": f"--num_gpus 2 --master_port {port}"}
    if _venv_is_set_up():  # ./run.sh selftest, as users start it (its setup step finds nothing to do)
        cmd = [os.path.join(REPO, "run.sh"), "selftest", *args]
    else:  # a venv run.sh did not make: its setup would install; the same launch without it
        cmd = [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), "--module", "pretrain.selftest", *args]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert log.count("pkm-bert self-test: 2 rank(s), backend gloo") == 1  # rank 0 prints the table
    assert "verdict: PASS" in log
    rows = _table(log)
    assert set(rows) == set(CHECK_NAMES), log[-3000:]
    assert [rows[n][0] for n in CHECK_NAMES] == ["ok", "ok", "ok", "info"], rows
    assert "resharded to 1, loaded back exactly" in rows["checkpoint folder"][1]
    # the bandwidth is measured at the run's size: micro-batch 8 x 32 tokens, K = 2 heads x 4, d = 64
    assert "(256 tokens, K=8, d=64, float32)" in rows["all-to-all bandwidth"][1]
    assert os.listdir(out) == ["notes.txt"]  # only what the test wrote is gone


def test_selftest_fails_with_an_out_dir_per_node(tmp_path):
    outs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    config, port = _config(tmp_path, outs[0]), _free_port()
    procs = []
    for node in (0, 1):
        cmd = [TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1", "--master_addr",
               "127.0.0.1", "--master_port", str(port), "-m", "pretrain.selftest", "--deepspeed_config", DS_CONFIG,
               "--config", config, f"--train.out_dir={outs[node]}"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=ENV))
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert procs[0].returncode != 0 and procs[1].returncode != 0, logs[0][-3000:] + logs[1][-3000:]
    rows = _table(logs[0])
    assert rows["checkpoint folder"][0] == "FAIL", logs[0][-3000:]
    assert "is not one folder every rank reads and writes" in rows["checkpoint folder"][1]
    assert rows["collectives"][0] == "ok" and rows["sharded values"][0] == "ok"
    assert "verdict: FAIL" in logs[0]
    for o in outs:  # the probe files and the subfolder are gone
        assert not os.path.isdir(o) or not os.listdir(o), os.listdir(o)


# --------------------------------------------------------------------------------------------------
# the sharded-values check can fail (in-process, 2 spawned gloo ranks)
# --------------------------------------------------------------------------------------------------


def test_sharded_values_check_tells_right_from_wrong():
    """3 ranks: uneven columns (64 = 22 + 21 + 21) and a rank with no tokens."""
    from tests.selftest_ranks import checks_with_and_without_sabotage
    from tests.test_sharded_values import run_on_ranks

    world = 3
    results = run_on_ranks(checks_with_and_without_sabotage, world, world)
    expected = {"forward": "lookup output", "backward": "value grad", "weight grads": "lookup-weight grad"}
    for rank, (((coll_status, coll_detail), (status, detail)), wrong) in enumerate(results):
        assert coll_status == "ok", coll_detail
        assert status == "ok", detail
        for sabotage, symptom in expected.items():
            wrong_status, wrong_detail = wrong[sabotage]
            if rank == world - 1 and sabotage != "backward":
                continue  # no tokens: nothing of its own to get wrong (the verdict table takes any rank's FAIL)
            assert wrong_status == "FAIL" and symptom in wrong_detail, (rank, sabotage, wrong_detail)
