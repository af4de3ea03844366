"""Drop the one error-level line Ray's C++ core prints on every healthy build, keep every other byte of stderr.

Why: Ray Data hands each map actor a handle to its own location tracker, so the core warns, at error level, that the
actor "has constructor arguments in the object store and max_restarts > 0" (ray-project/ray#57733, open). It lands
inside the progress bar of a build that is fine. Ray's log level cannot silence it without silencing real errors too,
and without a log level the core prints it from this process to file descriptor 2, past Python's ``sys.stderr``.
So, while the build runs, descriptor 2 goes through a pipe that a thread copies back, minus that line.
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

NOISE = b"has constructor arguments in the object store and max_restarts > 0"


def without_noise(text: bytes) -> bytes:
    """``text`` with every Ray log line holding NOISE cut out (from its ``[date ...]`` header to its line end)."""
    while (at := text.find(NOISE)) >= 0:
        start, end = text.rfind(b"[", 0, at), text.find(b"\n", at)
        text = text[:max(start, 0)] + (text[end + 1:] if end >= 0 else b"")
    return text


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


@contextmanager
def ray_noise_filtered():
    """Filter descriptor 2 of this process for the block's lifetime. Start it after Ray: Ray's own processes keep
    the real stderr, so nothing outside this process holds the pipe once the block ends."""
    sys.stderr.flush()
    saved, (read_end, write_end) = os.dup(2), os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump():
        pending = b""
        while chunk := os.read(read_end, 65536):
            pending += chunk
            cut = max(pending.rfind(b"\n"), pending.rfind(b"\r")) + 1  # whole lines and bar redraws go out now
            head, pending = without_noise(pending[:cut]), pending[cut:]
            if not pending.lstrip().startswith(b"["):  # a partial line that cannot be a Ray log line goes out too
                head, pending = head + pending, b""
            _write_all(saved, head)
        _write_all(saved, without_noise(pending))

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump reads to its end and stops
        thread.join(timeout=5)
        os.close(read_end)
        os.close(saved)
