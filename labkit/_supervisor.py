"""Keeps a managed server from outliving the Python process that started it.

``labkit.serve`` does not start an engine directly: it starts this small supervisor as the
leader of a new process group, and the supervisor starts the engine inside that group.
The supervisor stops the *whole group* (engine plus any workers it spawned, e.g. vLLM's) when

* it receives SIGTERM/SIGINT/SIGHUP (a normal ``Server.stop()``), or
* its parent dies — a kernel restart, a ``kill -9`` of the notebook kernel, a crashed test —
  which it notices because ``os.getppid()`` changes.

If ``LABKIT_SERVER_TMPDIR`` is set, the engine was given that folder as its ``TMPDIR``; the
supervisor deletes it at the end, so engines' scratch files (e.g. vLLM's ``vllm_dist_*``
rendezvous files) never pile up in /tmp.

Usage: ``python -m labkit._supervisor PARENT_PID GRACE_SECONDS -- COMMAND...``
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

POLL_SECONDS = 0.2


def _group_members(pgid: int) -> list[int]:
    """PIDs in our process group other than ourselves (Linux /proc; empty elsewhere)."""
    me, pids = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return pids
    for entry in entries:
        if entry.isdigit() and int(entry) != me:
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def _stop_group(child: subprocess.Popen, grace: float) -> None:
    pgid = os.getpgrp()
    for pid in _group_members(pgid) or [child.pid]:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if child.poll() is not None and not _group_members(pgid):
            return
        time.sleep(0.05)
    for pid in _group_members(pgid) or [child.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    try:
        child.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    parent, grace, command = int(argv[0]), float(argv[1]), argv[3:]
    stop_requested = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: stop_requested.append(signum))
    child = subprocess.Popen(command)  # same process group as us; inherits our log file
    try:
        return _supervise(child, parent, grace, stop_requested)
    finally:
        scratch = os.environ.get("LABKIT_SERVER_TMPDIR")
        if scratch and os.path.basename(scratch).startswith("labkit-"):
            shutil.rmtree(scratch, ignore_errors=True)


def _supervise(child: subprocess.Popen, parent: int, grace: float, stop_requested: list) -> int:
    while True:
        code = child.poll()
        if code is not None:
            # The engine exited by itself (crash or bad arguments); clean up stragglers.
            _stop_group(child, grace=1.0)
            return code
        if stop_requested or os.getppid() != parent:
            _stop_group(child, grace)
            return 0
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
