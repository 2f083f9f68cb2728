"""The demo's stage runner: a failing stage stops the run naming itself and its log, keeps earlier outputs, and a
rerun skips the stages already done."""
import sys

import pytest

from sdconet.pipeline.stages import Stage, StageFailed, StageRunner


def _write(path, text):
    return [sys.executable, "-c", f"import pathlib; pathlib.Path({str(path)!r}).write_text({text!r})"]


def test_failure_keeps_earlier_outputs_and_rerun_resumes(tmp_path):
    first_out = tmp_path / "first.txt"
    second_out = tmp_path / "second.txt"
    flag = tmp_path / "fixed"
    # the second stage fails until the "fixed" flag exists
    failing = [sys.executable, "-c",
               f"import pathlib, sys; f = pathlib.Path({str(flag)!r});"
               f"print('boom: not fixed') if not f.exists() else None;"
               f"sys.exit(0 if f.exists() else 3)"]
    stages = [Stage("first", _write(first_out, "one"), outputs=[first_out]),
              Stage("second", failing),
              Stage("third", _write(second_out, "three"), outputs=[second_out])]
    runner = StageRunner(tmp_path / "work", echo=False)
    with pytest.raises(StageFailed) as info:
        runner.run_all(stages)
    assert info.value.stage == "second" and info.value.returncode == 3
    assert "second.log" in str(info.value) and "boom: not fixed" in info.value.log_file.read_text()
    assert first_out.read_text() == "one" and not second_out.exists()

    first_out.write_text("kept")  # a rerun must not redo (overwrite) the finished stage
    flag.write_text("")
    rerun = StageRunner(tmp_path / "work", echo=False)
    ran = [rerun.run(s) for s in stages]
    assert ran == [False, True, True]
    assert first_out.read_text() == "kept" and second_out.read_text() == "three"


def test_missing_declared_output_fails_the_stage(tmp_path):
    runner = StageRunner(tmp_path / "work", echo=False)
    stage = Stage("claims", [sys.executable, "-c", "pass"], outputs=[tmp_path / "never.txt"])
    with pytest.raises(StageFailed, match="claims"):
        runner.run(stage)
    assert "expected outputs missing" in runner.log_file(stage).read_text()
    assert not runner.is_done(stage)


def test_background_process_is_stopped_when_its_start_hook_fails(tmp_path):
    # like the demo's server hook: the process is up, then the readiness check fails
    import subprocess

    started = []

    def start():
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        raise RuntimeError("not ready after 0 s")

    def stop():
        started[0].terminate()
        started[0].wait(timeout=10)

    runner = StageRunner(tmp_path / "work", echo=False)
    stage = Stage("serve", [sys.executable, "-c", "pass"], before=start, after=stop)
    with pytest.raises(StageFailed, match="serve"):
        runner.run(stage)
    assert started[0].poll() is not None, "the background process outlived the failed stage"
    assert "not ready after 0 s" in runner.log_file(stage).read_text()
    assert not runner.is_done(stage)


def test_sigterm_to_the_runner_stops_the_stage_it_runs(tmp_path):
    """A SIGTERM sent to the demo process alone reaches the running stage (no orphan keeps training or serving), and
    the stage counts as failed: no done-marker, so a rerun starts it again."""
    import os
    import signal
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    script = f"""
import sys
from pathlib import Path
from sdconet.pipeline.stages import Stage, StageFailed, StageRunner
child = [sys.executable, "-c", "import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
try:
    StageRunner(Path({str(tmp_path / 'work')!r})).run(Stage("long", child))
except StageFailed as err:
    print("failed:", err)
"""
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline and runner.poll() is None, "the stage never started"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    runner.send_signal(signal.SIGTERM)
    out, _ = runner.communicate(timeout=30)
    assert "failed: stage 'long' failed" in out
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the stage's process outlived a SIGTERM to the runner")
    assert not (tmp_path / "work" / ".done" / "long").exists()
