"""A model's latency where the target runs it: measured on this host, measured on the board over ssh,
or estimated from this host's measurement with the target's documented factor (``[latency]`` in the
target file), with the factor's uncertainty stated.

This host's figure is always one LiteRT thread, the lowest of three medians of 40 single-image invokes:
the most stable figure a busy workstation gives, and the one the targets' factors are defined against.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgetl.errors import ConfigError
from edgetl.targets import Target

RUNS = 40  # timed invokes per round (after 5 untimed)
ROUNDS = 3


@dataclass(frozen=True)
class LatencyOn:
    """Where a trial's latency comes from."""

    kind: str  # "host": this machine; "target": this machine x the target's factor; "ssh": the board
    host: str = ""  # the ssh host
    factor: float = 1.0
    uncertainty: float = 1.0  # x/÷ this
    source: str = ""  # where the factor comes from
    threads: int = 1  # threads on the board (ssh)

    def describe(self) -> str:
        if self.kind == "host":
            return "measured on this host (1 LiteRT thread)"
        if self.kind == "ssh":
            return f"measured on {self.host} over ssh ({self.threads} thread(s)); before training: estimated"
        return (f"estimated: this host's latency (1 thread) x {self.factor:g}, within x/÷{self.uncertainty:g} "
                f"({self.source or 'no source given'})")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "how": self.describe()}


def is_this_machine(target: Target) -> bool:
    """A CPU target whose architecture is this machine's: its latency is measured here."""
    return target.kind == "cpu" and target.device.arch == platform.machine()


def latency_on(value: str | None, target: Target) -> LatencyOn:
    """Parse ``--latency-on`` (None: the target's own board, estimated or, for this machine, measured).

    Raises:
        ConfigError: an unknown value, or an estimate the target file gives no factor for.
    """
    spec = target.latency
    if value is not None and value.startswith("ssh:"):
        host = value[4:].strip()
        if not host:
            raise ConfigError("--latency-on ssh:HOST needs a host, e.g. ssh:pi@raspberrypi.local")
        return LatencyOn("ssh", host, spec.host_factor or 1.0, spec.uncertainty if spec.host_factor else 1.0,
                         spec.reference, target.threads)  # fmt: skip
    if value == "host" or (value in (None, "target") and is_this_machine(target)):
        return LatencyOn("host")
    if value not in (None, "target"):
        raise ConfigError(f"--latency-on {value!r}: expected host, target or ssh:HOST")
    if spec.host_factor is None:
        raise ConfigError(f"{target.name} gives no factor to estimate its latency from this host's "
                          "(no [latency] host_factor in its target file)",
                          hint="measure on the board with --latency-on ssh:HOST, or use --latency-on host")  # fmt: skip
    return LatencyOn("target", factor=spec.host_factor, uncertainty=spec.uncertainty, source=spec.reference)


def host_latency(path: str | os.PathLike, runs: int = RUNS, rounds: int = ROUNDS) -> dict[str, float]:
    """This host's latency of a .tflite model in ms, one thread: the lowest median (and that round's p90) of
    ``rounds`` rounds of ``runs`` invokes (a busy host only ever slows a round down)."""
    import numpy as np

    from edgetl.runtime.bench import invoke_latency
    from edgetl.runtime.model import open_model

    model = open_model(str(path), 1)
    height, width = model.image_size
    tensor = model.to_input(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))
    timed = min((invoke_latency(model, tensor, runs) for _ in range(rounds)), key=lambda t: t["median_ms"])
    return {"median": round(timed["median_ms"], 4), "p90": round(timed["p90_ms"], 4)}


def on_target(host: dict[str, float], how: LatencyOn) -> dict[str, Any]:
    """The latency a budget is judged on (``ms``), and its range, from this host's figure."""
    ms = host["median"] * how.factor
    return {"ms": round(ms, 4), "low": round(ms / how.uncertainty, 4), "high": round(ms * how.uncertainty, 4),
            "host_ms": host["median"], "host_p90_ms": host["p90"],
            "how": "host" if how.kind == "host" else "estimated"}  # fmt: skip


def on_board(bundle: Path, how: LatencyOn, host: dict[str, float]) -> dict[str, Any]:
    """The latency measured on the board over ssh (the bundle's runtime, its ``bench``)."""
    from edgetl.ontarget.board import bench_on_board

    result = bench_on_board(how.host, bundle, ["--threads", str(how.threads), "--runs", "30"])
    row = result["results"][0]
    ms = float(row["invoke_ms_median"])
    return {"ms": round(ms, 4), "low": round(ms, 4), "high": round(ms, 4), "p90_ms": row.get("invoke_ms_p90"),
            "host_ms": host["median"], "host_p90_ms": host["p90"], "how": f"measured on {how.host}",
            "board": result.get("device", {})}  # fmt: skip
