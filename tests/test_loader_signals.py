"""The training loader's DataLoader workers and stop signals (issue 20, defect 2).

A SIGTERM that reaches every process (Slurm's scancel, a preemption, DeepSpeed's tree kill) used to
kill the workers, and torch's SIGCHLD handler then raised "DataLoader worker ... is killed by signal"
in the rank before it could save. The workers now ignore it, exit when the rank closes the stream,
and die with the rank when it dies first.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from tests.test_hardening_checkpoints import shard_dir  # noqa: F401  (session fixture)
from tests.test_pretrain import REPO

_RANK = textwrap.dedent("""
    import os, sys
    import psutil
    from pretrain.data import TrainStream
    stream = TrainStream(sys.argv[1], "train", 32, "full", 0.15, False, 5, 2, 0, 1, num_workers=1)
    stream.next_batch()
    (worker,) = psutil.Process().children()
    print(worker.pid, flush=True)
    for line in sys.stdin:
        if line.strip() == "next":
            stream.next_batch()
            print("batch", flush=True)
        elif line.strip() == "close":
            stream.close()
            print("closed", len(psutil.Process().children()), flush=True)
""")


def _start_rank(tmp_path, shards: str) -> tuple[subprocess.Popen, psutil.Process]:
    script = tmp_path / "rank.py"
    script.write_text(_RANK)
    proc = subprocess.Popen([sys.executable, str(script), shards], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, psutil.Process(int(proc.stdout.readline()))


def _ask(proc: subprocess.Popen, command: str) -> str:
    proc.stdin.write(command + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_a_worker_survives_sigterm_and_exits_when_the_stream_closes(shard_dir, tmp_path):  # noqa: F811
    proc, worker = _start_rank(tmp_path, shard_dir)
    try:
        worker.send_signal(signal.SIGTERM)
        worker.send_signal(signal.SIGINT)
        time.sleep(0.5)  # a dying worker would be reported by the rank's SIGCHLD handler by now
        assert worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE
        assert _ask(proc, "next") == "batch"  # the rank goes on (to its checkpoint)
        assert _ask(proc, "close") == "closed 0"
        assert not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE
    finally:
        proc.kill()
        proc.wait()


def test_a_worker_dies_with_its_rank(shard_dir, tmp_path):  # noqa: F811
    """A rank that fails exits without closing its loader (pretrain.main): the kernel kills the
    worker with it (PR_SET_PDEATHSIG), not torch's watchdog seconds later, or never for a worker
    blocked on a full queue."""
    proc, worker = _start_rank(tmp_path, shard_dir)
    try:
        proc.kill()
        proc.wait()
        worker.wait(timeout=3)  # torch's own parent check runs every 5 s
    finally:
        if worker.is_running():
            worker.kill()
