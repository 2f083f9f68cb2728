"""A resumable runner of command-line stages.

Each stage runs one command with its output captured in ``<work>/logs/<stage>.log``. A stage that succeeds writes
``<work>/.done/<stage>`` and is skipped on the next run as long as the files it declares still exist, so a rerun after
a failure resumes at the failed stage and never redoes (or deletes) what the earlier stages produced.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from sdconet.utils.logging import get_logger
from sdconet.utils.process import run_forwarding_sigterm

log = get_logger(__name__)


class StageFailed(RuntimeError):
    """A stage exited non-zero; the message names the stage and its log file."""

    def __init__(self, stage: str, log_file: Path, returncode: int):
        super().__init__(f"stage '{stage}' failed (exit code {returncode}); see its log: {log_file}")
        self.stage, self.log_file, self.returncode = stage, log_file, returncode


@dataclass
class Stage:
    """One step of the pipeline: ``argv`` is run with the repo root as working directory.

    ``argv`` may be a callable, evaluated just before the stage runs (for arguments that depend on what earlier
    stages wrote). ``outputs`` are the files/folders the stage must leave behind (checked after it runs and before
    skipping it); ``before``/``after`` are optional hooks for stages that manage a background process (the server).
    """

    name: str
    argv: Sequence[str] | Callable[[], Sequence[str]]
    outputs: Sequence[Path] = ()
    before: Callable[[], None] | None = None
    after: Callable[[], None] | None = None
    env: dict[str, str] = field(default_factory=dict)


class StageRunner:
    def __init__(self, work_dir: str | Path, cwd: str | Path | None = None, echo: bool = True):
        self.work_dir = Path(work_dir)
        self.cwd = Path(cwd) if cwd else Path.cwd()
        self.echo = echo
        (self.work_dir / "logs").mkdir(parents=True, exist_ok=True)
        (self.work_dir / ".done").mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}

    def log_file(self, stage: Stage) -> Path:
        return self.work_dir / "logs" / f"{stage.name}.log"

    def _marker(self, stage: Stage) -> Path:
        return self.work_dir / ".done" / stage.name

    def is_done(self, stage: Stage) -> bool:
        return self._marker(stage).exists() and all(Path(p).exists() for p in stage.outputs)

    def run(self, stage: Stage) -> bool:
        """Run ``stage`` unless already done; returns True if it ran. Raises StageFailed on a non-zero exit."""
        if self.is_done(stage):
            self._say(f"[skip] {stage.name}: done in an earlier run")
            return False
        log_file = self.log_file(stage)
        env = {**os.environ, **stage.env}
        start = time.perf_counter()
        with open(log_file, "w") as handle:
            try:
                if stage.before:
                    stage.before()
                argv = [str(a) for a in (stage.argv() if callable(stage.argv) else stage.argv)]
                self._say(f"[run ] {stage.name}: {' '.join(argv)}\n       log: {log_file}")
                # a SIGTERM to the demo stops the stage it runs too (no orphaned training or server)
                returncode = run_forwarding_sigterm(argv, cwd=self.cwd, stdout=handle, stderr=subprocess.STDOUT,
                                                    env=env)
            except Exception as err:  # a hook or the argument builder failed: reported like a failed command
                handle.write(f"[stage runner] stage '{stage.name}' could not run: {err!r}\n")
                raise StageFailed(stage.name, log_file, -1) from err
            finally:
                if stage.after:
                    try:
                        stage.after()
                    except Exception as err:  # e.g. the server would not stop: still a named, logged failure
                        handle.write(f"[stage runner] stage '{stage.name}' could not clean up: {err!r}\n")
                        raise StageFailed(stage.name, log_file, -1) from err
        self.timings[stage.name] = time.perf_counter() - start
        if returncode != 0:
            raise StageFailed(stage.name, log_file, returncode)
        missing = [str(p) for p in stage.outputs if not Path(p).exists()]
        if missing:
            with open(log_file, "a") as handle:
                handle.write(f"\n[stage runner] expected outputs missing: {', '.join(missing)}\n")
            raise StageFailed(stage.name, log_file, 0)
        self._marker(stage).write_text(json.dumps({"seconds": round(self.timings[stage.name], 1)}))
        self._say(f"[ ok ] {stage.name} ({self.timings[stage.name]:.0f} s)")
        return True

    def run_all(self, stages: Sequence[Stage]) -> None:
        for stage in stages:
            self.run(stage)

    def _say(self, text: str) -> None:
        if self.echo:
            print(text, file=sys.stderr, flush=True)
