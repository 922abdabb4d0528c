"""Atomic file writes: readers (and a resumed run) never see half a file. The bottom of the
project's packages: data_prep, pkm and everything above write their JSON and text through it."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

__all__ = ["write_text_atomic", "write_json_atomic", "current_umask", "honour_umask"]


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``os.umask`` can only be
    read by setting it, which races with other threads creating files)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(fd: int) -> None:
    """Give a ``tempfile.mkstemp`` file (always 0600) the mode ``open()`` would have given it
    (0666 minus the umask), so the renamed result is readable like the files beside it, e.g. by the
    other users of a shared cluster file system."""
    os.fchmod(fd, 0o666 & ~current_umask())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temp file in the same folder, fsync, then rename over ``path``.

    The rename is atomic on POSIX file systems, so ``path`` holds either the old or the new content;
    a crash leaves at most a ``.tmp-*`` file, which is removed when the write itself fails.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix="-" + os.path.basename(path))
    try:
        honour_umask(fd)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """``obj`` as JSON (one trailing newline), written with ``write_text_atomic``."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")
