"""Two "nodes" on one machine: two torchrun launches (--nnodes 2, --node_rank 0 / 1, one gloo rank
each, --master_addr 127.0.0.1), as a scheduler starts one launcher per node.

- With one shared train.out_dir they train, checkpoint, are SIGKILLed (both nodes, launchers and
  ranks) after a checkpoint, and resume exactly: the resumed run's losses equal the uninterrupted
  run's, bit for bit (fp32, same data, masks and dropout).
- With an out_dir per node (node-local storage) both fail before step 1, within seconds, with an
  error that names the folder and the problem (pretrain.shared_storage).
- A preparation error on one node (its shard folder missing) ends both nodes, with that error,
  instead of leaving the other one in the rendezvous.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pretrain.checkpoint import checkpoint_root, step_dir_name
from pretrain.logging_utils import read_jsonl
from tests.test_pretrain import REPO, RANK_ENV, _free_port, run_config, shards, train_losses  # noqa: F401

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
DS_CONFIG = os.path.join(REPO, "ds_configs", "tiny_zero2_fp32.json")
# a missing file is reported after this wait (the default allows for network file systems' caches)
ENV = {**RANK_ENV, "PKM_SHARED_FS_WAIT_S": "2", "PYTHONUNBUFFERED": "1"}  # torchrun does not pass -u


def _write_config(tmp_path, cfg: dict, name: str) -> str:
    path = str(tmp_path / f"{name}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def start_nodes(config_path: str, port: int, logs: str, per_node: list[list[str]] | None = None,
                extra: list[str] | None = None) -> list[subprocess.Popen]:
    """Both nodes' launchers (torchrun, one rank each)."""
    procs = []
    for node in (0, 1):
        cmd = [TORCHRUN, "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(port),
               "-m", "pretrain.main", "--deepspeed_config", DS_CONFIG, "--config", config_path,
               *(extra or []), *((per_node or [[], []])[node])]
        log = open(f"{logs}_node{node}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                      env={**os.environ, **ENV}))
        log.close()
    return procs


def _process_tree(pid: int) -> list[int]:
    """pid and all its descendants (from /proc: torchrun starts each rank in a session of its own,
    so killing the launcher's process group would leave the ranks running)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


def kill_nodes(procs: list[subprocess.Popen]) -> None:
    """SIGKILL both nodes' launchers and ranks at once, like lost machines: no handler runs."""
    victims = [pid for p in procs for pid in _process_tree(p.pid)]
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in procs:
        p.wait()


def wait_nodes(procs: list[subprocess.Popen], logs: str, timeout: float = 240) -> tuple[list[int], str]:
    deadline = time.monotonic() + timeout
    try:
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        if any(p.poll() is None for p in procs):
            kill_nodes(procs)
    text = ""
    for node in (0, 1):
        with open(f"{logs}_node{node}.log") as f:
            text += f"--- node {node}\n" + f.read()
    return codes, text


def run_nodes(config_path: str, logs: str, **kw) -> tuple[list[int], str]:
    return wait_nodes(start_nodes(config_path, _free_port(), logs, **kw), logs)


def test_shared_out_dir_trains_is_killed_and_resumes_exactly(shards, tmp_path):
    steps = 8
    full_out, killed_out = str(tmp_path / "full"), str(tmp_path / "killed")
    full_cfg = _write_config(tmp_path, run_config(shards, full_out, max_steps=steps, ckpt_every=4), "full")
    codes, log = run_nodes(full_cfg, str(tmp_path / "full"))
    assert codes == [0, 0], log[-4000:]

    killed_cfg = _write_config(tmp_path, run_config(shards, killed_out, max_steps=steps, ckpt_every=4), "killed")
    procs = start_nodes(killed_cfg, _free_port(), str(tmp_path / "kill"))
    target = os.path.join(checkpoint_root(killed_out), step_dir_name(4))
    deadline = time.monotonic() + 240
    try:
        while not os.path.isdir(target):  # the folder appears complete (renamed by rank 0)
            assert all(p.poll() is None for p in procs), "a node ended before the step-4 checkpoint"
            assert time.monotonic() < deadline, "no step-4 checkpoint in time"
            time.sleep(0.02)
    finally:
        kill_nodes(procs)  # both nodes lost at once
    time.sleep(1.0)  # nothing may still be writing: the ranks are gone
    at_kill = train_losses(killed_out)
    assert max(at_kill) < steps and not os.path.isdir(os.path.join(checkpoint_root(killed_out), step_dir_name(8)))

    codes, log = run_nodes(killed_cfg, str(tmp_path / "resumed"), extra=["--resume"])
    assert codes == [0, 0], log[-4000:]
    assert "resumed from" in log and "at step 4" in log
    recorded = [r["step"] for r in read_jsonl(os.path.join(killed_out, "metrics.jsonl"), "train")]
    assert recorded == list(range(1, steps + 1))
    a, b = train_losses(full_out), train_losses(killed_out)
    for step in range(1, steps + 1):
        assert a[step] == b[step], (step, a[step], b[step])


def test_out_dir_per_node_fails_before_step_one(shards, tmp_path):
    outs = [str(tmp_path / "node0_local"), str(tmp_path / "node1_local")]
    cfg = _write_config(tmp_path, run_config(shards, outs[0], max_steps=4), "local")
    t0 = time.monotonic()
    codes, log = run_nodes(cfg, str(tmp_path / "local"), per_node=[[f"--train.out_dir={o}"] for o in outs])
    elapsed = time.monotonic() - t0
    assert codes[0] != 0 and codes[1] != 0, log[-4000:]
    assert f"train.out_dir '{outs[0]}' is not one folder shared by every rank" in log, log[-4000:]
    assert "rank 1 (host" in log and "does not see the file rank 0" in log
    assert log.count("is not one folder shared by every rank") >= 2  # both nodes say it
    for o in outs:  # nothing trained, no checkpoint, and the probe files are gone
        assert not os.path.exists(os.path.join(o, "metrics.jsonl"))
        assert not os.path.exists(os.path.join(o, "checkpoints"))
        assert not [n for n in os.listdir(o) if n.startswith(".tmp-shared-check-")] if os.path.isdir(o) else True
    assert elapsed < 180, elapsed  # the start (interpreters, imports) and seconds more: no 30-minute timeout


def test_preparation_error_on_one_node_ends_both(shards, tmp_path):
    out = str(tmp_path / "run")
    cfg = _write_config(tmp_path, run_config(shards, out, max_steps=4), "prep")
    missing = str(tmp_path / "not_copied_here")
    codes, log = run_nodes(cfg, str(tmp_path / "prep"), per_node=[[], [f"--data.shard_dir={missing}"]])
    assert codes[0] != 0 and codes[1] != 0, log[-4000:]
    # node 0 prepared fine and still reports node 1's problem, naming that rank
    node0 = log[: log.index("--- node 1")]
    assert f"rank 1 (host" in node0 and f"data.shard_dir '{missing}' does not exist" in node0, log[-4000:]
    assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
