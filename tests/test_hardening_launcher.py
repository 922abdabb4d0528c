"""run.sh: `setup --help` only prints help; SIGTERM to `./run.sh pretrain` reaches every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.test_hardening_checkpoints import shard_dir  # noqa: F401  (session fixture)
from tests.test_pretrain import (
    RANK_ENV,
    REPO,
    assert_latest_checkpoint_is_the_last_step,
    run_config,
    wait_until_training,
)

RUN_SH = os.path.join(REPO, "run.sh")
VENV = os.path.dirname(os.path.dirname(sys.executable))


def test_setup_help_prints_help_and_sets_nothing_up(tmp_path):
    venv = tmp_path / "venv"
    env = {**os.environ, "PKM_VENV": str(venv)}
    p = subprocess.run([RUN_SH, "setup", "--help"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0 and "usage: ./run.sh setup" in p.stdout
    assert not venv.exists()
    p = subprocess.run([RUN_SH, "setup", "--fast"], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 2 and "takes no arguments (got: --fast)" in p.stderr
    assert not venv.exists()


def _setup_stamp() -> str:
    """run.sh's setup_stamp: the first 16 hex digits of sha256(requirements + constraints + pyproject)."""
    import hashlib

    data = b"".join(open(os.path.join(REPO, n), "rb").read() for n in ("requirements.txt", "constraints.txt",
                                                                       "pyproject.toml"))
    return hashlib.sha256(data).hexdigest()[:16]


def _processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any(text in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_sigterm_to_run_sh_pretrain_checkpoints_and_leaves_no_process(shard_dir, tmp_path):  # noqa: F811
    if not os.path.isfile(os.path.join(VENV, f".setup-{_setup_stamp()}")):
        pytest.skip("the test venv is not what ./run.sh setup would make now (run.sh would install into it)")
    out = str(tmp_path / "run")
    cfg_path = str(tmp_path / "sigterm_cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(run_config(shard_dir, out, max_steps=100_000, ckpt_every=0), f)
    env = {**os.environ, **RANK_ENV, "PKM_VENV": VENV, "PKM_NUM_PROCS": "2"}
    log_path = tmp_path / "run.log"
    log_file = open(log_path, "w")  # a file, not a pipe: orphaned ranks would hold a pipe open
    proc = subprocess.Popen([RUN_SH, "pretrain", "--deepspeed_config", "ds_configs/tiny_zero2_fp32.json",
                             "--config", cfg_path], cwd=REPO, env=env, stdout=log_file,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_training(proc, out)
        proc.send_signal(signal.SIGTERM)  # to run.sh alone, as `docker stop` or a scheduler would
        proc.wait(timeout=180)
        log = log_path.read_text()
        assert proc.returncode == 0, log[-3000:]
        assert "passed on to 2 training process(es)" in log
        assert not _processes_mentioning(cfg_path), "ranks left running after the launcher exited"
        assert_latest_checkpoint_is_the_last_step(out)
    finally:
        for leftover in _processes_mentioning(cfg_path):  # only what this test started
            leftover.kill()
        if proc.poll() is None:
            proc.kill()
        log_file.close()


def test_sigterm_to_the_python_launch_api_reaches_the_ranks(shard_dir, tmp_path):  # noqa: F811
    """pretrain.main.launch (what the demo uses): the ranks save, then the caller gets its SIGTERM."""
    out = str(tmp_path / "run")
    cfg_path = str(tmp_path / "api_sigterm_cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(run_config(shard_dir, out, max_steps=100_000, ckpt_every=0), f)
    script = ("import sys; from pretrain.main import launch; "
              f"launch({cfg_path!r}, 'ds_configs/tiny_zero2_fp32.json', num_procs=2, "
              f"log_file={str(tmp_path / 'ranks.log')!r}, env={RANK_ENV!r})")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, start_new_session=True)
    try:
        wait_until_training(proc, out)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == -signal.SIGTERM  # the caller still ends on its signal ...
        assert not _processes_mentioning(cfg_path)  # ... after every rank has exited
        assert_latest_checkpoint_is_the_last_step(out)
    finally:
        for leftover in _processes_mentioning(cfg_path):
            leftover.kill()
        if proc.poll() is None:
            proc.kill()


# --------------------------------------------------------------------------------------------------
# Issue 20: the launcher as a container's PID 1, and stop signals that reach every process
# --------------------------------------------------------------------------------------------------

ENTRYPOINT = os.path.join(REPO, "docker", "entrypoint.sh")
DEEPSPEED = os.path.join(os.path.dirname(sys.executable), "deepspeed")


def _unshare_pid_namespace_works() -> bool:
    """`unshare --pid --fork --mount-proc` needs root (or user namespaces): a container's PID 1 here."""
    try:
        return subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True,
                              timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _worker_run_config(shard_dir: str, out: str) -> dict:
    cfg = run_config(shard_dir, out, max_steps=100_000, ckpt_every=0)
    cfg["data"]["num_workers"] = 2  # as configs/bert-large-8gpu.json: the workers must survive the signal
    return cfg


def _launch_command(cfg_path: str) -> list[str]:
    from tests.test_pretrain import _free_port

    return ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "pretrain.main",
            "--deepspeed_config", "ds_configs/tiny_zero2_fp32.json", "--config", cfg_path]


def _ranks_and_workers(cfg_path: str) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The rank processes (children of deepspeed.launcher.launch) and their DataLoader workers."""
    launchers = [p for p in _processes_mentioning(cfg_path) if "deepspeed.launcher.launch" in p.cmdline()]
    ranks = [r for p in launchers for r in p.children()]
    return ranks, [w for r in ranks for w in r.children()]


def _wait_for_workers(cfg_path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ranks, workers = _ranks_and_workers(cfg_path)
        if len(ranks) == 2 and len(workers) == 4:
            return
        time.sleep(0.2)
    raise AssertionError(f"expected 2 ranks with 2 DataLoader workers each, found {len(ranks)} and {len(workers)}")


def _assert_clean_stop(log: str) -> None:
    assert "is killed by signal" not in log, log[-3000:]  # a DataLoader worker died of the stop signal
    assert "Traceback" not in log, log[-3000:]
    assert "stopping at step" in log, log[-3000:]


def _assert_supervised_stop(proc, log_path, cfg_path, out) -> None:
    """A supervised launch stopped by a signal: exit 0, the signal reached both ranks, they stopped
    cleanly (no crashed worker), nothing of the run is left, and the last step is checkpointed."""
    assert proc.wait(timeout=180) == 0, log_path.read_text()[-3000:]
    log = log_path.read_text()
    assert "passed on to 2 training process(es)" in log
    _assert_clean_stop(log)
    assert not _processes_mentioning(cfg_path)
    assert_latest_checkpoint_is_the_last_step(out)


@pytest.mark.skipif(not _unshare_pid_namespace_works(), reason="cannot create a PID namespace (needs root)")
def test_sigterm_to_the_containers_pid1_checkpoints_and_exits_0(shard_dir, tmp_path):  # noqa: F811
    """`docker run IMAGE deepspeed ...` (docker/launch_multinode.sh per-node): the entrypoint is the
    container's PID 1. `docker stop` sends SIGTERM to PID 1 alone; with DataLoader workers."""
    out = str(tmp_path / "run")
    cfg_path = str(tmp_path / "pid1_cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(_worker_run_config(shard_dir, out), f)
    # python3 and deepspeed of the test's environment, as the image's are on its PATH
    env = {**os.environ, **RANK_ENV, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    log_path = tmp_path / "pid1.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(["unshare", "--pid", "--fork", "--mount-proc", "bash", ENTRYPOINT,
                                 *_launch_command(cfg_path)], cwd=REPO, env=env, stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until_training(proc, out)
        _wait_for_workers(cfg_path)
        (pid1,) = psutil.Process(proc.pid).children()  # the namespace's PID 1, seen from outside
        assert "pretrain.launch_signals" in pid1.cmdline(), pid1.cmdline()  # the entrypoint exec'd into it
        pid1.send_signal(signal.SIGTERM)
        _assert_supervised_stop(proc, log_path, cfg_path, out)
    finally:
        for leftover in _processes_mentioning(cfg_path):
            leftover.kill()
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_every_process_with_dataloader_workers_checkpoints(shard_dir, tmp_path):  # noqa: F811
    """A SIGTERM to every process of the launch (Slurm's scancel, a node's preemption, DeepSpeed's own
    tree kill) reaches the DataLoader workers too: they must not die of it before their rank has
    saved. DeepSpeed's runner dies of it at once; the supervisor must still wait for the ranks."""
    out = str(tmp_path / "run")
    cfg_path = str(tmp_path / "every_process_cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(_worker_run_config(shard_dir, out), f)
    log_path = tmp_path / "every_process.log"
    cmd = _launch_command(cfg_path)
    cmd[0] = DEEPSPEED
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.launch_signals", "run", "--", *cmd], cwd=REPO,
                                env={**os.environ, **RANK_ENV}, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_training(proc, out)
        _wait_for_workers(cfg_path)
        (runner,) = psutil.Process(proc.pid).children()  # the head of the launcher's own session
        os.killpg(runner.pid, signal.SIGTERM)  # runner, launch, ranks, workers
        os.killpg(proc.pid, signal.SIGTERM)  # the supervisor
        proc.wait(timeout=180)
        assert not _processes_mentioning(cfg_path), "the supervisor exited before the ranks"
        _assert_clean_stop(log_path.read_text())
        assert_latest_checkpoint_is_the_last_step(out)
    finally:
        for leftover in _processes_mentioning(cfg_path):
            leftover.kill()
        if proc.poll() is None:
            proc.kill()


def test_sigterm_to_the_supervised_launchers_process_group_exits_0(shard_dir, tmp_path):  # noqa: F811
    """`python -m pretrain.launch_signals run -- deepspeed ...` (run.sh, the image's entrypoint): a
    signal to the caller's whole process group reaches the ranks through the forwarding only, so
    DeepSpeed's launcher does not cut their save short, and everything exits 0."""
    out = str(tmp_path / "run")
    cfg_path = str(tmp_path / "supervised_cfg.json")
    with open(cfg_path, "w") as f:
        json.dump(_worker_run_config(shard_dir, out), f)
    cmd = _launch_command(cfg_path)
    cmd[0] = DEEPSPEED
    log_path = tmp_path / "supervised.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "pretrain.launch_signals", "run", "--", *cmd], cwd=REPO,
                                env={**os.environ, **RANK_ENV}, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_until_training(proc, out)
        os.killpg(proc.pid, signal.SIGTERM)
        _assert_supervised_stop(proc, log_path, cfg_path, out)
    finally:
        for leftover in _processes_mentioning(cfg_path):
            leftover.kill()
        if proc.poll() is None:
            proc.kill()
