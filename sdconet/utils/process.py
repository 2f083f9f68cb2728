"""Child processes that stop with their parent: one place for the SIGTERM forwarding of the CLIs that run others."""
from __future__ import annotations

import signal
import subprocess
import threading
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
