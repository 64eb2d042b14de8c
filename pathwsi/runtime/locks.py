"""Exclusive locks that the kernel releases when their holder dies (POSIX record locks, which NFS
shares between hosts too), for outputs that are written in place or resumed: a feature store's
`.partial`, the fine-tuning checkpoint folder. A lock belongs to a process: one process taking it
twice (a test that reopens a writer) does not wait for itself.

A second writer (a leftover job of a killed Snakemake next to its rerun) waits for the first to
finish, saying who holds the lock, instead of writing into the same files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


def hold_exclusive(lock_file: Path, what: str) -> IO[str]:
    """Take the exclusive lock on `lock_file` (created if missing), waiting while another process holds
    it; the returned handle holds it until closed or the process ends."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = lock_file.open("a+")
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN / EACCES: held by another process
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        log.warning(
            "%s is being written by %s (lock %s); waiting until it ends. If it is a leftover of a killed run, "
            "stop it (docs/resume.md: after kill -9)",
            what,
            holder,
            lock_file,
        )
        fcntl.lockf(handle, fcntl.LOCK_EX)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    return handle
