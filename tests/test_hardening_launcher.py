"""run.sh: `setup --help` only prints help; SIGTERM to `./run.sh pretrain` reaches every rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

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
