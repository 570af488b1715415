"""Latency measurement: median and p90 over repeated calls (a classifier's invoke, or any call)."""

from __future__ import annotations

import time

import numpy as np


def invoke_latency(model, tensor: np.ndarray, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Time ``model.invoke(tensor)``; return milliseconds (median, p90, min) and the run count."""
    return call_latency(lambda: model.invoke(tensor), runs, warmup)


def call_latency(call, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Time ``call()`` after ``warmup`` untimed calls; milliseconds (median, p90, min) and the run count."""
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        samples.append((time.perf_counter() - start) * 1000.0)
    values = np.asarray(samples)
    return {
        "median_ms": float(np.median(values)),
        "p90_ms": float(np.percentile(values, 90)),
        "min_ms": float(values.min()),
        "runs": runs,
    }
