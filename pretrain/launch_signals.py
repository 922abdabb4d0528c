"""Pass a stop signal from the ``deepspeed`` launcher's caller to the training ranks.

    python -m pretrain.launch_signals run [--pid-file F] -- deepspeed ...   # run a launcher, supervised
    python -m pretrain.launch_signals TERM <launcher pid>                   # signal its ranks once

The single-node ``deepspeed`` command (``deepspeed.launcher.runner``) starts
``python -m deepspeed.launcher.launch``, which starts one process per rank; a ``--no_ssh`` multi-node
launch is the same on every node. SIGTERM to the ``deepspeed`` process (what ``docker stop`` and
cluster schedulers send) kills it and nothing else: the ranks would go on training as orphans. As a
container's PID 1 it is worse: a PID 1 without a handler ignores SIGTERM, so ``docker stop`` waits out
its grace period and SIGKILLs everything, with no checkpoint. And a SIGTERM to the whole process
group reaches ``launch``, which gives the ranks 30 s and then SIGKILLs them, exiting 1.

``run`` (what ``./run.sh pretrain``, the Docker entrypoint's ``deepspeed`` and
``pretrain.main.launch`` use) starts the launcher in a session of its own, so a signal to the caller's
process group reaches only the supervisor, and passes SIGTERM/SIGINT on to the rank processes
themselves (``forward_stop_signal``): each rank checkpoints at its next step boundary and exits 0,
then ``launch`` and the runner exit 0, and so does the supervisor. It returns the launcher's exit
status (128 + N for a launcher killed by signal N), and only once no process of the launcher's
session is left (``pretrain.main.launch`` too): a signal to every process (Slurm's ``scancel``) kills
DeepSpeed's runner at once while the ranks are still saving, and a container's PID 1 that exited
then would take them down mid-save. As PID 1 it also reaps the orphans a container's PID 1 inherits. The ranks' DataLoader workers are
not signalled (their death would crash the rank before it saves), and they ignore a stop signal
that reaches them anyway (``pretrain.data``).

Without ranks to find (not started yet, or a multi-node pdsh launch, whose ranks are on the other
ends of ssh and whose runner forwards signals itself through ``pkill`` on every node), the launcher
processes get the signal.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

__all__ = ["STOP_SIGNALS", "rank_processes", "forward_stop_signal", "wait_forwarding_stop_signals",
           "wait_passing_on_sigterm", "run_supervised", "main"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _is_local_launcher(proc) -> bool:
    try:
        cmd = proc.cmdline()
    except Exception:  # noqa: BLE001  (gone, or not ours to read)
        return False
    return "deepspeed.launcher.launch" in cmd


def rank_processes(launcher_pid: int) -> list:
    """psutil processes of the training ranks under a ``deepspeed`` launcher (or its ``launch``)."""
    import psutil

    try:
        root = psutil.Process(launcher_pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    ranks = []
    for proc in tree:
        if _is_local_launcher(proc):
            ranks.extend(proc.children(recursive=False))
    return ranks


def forward_stop_signal(launcher_pid: int, signum: int = signal.SIGTERM) -> int:
    """Send ``signum`` to every rank under ``launcher_pid``; returns how many processes got it."""
    import psutil

    targets = rank_processes(launcher_pid)
    if not targets:
        try:
            root = psutil.Process(launcher_pid)
            targets = [p for p in root.children(recursive=True) if _is_local_launcher(p)] + [root]
        except psutil.NoSuchProcess:
            return 0
    sent = 0
    for proc in targets:
        try:
            proc.send_signal(signum)
            sent += 1
        except psutil.NoSuchProcess:
            pass
    return sent


def _report(signum: int, sent: int) -> None:
    print(f"[pkm launcher] {signal.Signals(signum).name} passed on to {sent} training process(es); each saves "
          "a checkpoint at its next step and exits", file=sys.stderr, flush=True)


def _session_members(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``: what a launcher started in it left behind."""
    import psutil

    members = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                members.append(pid)
        except (OSError, psutil.Error):
            pass
    return members


def _reap_orphans() -> None:
    """As PID 1: collect the exit status of any child that has ended (orphans end up here)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _wait_for_session(sid: int, poll_s: float = 0.2) -> None:
    """Wait until nothing of the launcher's session runs any more. A launcher can end before its
    ranks: DeepSpeed's runner dies of a SIGTERM that reached every process (Slurm's scancel), while
    ``launch`` and the ranks are still saving; exiting then would, as a container's PID 1, kill them
    mid-save."""
    import time

    while _session_members(sid):
        if os.getpid() == 1:
            _reap_orphans()
        time.sleep(poll_s)
    if os.getpid() == 1:
        _reap_orphans()


def _wait(proc: subprocess.Popen) -> int:
    """``proc.wait()``, then wait for what is left of its session (when it was started with
    ``start_new_session=True``; otherwise no session has its pid as id). As PID 1 (a container,
    ``unshare --pid``) it also reaps every other child: orphans are re-parented to PID 1, and nothing
    else would collect them."""
    if os.getpid() != 1:
        proc.wait()
    while proc.returncode is None:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:  # proc was reaped elsewhere (cannot happen here; be safe)
            proc.wait()
            break
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
    _wait_for_session(proc.pid)
    return proc.returncode


class _Forwarding:
    """While active, SIGTERM/SIGINT to this process go on to the ranks of ``self.proc`` (a signal
    that comes before the launcher is started is passed on as soon as it is)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.received: list[int] = []
        self._previous: dict[int, object] = {}

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        self.received.append(signum)
        if self.proc is not None:
            _report(signum, forward_stop_signal(self.proc.pid, signum))

    def started(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        for signum in self.received:
            _report(signum, forward_stop_signal(proc.pid, signum))

    def __enter__(self) -> "_Forwarding":
        try:
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handler)
        except ValueError:  # not the main thread: no handler can be installed
            pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)


def wait_forwarding_stop_signals(proc: subprocess.Popen) -> tuple[int, list[int]]:
    """Wait for the launcher ``proc``, passing each SIGTERM/SIGINT that arrives meanwhile on to its
    ranks. Returns (its exit code as Popen gives it, the signals received)."""
    with _Forwarding() as fwd:
        fwd.started(proc)
        rc = _wait(proc)
    return rc, fwd.received


def wait_passing_on_sigterm(proc: subprocess.Popen) -> int:
    """``proc.wait()`` for a ``deepspeed`` launcher started by this process (in a session of its
    own: ``start_new_session=True``), passing a SIGTERM or SIGINT that arrives meanwhile on to its
    ranks; once they have saved and exited, the first such signal is delivered again to this process
    under its previous handler (so the caller still stops, only later)."""
    rc, received = wait_forwarding_stop_signals(proc)
    if received:
        os.kill(os.getpid(), received[0])
    return rc


def run_supervised(cmd: list[str], pid_file: str | None = None) -> int:
    """Run the launcher command ``cmd`` in a session of its own, passing stop signals on to its
    ranks, and return its exit status as a shell would (128 + N when killed by signal N).
    ``pid_file``: where to write this process's pid, for whoever must signal it from outside (a
    ``docker exec`` does not pass signals on: docker/launch_multinode.sh)."""
    with _Forwarding() as fwd:
        if pid_file:
            with open(pid_file, "w", encoding="utf-8") as f:
                f.write(f"{os.getpid()}\n")
        try:
            try:
                proc = subprocess.Popen(cmd, start_new_session=True)
            except OSError as e:
                print(f"[pkm launcher] cannot start {cmd[0]!r}: {e}", file=sys.stderr)
                return 127
            fwd.started(proc)
            rc = _wait(proc)
        finally:
            if pid_file:
                try:
                    os.remove(pid_file)
                except OSError:
                    pass
    return 128 - rc if rc < 0 else rc


_USAGE = ("usage: python -m pretrain.launch_signals run [--pid-file FILE] -- <launcher command ...>\n"
          "       python -m pretrain.launch_signals TERM|INT <launcher pid>")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["run"]:
        rest, pid_file = argv[1:], None
        if rest[:1] == ["--pid-file"] and len(rest) >= 2:
            pid_file, rest = rest[1], rest[2:]
        if rest[:1] == ["--"]:
            rest = rest[1:]
        if not rest:
            print(_USAGE, file=sys.stderr)
            return 2
        return run_supervised(rest, pid_file)
    if len(argv) != 2 or not argv[1].isdigit():
        print(_USAGE, file=sys.stderr)
        return 2
    signum = getattr(signal, "SIG" + argv[0].upper().removeprefix("SIG"))
    _report(signum, forward_stop_signal(int(argv[1]), signum))
    return 0


if __name__ == "__main__":
    sys.exit(main())
