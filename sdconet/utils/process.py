"""This process and its children: the SIGTERM forwarding of the CLIs that run others, and the peak-RSS counter that
benchmarks and the scene CLI report."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any, Sequence


def run_forwarding_sigterm(command: Sequence[str], **popen_kwargs: Any) -> int:
    """Run ``command`` to completion and return its exit code; a SIGTERM to this process is passed on to the child.

    Left to Python's default handler, a SIGTERM sent to the parent alone (a supervisor, a CI timeout, ``kill PID``)
    ends the parent and orphans the child, which keeps running. Ctrl-C already reaches the whole process group, so a
    KeyboardInterrupt waits for the child to stop instead of killing it mid-write. Outside the main thread (where
    signal handlers cannot be installed) this is a plain run."""
    process = subprocess.Popen(list(command), **popen_kwargs)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: process.send_signal(signum)) if in_main else None
    try:
        return process.wait()
    except KeyboardInterrupt:
        return process.wait()
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0), so each configuration reports its own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident set size since the last reset (VmHWM), in MiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without delivering anything; another user's live process
    answers EPERM and counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
