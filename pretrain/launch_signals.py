"""Pass a stop signal from the ``deepspeed`` launcher's caller to the training ranks.

    python -m pretrain.launch_signals TERM <launcher pid>

The single-node ``deepspeed`` command (``deepspeed.launcher.runner``) starts
``python -m deepspeed.launcher.launch``, which starts one process per rank. SIGTERM to the
``deepspeed`` process (what ``docker stop`` and cluster schedulers send) kills it and nothing else:
the ranks would go on training as orphans. ``forward_stop_signal`` sends the signal to the rank
processes themselves instead (not to their DataLoader workers, whose death would crash the rank
before it saves): each rank checkpoints at its next step boundary and exits, then ``launch`` and the
runner exit with the ranks' status. Without ranks to find (not started yet, or a multi-node pdsh
launch, whose runner forwards signals itself), the launcher processes get the signal.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["rank_processes", "forward_stop_signal", "wait_passing_on_sigterm", "main"]


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


def wait_passing_on_sigterm(proc) -> int:
    """``proc.wait()`` for a ``deepspeed`` launcher started by this process, passing a SIGTERM that
    arrives meanwhile on to its ranks; once they have saved and exited, the SIGTERM is delivered
    again to this process under its previous handler (so the caller still stops, only later)."""
    received: list[int] = []

    def handler(signum, frame):  # noqa: ARG001
        received.append(signum)
        forward_stop_signal(proc.pid, signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: no handler can be installed
        return proc.wait()
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
    if received:
        os.kill(os.getpid(), signal.SIGTERM)
    return rc


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or not argv[1].isdigit():
        print("usage: python -m pretrain.launch_signals TERM|INT <launcher pid>", file=sys.stderr)
        return 2
    signum = getattr(signal, "SIG" + argv[0].upper().removeprefix("SIG"))
    sent = forward_stop_signal(int(argv[1]), signum)
    print(f"[run.sh] {signal.Signals(signum).name} passed on to {sent} training process(es); each saves a "
          "checkpoint at its next step and exits", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
