"""One writer per folder: a build or a training run holds an exclusive lock on its ``--out`` for its lifetime.

Why: two builds into one folder, started together, both "succeeded" and left one's manifest beside the other's
shards. The lock is an ``flock`` on ``<out>/.rot-writer.lock``: the kernel releases it when its process ends, however
it ends, so a lock left by a killed process is simply free again (the next run takes it over); the file's text names
the holder for the refusal message. A run that ends removes the file (while still holding it; a taker checks that
the file it locked is still the one at the path), so a finished folder holds only what the run wrote.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = ".rot-writer.lock"


class FolderBusy(RuntimeError):
    """Another process writes into this folder now."""


def out_folder_problem(folder: Path, flag: str = "--out") -> str | None:
    """Why ``folder`` cannot be an output folder (a file, not writable), in one line; None if it can."""
    if folder.exists() and not folder.is_dir():
        return f"{flag} {folder} is a file, not a folder; choose a folder path"
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        return f"{flag} {folder}: {existing} is not writable by this user; choose a folder you can write to"
    return None


@contextmanager
def exclusive(folder: Path, what: str, flag: str = "--out"):
    """Hold ``folder``'s writer lock while the block runs; ``FolderBusy`` (naming the holder) if another process has it."""
    problem = out_folder_problem(folder, flag)
    if problem:
        raise FolderBusy(problem)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder_text = handle.read().strip() or "another process"
            handle.close()
            raise FolderBusy(f"{flag} {folder} is in use by {holder_text}; wait for it to end or choose another {flag}") from None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break  # the file at the path is the one locked
        except FileNotFoundError:
            pass
        handle.close()  # its holder removed it as it ended: lock the new one
    handle.seek(0)
    handle.truncate()
    handle.write(f"{what} (pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%H:%M:%S')})")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # removed while held, then released
        handle.close()


def holder(folder: Path) -> str | None:
    """The text of ``folder``'s lock file, if any (for messages and tests)."""
    path = folder / LOCK_FILE
    return path.read_text().strip() if path.exists() else None
