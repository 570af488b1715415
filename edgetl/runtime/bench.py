"""Latency measurement: median and p90 over repeated calls, several models timed in turn, and whether the
host was busy while they were timed.

Models compared with each other are timed interleaved (:func:`interleaved_latency`): round after round,
each model runs once, so a load that comes and goes meets every model alike and their ratio holds; timed
one after another, whichever model's turn met the load looked slow (issue #30: int8 1.00x float under a
fine-tune beside it, 0.52x quiet). The ratio between two models is the median of the per-round ratios.

:class:`HostLoad` says whether anything else ran meanwhile: the CPU time the host spent outside this
process (``/proc/stat`` against ``os.times``; the load average where there is no ``/proc``), and
:func:`spread_warning` whether the timings scattered (p90 far above the median). numpy and the standard
library only: this runs on the device.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BUSY_CORES = 0.25  # other processes using more than a quarter of a core on average: the host was busy
WIDE_SPREAD = 1.5  # p90 more than 1.5x the median: the timings scattered


def invoke_latency(model, tensor: np.ndarray, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Time ``model.invoke(tensor)``; return milliseconds (median, p90, min) and the run count."""
    return call_latency(lambda: model.invoke(tensor), runs, warmup)


def call_latency(call, runs: int = 50, warmup: int = 5) -> dict[str, float]:
    """Time ``call()`` after ``warmup`` untimed calls; milliseconds (median, p90, min) and the run count."""
    stats = interleaved_latency({"call": call}, runs, warmup)["call"]
    stats.pop("samples")
    return stats


def interleaved_latency(calls: dict[str, Callable[[], object]], runs: int = 50,
                        warmup: int = 5) -> dict[str, dict[str, float]]:  # fmt: skip
    """Time every call ``runs`` times, round-robin: each round runs each call once, starting one later
    each round (no call always follows the same one). ``warmup`` untimed rounds first. Per call:
    milliseconds (median, p90, min), the run count, and ``samples`` (ms, in round order) for
    :func:`paired_ratio`."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(runs):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return {name: _stats(values) for name, values in samples.items()}


def _stats(samples: list[float]) -> dict:
    values = np.asarray(samples)
    return {"median_ms": float(np.median(values)), "p90_ms": float(np.percentile(values, 90)),
            "min_ms": float(values.min()), "runs": len(samples), "samples": samples}  # fmt: skip


def paired_ratio(base: dict, other: dict) -> float:
    """How many times faster ``other`` ran than ``base``: the median over rounds of base / other, from
    the ``samples`` of one :func:`interleaved_latency` (falls back to the medians' ratio)."""
    a, b = base.get("samples"), other.get("samples")
    if a and b and len(a) == len(b):
        return float(np.median(np.asarray(a) / np.asarray(b)))
    return base["median_ms"] / other["median_ms"]


def spread_warning(stats: dict[str, dict], limit: float = WIDE_SPREAD) -> str | None:
    """"p90 N.Nx the median (NAME)" for the call whose timings scattered most, when above ``limit``."""
    spreads = {name: s["p90_ms"] / s["median_ms"] for name, s in stats.items() if s.get("median_ms")}
    if not spreads:
        return None
    name = max(spreads, key=spreads.get)
    return f"p90 {spreads[name]:.1f}x the median ({name})" if spreads[name] > limit else None


def _busy_seconds() -> float | None:
    """CPU seconds the whole host has been busy since boot (every core), from /proc/stat; None without it."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    ticks = [int(v) for v in fields[1:]]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # user..steal; guest time is inside user


def _own_seconds() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class HostLoad:
    """How busy the host was while something was timed. Use as ``with HostLoad() as load: ...``; then
    ``load.other_cores`` is the CPU the rest of the host used meanwhile, in cores (None: unknown), and
    ``load.busy`` / ``load.reason`` the verdict."""

    other_cores: float | None = None
    load_average: float | None = None
    cores: int = os.cpu_count() or 1
    seconds: float = 0.0

    def __enter__(self) -> HostLoad:
        self._wall, self._host, self._own = time.monotonic(), _busy_seconds(), _own_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.monotonic() - self._wall
        host = _busy_seconds()
        if host is not None and self._host is not None and self.seconds > 0:
            other = (host - self._host) - (_own_seconds() - self._own)
            self.other_cores = max(0.0, other / self.seconds)
        try:
            self.load_average = os.getloadavg()[0]
        except OSError:
            self.load_average = None

    @property
    def busy(self) -> bool:
        if self.other_cores is not None:
            return self.other_cores > BUSY_CORES
        # no /proc/stat: a 1-minute load average above this process's own share
        return self.load_average is not None and self.load_average > 1 + BUSY_CORES

    @property
    def reason(self) -> str | None:
        if not self.busy:
            return None
        if self.other_cores is not None:
            return f"other processes used {self.other_cores:.1f} of {self.cores} cores while it was timed"
        return f"load average {self.load_average:.1f} on {self.cores} cores"

    def to_dict(self) -> dict:
        return {"other_cores": None if self.other_cores is None else round(self.other_cores, 3),
                "load_average": self.load_average, "cores": self.cores, "seconds": round(self.seconds, 2),
                "busy": self.busy, "reason": self.reason}  # fmt: skip


def timing_warning(load: HostLoad, stats: dict[str, dict]) -> str | None:
    """One line when the figures are not a quiet host's: busy, or scattered, or both."""
    reasons = [r for r in (load.reason, spread_warning(stats)) if r]
    if not reasons:
        return None
    return ("host busy: " + "; ".join(reasons) + ". The models were timed interleaved, so their ratios hold; "
            "the absolute latencies are inflated: measure again on a quiet host for those")
