"""Stop the local Ray a build started when the build is killed, not a minute later.

Why: a build that starts its own Ray (no ``--address``) owns its GCS, raylet and their agents. Killed with SIGKILL, the
GCS and raylet die with it, but the raylet's agents (``ray::DashboardAgent``, ``ray::RuntimeEnvAgent``) live on: they
notice the raylet is gone, then spend 60 s trying to report it to the dead GCS. So right after starting Ray the build
starts this module as a watcher holding the read end of a pipe; however the build ends, the kernel closes the write
end, and the watcher stops whatever of the Ray processes that build started is still alive. Only those processes:
their PIDs and start times are recorded at start, so another Ray on the machine (or a reused PID) is never touched.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

_watchers: list = []  # the watchers' Popen objects, kept for this process's lifetime: their stdin is the pipe


def watch_local_ray() -> None:
    """Start a watcher over every process this process has started so far (call it right after ``ray.init``: then
    those are the local Ray's GCS, raylet and their children). Nothing to watch when Ray joined a cluster."""
    import psutil

    watchers = {watcher.pid for watcher in _watchers}
    recorded = []
    for process in psutil.Process().children(recursive=True):
        if process.pid in watchers:
            continue
        try:
            recorded.append([process.pid, process.create_time()])
        except psutil.NoSuchProcess:
            pass
    if recorded:
        _watchers.append(subprocess.Popen([sys.executable, "-m", __name__, json.dumps(recorded)], stdin=subprocess.PIPE))


def stop_leftovers(recorded: list[list]) -> list[int]:
    """Stop the recorded processes still alive (SIGTERM, then SIGKILL after 3 s); returns their PIDs."""
    import psutil

    alive = []
    for pid, created in recorded:
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    for process in alive:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, still = psutil.wait_procs(alive, timeout=3)
    for process in still:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    return [process.pid for process in alive]


def main() -> None:
    for ignored in (signal.SIGINT, signal.SIGHUP):  # the terminal's Ctrl-C and hang-up end the build, not its watcher
        signal.signal(ignored, signal.SIG_IGN)
    sys.stdin.buffer.read()  # returns when the build's process has ended, however it ended
    stop_leftovers(json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
