"""Latency measurement of a TFLite classifier: invoke only, median and p90 over repeated runs."""

from __future__ import annotations

import time

import numpy as np


def invoke_latency(model, tensor: np.ndarray, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Time ``model.invoke(tensor)``; return milliseconds (median, p90, min) and the run count."""
    for _ in range(warmup):
        model.invoke(tensor)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        model.invoke(tensor)
        samples.append((time.perf_counter() - start) * 1000.0)
    values = np.asarray(samples)
    return {
        "median_ms": float(np.median(values)),
        "p90_ms": float(np.percentile(values, 90)),
        "min_ms": float(values.min()),
        "runs": runs,
    }
