"""Serving reliability on the real bundled server: a soak with malformed traffic and stub kills, and the launcher
healing a crashed stub and restarting a dead server while a client with retries loses no image.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import tritonclient.http  # noqa: E402,F401
from sdconet.serve.client import RetryPolicy, SDCoNetClient, call_with_retries, is_retryable  # noqa: E402
from sdconet.serve.server import free_ports, process_group_members, stub_pids  # noqa: E402
from sdconet.serve import soak as soak_module  # noqa: E402
from sdconet.serve.soak import (BAD_KINDS, MEMORY_KINDS, _growth, compare_detections, group_memory,  # noqa: E402
                                is_bad, memory_kinds_kb, parse_kb_fields, run_soak, status_class, write_report)
from serving_fixtures import MAX_IMAGE_PIXELS, png_bytes, require_server, scene  # noqa: E402


def test_fixed_mix_and_growth_definition():
    flags = [is_bad(i, 0.2) for i in range(1000)]
    assert sum(flags) == 200 and not any(all(flags[i:i + 2]) for i in range(999))  # spread out, never in pairs
    samples = [[0, 100.0], [5, 300.0], [10, 310.0], [20, 330.0], [29, 320.0], [30, 315.0]]
    # base = the last sample of the warm-up (t <= 5); max over the second half of [5, 30] = t >= 17.5
    assert _growth(samples, warmup_s=5, end_s=30) == 30.0
    assert _growth(samples, warmup_s=5, end_s=30, exclude=[20]) == 20.0  # a sample with an oversize array in flight


def test_memory_split_from_status_and_smaps_rollup():
    rollup = parse_kb_fields("""\
55d0c0a00000-7ffd1e5f7000 ---p 00000000 00:00 0                          [rollup]
Rss:              547840 kB
Pss:              301260 kB
Pss_Dirty:        260100 kB
Pss_Anon:          82432 kB
Pss_File:          12300 kB
Pss_Shmem:        206528 kB
Shared_Clean:      20480 kB
Shared_Dirty:     413056 kB
Private_Clean:      1024 kB
Private_Dirty:    113280 kB
Anonymous:         82432 kB
THPeligible:    0
""")
    assert rollup["Rss"] == 547840 and rollup["Pss_Shmem"] == 206528 and rollup["Anonymous"] == 82432
    assert "THPeligible" not in rollup and not any("-" in name for name in rollup)  # the header and non-kB lines
    status = parse_kb_fields("Name:\ttritonserver\nVmRSS:\t  547840 kB\nRssAnon:\t   82432 kB\n"
                             "RssFile:\t   52352 kB\nRssShmem:\t  413056 kB\nThreads:\t64\n")
    assert status == {"VmRSS": 547840, "RssAnon": 82432, "RssFile": 52352, "RssShmem": 413056}
    kinds = memory_kinds_kb(status, rollup)
    assert tuple(kinds) == MEMORY_KINDS
    assert kinds == {"anon": 82432, "shmem": 413056, "file": 52352, "pss_anon": 82432, "pss_shmem": 206528,
                     "pss_file": 12300}
    assert kinds["anon"] + kinds["shmem"] + kinds["file"] == status["VmRSS"]
    assert memory_kinds_kb({}, {})["shmem"] == 0  # an exited process (or an older kernel's missing field)
    # this very process, through the real /proc files: the three RSS kinds add up to its VmRSS
    memory = group_memory(os.getpgid(0))
    assert memory.kinds_by_process and set(memory.kinds_by_process) == set(memory.rss_by_process)
    for label, split in memory.kinds_by_process.items():
        assert split["anon"] > 0
        assert abs(split["anon"] + split["shmem"] + split["file"] - memory.rss_by_process[label]) < 0.5 + \
            0.05 * memory.rss_by_process[label]  # processes sampled a moment apart


def test_status_classes_and_answer_comparison():
    import numpy as np
    from tritonclient.utils import InferenceServerException

    from sdconet.runtime.triton_client import Detections

    assert status_class(None) == "200"
    assert status_class(InferenceServerException("preprocess: image exceeds the limit", status="400")) == "400"
    assert status_class(InferenceServerException("Stub process is not healthy", status="500")) == "5xx"
    assert status_class(InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT")) == "400"
    assert status_class(InferenceServerException("gone", status="StatusCode.UNAVAILABLE")) == "5xx"
    assert status_class(InferenceServerException("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")) == \
        "timeout"
    assert status_class(TimeoutError("timed out")) == "timeout"
    assert status_class(ConnectionRefusedError(111, "Connection refused")) == "connection"
    assert status_class(ValueError("something else")) == "other"

    def dets(rows):
        rows = np.array(rows, np.float32).reshape(-1, 6)
        return Detections(rows[:, :4], rows[:, 4], rows[:, 5].astype(np.int64), ["x"] * len(rows))

    reference = dets([[10, 10, 20, 20, 0.9, 1], [30, 30, 40, 45, 0.5, 2], [1, 1, 5, 5, 0.0204, 0]])
    same = dets([[30, 30.2, 40, 45, 0.5004, 2], [10, 10, 20, 20, 0.9, 1]])  # order, rounding, a near-threshold drop
    assert compare_detections(reference, same, score_threshold=0.02) is None
    moved = dets([[10, 10, 20, 20, 0.9, 1], [33, 30, 40, 45, 0.5, 2]])
    assert "missing" in compare_detections(reference, moved, score_threshold=0.02)
    relabelled = dets([[10, 10, 20, 20, 0.9, 3], [30, 30, 40, 45, 0.5, 2]])
    assert "unexpected" in compare_detections(reference, relabelled, score_threshold=0.02)
    assert "0 detections" in compare_detections(reference, dets([]), score_threshold=0.02)


def test_retry_policy_retries_only_what_is_safe():
    from tritonclient.utils import InferenceServerException

    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionRefusedError(111, "Connection refused")
        return "ok"

    assert call_with_retries(flaky, RetryPolicy(retries=3, backoff_s=0.05)) == "ok" and len(calls) == 3
    assert calls[2] - calls[1] >= 2 * 0.05 * 0.9  # exponential: the second wait is twice the first
    invalid = InferenceServerException("image exceeds the server limit", status="400")
    assert not is_retryable(invalid)
    assert is_retryable(InferenceServerException("connect failed", status="StatusCode.UNAVAILABLE"))
    assert not is_retryable(InferenceServerException("bad", status="StatusCode.INVALID_ARGUMENT"))
    import aiohttp

    assert is_retryable(aiohttp.ServerDisconnectedError())  # the asyncio HTTP client when a server dies mid-request
    assert not is_retryable(FileNotFoundError("scene.png")) and not is_retryable(ValueError("bad array"))
    attempts = []

    def always_invalid():
        attempts.append(1)
        raise invalid

    with pytest.raises(InferenceServerException) as error:
        call_with_retries(always_invalid, RetryPolicy(retries=5, backoff_s=0.01))
    assert len(attempts) == 1 and error.value.attempts == 1


def test_client_output_stems_never_collide():
    from sdconet.serve.client import _output_stems

    stems = _output_stems([Path("a.png"), Path("x/a.png"), Path("a_1.png"), Path("failures.png")])
    assert stems[0] == "a" and len(set(stems)) == 4 and "failures" not in stems  # failures.json is reserved


def test_soak_with_malformed_traffic_and_stub_kills(server, tmp_path):
    """30 s of mixed traffic at concurrency 8; the detector's stub is killed at 8 s and the preprocess stub at 18 s:
    no good request is lost outside the faults, no malformed request is accepted, both models serve again."""
    good = [png_bytes(scene(120, 160, seed=10)), png_bytes(scene(200, 90, seed=11))]
    report = run_soak(server.endpoints.http, soak_seconds=30, warmup_seconds=4, concurrency=8, bad_fraction=0.2,
                      good_images=good, server_pgid=server.process.pid,
                      kill_stubs=[("detector_cpu", 4.0), ("preprocess", 14.0)], heal=server.heal)
    png = write_report(report, tmp_path / "soak.json")
    assert report.requests_lost == 0, report.lost_errors
    assert report.bad_accepted == 0, report.accepted_bad_kinds
    assert report.requests_wrong == 0 and report.requests_checked > 0, report.wrong_examples
    assert len(report.reference_detections) == 2 and any(report.reference_detections)  # the check is not vacuous
    assert report.requests_ok > 0 and report.passed, report.failures
    assert set(report.bad_by_kind) == set(BAD_KINDS), report.bad_kinds_skipped  # every kind was sent
    assert all(counts["rejected"] > 0 for counts in report.bad_by_kind.values())
    good, bad = report.status_classes["good"], report.status_classes["bad"]
    assert good["200"] == report.requests_ok + report.requests_wrong
    assert sum(good.values()) == report.requests_ok + report.requests_failed_in_fault + report.requests_lost
    # malformed requests are refused as such (400); the few that met a killed stub got its 5xx instead
    assert bad["200"] == 0 and sum(bad.values()) == report.bad_rejected and bad["other"] == 0, bad
    assert bad["400"] >= 0.9 * report.bad_rejected and good["other"] == 0, (good, bad)
    assert [fault["model"] for fault in report.faults] == ["detector_cpu", "preprocess"]
    # properties that hold at any speed: each kill found a stub, a good request after it succeeded (recovery is a
    # figure, not a bound), and the model now runs on a new stub (the healer reloaded it; the killed pids are gone)
    for fault in report.faults:
        assert fault["pids"] and fault["recovery_s"] is not None and fault["recovery_s"] > 0, fault
        assert set(stub_pids(server.process.pid, fault["model"])).isdisjoint(fault["pids"]), fault
    assert not server.missing_stubs()
    assert len(report.rss_mb) >= 2 and all(mb > 0 for _, mb in report.rss_mb)
    assert report.rss_growth_mb is not None and report.p50_ms <= report.p99_ms
    saved = json.loads((tmp_path / "soak.json").read_text())
    assert saved["requests_ok"] == report.requests_ok and png.is_file() and png.stat().st_size > 10_000
    assert saved["passed"] and saved["provenance"]["commit"] and saved["provenance"]["cpu"]["isa"]


def test_soak_fails_on_wrong_answers_and_on_a_fault_past_the_recovery_target(server, monkeypatch):
    """The checks can fail: a reference that no answer matches makes every checked answer wrong; a stub killed
    with nobody healing it never recovers within the target and fails the run (the server is healed after)."""
    good = [png_bytes(scene(64, 64, seed=13))]
    real_references = soak_module._reference_answers

    def shifted(*args, **kwargs):
        references = real_references(*args, **kwargs)
        for ref in references:
            ref.boxes = ref.boxes + 5.0
        return references

    monkeypatch.setattr(soak_module, "_reference_answers", shifted)
    report = run_soak(server.endpoints.http, soak_seconds=3, warmup_seconds=0.5, concurrency=2, bad_fraction=0.0,
                      good_images=good)
    if len(report.wrong_examples) == 0:  # the reference must have detections for a shift to show
        assert report.requests_wrong == 0
        pytest.skip("the random-init model found nothing on this image above the threshold")
    assert report.requests_wrong == report.requests_checked > 0 and report.requests_ok == 0
    assert not report.passed and "differ from the reference" in report.failures[0]
    monkeypatch.undo()
    try:
        report = run_soak(server.endpoints.http, soak_seconds=5, warmup_seconds=0.5, concurrency=2,
                          bad_fraction=0.0, good_images=good, server_pgid=server.process.pid,
                          kill_stubs=[("postprocess", 0.5)], recovery_target_s=2.0)
    finally:
        server.heal()
    assert report.faults[0]["recovery_s"] is None
    assert any("never served a correct answer" in f for f in report.failures), report.failures
    # failures later than the target are no longer excused by the fault: they are lost
    assert report.requests_lost > 0 and report.status_classes["good"]["5xx"] > 0
    assert not server.missing_stubs()


def test_launcher_heals_a_stub_and_restarts_a_dead_server_while_a_client_retries(cpu_repo, tmp_path, monkeypatch):
    """`python -m sdconet.serve`: a killed detector stub is reloaded; a SIGKILLed tritonserver is restarted on the
    same ports; a 200-image client run with --retries spanning the restart loses no image."""
    require_server(cpu_repo)
    ports = free_ports(3)  # distinct; the restart must come back on these same ports
    stderr_path = tmp_path / "serve.log"
    with open(stderr_path, "w") as stderr:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "sdconet.serve", "--repo", str(cpu_repo), "--http-port", str(ports[0]),
             "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]), "--json",
             "--log-file", str(tmp_path / "triton.log")],
            stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=Path(__file__).resolve().parents[1])
    pids = []
    try:
        info = json.loads(launcher.stdout.readline() or "{}")
        assert info, stderr_path.read_text()
        pids.append(info["pid"])
        good = png_bytes(scene(48, 40, seed=12))
        with SDCoNetClient(info["http"]) as client:
            client.detect(good)
            os.kill(stub_pids(info["pid"], "detector_cpu")[0], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while "reloaded" not in stderr_path.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "model 'detector_cpu' reloaded" in stderr_path.read_text()
            client.detect(good)  # serving again

        images = []
        for i in range(200):
            images.append(tmp_path / "images" / f"img{i:03d}.png")
            images[-1].parent.mkdir(exist_ok=True)
            images[-1].write_bytes(png_bytes(scene(48, 40, seed=100 + i)))
        out = tmp_path / "out"
        from sdconet.serve import client as client_module

        # the real detect_many, its per-image callback also counted here: the server is killed once some images
        # are answered and others are not (synchronised on answers, not on a sleep)
        answered, first_answer = [], threading.Event()
        real_detect_many = client_module.detect_many

        def counting_detect_many(*args, on_done=None, **kwargs):
            def done(index, result):
                answered.append(index)
                first_answer.set()
                on_done(index, result)
            return real_detect_many(*args, on_done=done, **kwargs)

        monkeypatch.setattr(client_module, "detect_many", counting_detect_many)
        codes = []
        run = threading.Thread(target=lambda: codes.append(client_module.main(
            [str(p) for p in images] + ["--url", info["http"], "--concurrency", "8", "--retries", "8",
                                        "--retry-backoff", "0.5", "--out", str(out)])))
        run.start()
        assert first_answer.wait(timeout=120), stderr_path.read_text()[-3000:]
        prefix = re.search(rb"shm-region-prefix-name=([\w-]+)", Path(f"/proc/{info['pid']}/cmdline").read_bytes())
        assert prefix and list(Path("/dev/shm").glob(prefix.group(1).decode() + "*"))  # the server's pools
        os.kill(info["pid"], signal.SIGKILL)
        assert len(answered) < len(images), len(answered)  # the kill fell inside the run
        run.join(timeout=240)
        assert not run.is_alive() and codes == [0], stderr_path.read_text()[-3000:]
        assert sorted(p.name for p in out.glob("img*.json")) == [p.with_suffix(".json").name for p in images]
        assert json.loads((out / "failures.json").read_text()) == []
        log = stderr_path.read_text()
        assert "tritonserver exited unexpectedly" in log and "restarting the server" in log
        assert "server restarted and ready" in log
        # the killed server's python backend pools do not stay in /dev/shm for ever
        assert not list(Path("/dev/shm").glob(prefix.group(1).decode() + "*"))
        assert "MB of shared memory the stopped server left in /dev/shm" in log
        pids.append(int(re.search(r"restarted and ready in [0-9.]+ s \(pid (\d+)\)", log).group(1)))
        # the dead server's log is kept (not reopened and truncated): the restarted server writes its own
        assert "Started HTTPService" in (tmp_path / "triton.log").read_text()
        assert (tmp_path / "triton.restart1.log").is_file()
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(timeout=60) == 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
            # only if the test failed: its servers die with it (PDEATHSIG), this is the safety net
            restarted = re.findall(r"restarted and ready in [0-9.]+ s \(pid (\d+)\)", stderr_path.read_text())
            for pid in set(pids) | {int(p) for p in restarted}:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for pid in pids:  # the first server and the restarted one: nothing of either outlives the launcher
        assert not process_group_members(pid)


def test_large_oversize_arrays_are_paced_and_left_out_of_the_growth(server, monkeypatch):
    """An oversize array above PACED_OVERSIZE_BYTES (forced to 0 here: the test repository's is 0.7 MB) goes at most
    once per interval, one at a time; the other slots of its turn take the next kind, so the mix stays exact."""
    monkeypatch.setattr(soak_module, "PACED_OVERSIZE_BYTES", 0)
    report = run_soak(server.endpoints.http, soak_seconds=4, warmup_seconds=0.5, concurrency=4, bad_fraction=0.5,
                      good_images=[png_bytes(scene(48, 40, seed=14))], server_pgid=server.process.pid,
                      oversize_interval_s=1.5)
    sent = report.bad_by_kind["oversize_array"]["rejected"] + report.bad_by_kind["oversize_array"]["accepted"]
    assert 1 <= sent <= 4, report.bad_by_kind  # 4 s measured at one per 1.5 s (one may have started in the warm-up)
    others = sum(v["rejected"] for k, v in report.bad_by_kind.items() if k != "oversize_array")
    assert others > 3 * sent and report.bad_accepted == 0 and report.passed, report.failures
    assert report.oversize_bytes == soak_module._oversize_nbytes(MAX_IMAGE_PIXELS)
    assert report.rss_samples_excluded_s and report.rss_growth_all_samples_mb is not None
