"""One rank fails: every rank ends, non-zero, within train.collective_timeout_s (issue 20, defect 11).

Two "nodes" on one machine (two `deepspeed --no_ssh --node_rank 0/1` launchers, one gloo rank each),
as on a cluster: the failing rank's own launcher can end only its own node, so the other node's rank
must end through the failure of its next collective. The failure is injected with the test-only
PKM_FAULT_INJECT=<rank>:<step> (pretrain/trainer.py).

Over gloo the survivor's collective fails as soon as the failed rank's connection closes. NCCL does
not notice a dead peer: there the survivors end when the collective timeout runs out, which
``test_the_collective_timeout_reaches_the_process_groups`` checks with a peer that stays alive and
never joins.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from pretrain.config import config_from_dict
from tests.test_hardening_checkpoints import shard_dir  # noqa: F401  (session fixture)
from tests.test_hardening_launcher import _processes_mentioning
from tests.test_pretrain import RANK_ENV, REPO, _free_port, run_config

DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")
TIMEOUT_S = 20


def _start_node(node_rank: int, hostfile: str, port: int, cfg_path: str, log_path: str,
                env: dict[str, str]) -> subprocess.Popen:
    cmd = [DEEPSPEED, "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank), "--master_addr", "127.0.0.1",
           "--master_port", str(port), "--module", "pretrain.main",
           "--deepspeed_config", "ds_configs/tiny_zero2_fp32.json", "--config", cfg_path]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def test_a_raise_on_one_rank_ends_every_rank_nonzero_within_the_timeout(shard_dir, tmp_path):  # noqa: F811
    cfg = run_config(shard_dir, str(tmp_path / "run"), max_steps=1000, ckpt_every=0)
    cfg["train"]["collective_timeout_s"] = TIMEOUT_S
    cfg["data"]["num_workers"] = 2  # the workers end with their ranks too
    cfg_path = str(tmp_path / "cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=1\nnode-1 slots=1\n")
    env = {**os.environ, **RANK_ENV, "PKM_FAULT_INJECT": "1:4"}  # global rank 1 = node 1's rank, at step 4
    port = _free_port()
    logs = [str(tmp_path / f"node{i}.log") for i in range(2)]
    nodes = [_start_node(i, str(hostfile), port, cfg_path, logs[i], env) for i in range(2)]
    try:
        deadline = time.monotonic() + 240  # start-up on a loaded machine, then 3 steps
        while nodes[1].poll() is None:
            assert time.monotonic() < deadline, "the failing rank did not exit"
            time.sleep(0.1)
        failed_at = time.monotonic()
        node1_log = open(logs[1]).read()
        assert nodes[1].returncode != 0, node1_log[-3000:]
        assert "error: rank 1 failed" in node1_log and "PKM_FAULT_INJECT: rank 1 fails at step 4" in node1_log
        try:
            nodes[0].wait(timeout=TIMEOUT_S + 15)  # the timeout, plus the launcher's 1 s poll and exit
        except subprocess.TimeoutExpired:
            pytest.fail(f"node 0's rank still running {TIMEOUT_S + 15} s after rank 1 failed:\n"
                        + open(logs[0]).read()[-3000:])
        node0_log = open(logs[0]).read()
        assert nodes[0].returncode != 0, node0_log[-3000:]
        assert time.monotonic() - failed_at < TIMEOUT_S + 15
        assert "error: rank 0 failed" in node0_log, node0_log[-3000:]  # it failed; it did not hang or stop
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()


_STALLED_PEER = textwrap.dedent("""
    import os, sys, time
    import torch, torch.distributed as dist
    from pretrain.distributed import init_distributed
    init_distributed("gloo", timeout_s=float(sys.argv[1]))
    # a group made later without a timeout, as DeepSpeed makes its data-parallel group (ZeRO's
    # reductions), and the value tables theirs
    group = dist.new_group(list(range(dist.get_world_size()))) if sys.argv[2] == "new_group" else None
    if dist.get_rank() == 1:
        time.sleep(120)  # alive, never joins: a stuck rank (or a NCCL peer whose death nobody reports)
    t0 = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError:
        print(f"collective failed after {time.monotonic() - t0:.1f} s", flush=True)
        os._exit(1)
    os._exit(0)
""")


@pytest.mark.parametrize("group", ["world", "new_group"])
def test_the_collective_timeout_reaches_the_process_groups(tmp_path, group):
    """pretrain.distributed.init_distributed(timeout_s=...): a rank whose peer never joins a
    collective fails after that long, in the world group and in groups made later without a
    timeout of their own (DeepSpeed's default would wait 10 minutes, torch's for those 30 on gloo)."""
    script = tmp_path / "stall.py"
    script.write_text(_STALLED_PEER)
    port = str(_free_port())
    timeout_s = 5
    procs = []
    for rank in range(2):
        env = {**os.environ, **RANK_ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        procs.append(subprocess.Popen([sys.executable, str(script), str(timeout_s), group], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        out, _ = procs[0].communicate(timeout=120)
        assert procs[0].returncode == 1, out[-3000:]
        waited = float(out.split("collective failed after ")[1].split(" s")[0])
        assert timeout_s - 0.5 <= waited < timeout_s + 10, out[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("bad", [0, -1, 1.0, float("nan"), "600"])
def test_collective_timeout_is_validated(bad):
    with pytest.raises(ValueError, match="train.collective_timeout_s"):
        config_from_dict({"train": {"collective_timeout_s": bad}})


def test_fault_injection_is_parsed_and_names_its_format(monkeypatch):
    from pretrain.trainer import FAULT_INJECT_ENV, injected_fault_step

    monkeypatch.delenv(FAULT_INJECT_ENV, raising=False)
    assert injected_fault_step(0) is None
    monkeypatch.setenv(FAULT_INJECT_ENV, "1:4")
    assert injected_fault_step(1) == 4 and injected_fault_step(0) is None
    monkeypatch.setenv(FAULT_INJECT_ENV, "step4")
    with pytest.raises(ValueError, match="expected <rank>:<step>"):
        injected_fault_step(0)
