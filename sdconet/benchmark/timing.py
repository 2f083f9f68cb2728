"""Timing loops: perf_counter on CPU, CUDA events after synchronisation on GPU; peak memory per configuration."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from sdconet.utils.process import peak_rss_mb, reset_peak_rss  # noqa: F401  (re-export)


@dataclass
class LatencyStats:
    """Per-iteration latencies (ms) of the measured calls, warm-up excluded."""

    samples_ms: list[float]

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.samples_ms, q))

    def summary(self, batch: int) -> dict[str, float]:
        mean = float(np.mean(self.samples_ms))
        return {"p50_ms": self.percentile(50), "p90_ms": self.percentile(90), "p99_ms": self.percentile(99),
                "mean_ms": mean, "throughput": batch * 1000.0 / mean}


def time_calls(fn: Callable[[], object], warmup: int, iters: int, cuda: bool = False) -> LatencyStats:
    """Run ``fn`` ``warmup`` times unmeasured, then ``iters`` measured times.

    On CUDA each call is bracketed by events and the device is synchronised before reading them, so the figure is
    device time of the whole call, not launch time.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    if cuda:
        import torch

        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1000.0)
    return LatencyStats(samples)
