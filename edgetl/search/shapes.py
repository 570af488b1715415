"""What a model shape costs, known before any training: an untrained MobileNetV2 of that input size,
width and class count, converted to int8 exactly as ``edgetl export`` converts a trained one. Its file
size and tensor arena are the trained model's (weights do not change them, to a few bytes of metadata),
and so is its latency (integer kernels take the same time whatever the weights).

Each shape is probed once per search and kept in ``DIR/shapes/<size>x<width>/shape.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import ConstraintViolated, RunLocked
from edgetl.rundir import run_lock, write_json
from edgetl.search.latency import LatencyOn, host_latency, on_target

log = logging.getLogger(__name__)

SHAPE = "shape.json"
CALIBRATION_IMAGES = 8  # random pixels: the ranges do not matter for cost


@dataclass(frozen=True)
class Budget:
    """The limits a model must meet on the target (None: no limit)."""

    max_latency_ms: float | None = None
    max_model_bytes: int | None = None
    max_arena_bytes: int | None = None

    def problems(self, cost: dict[str, Any]) -> list[str]:
        """Every limit ``cost`` (``latency`` from :func:`edgetl.search.latency.on_target`, ``bytes``,
        ``arena_bytes``) breaks, as phrases."""
        found = []
        latency = cost.get("latency") or {}
        if self.max_latency_ms is not None and latency.get("ms", 0) > self.max_latency_ms:
            found.append(f"{latency['ms']:.3g} ms > {self.max_latency_ms:g} ms")
        if self.max_model_bytes is not None and cost.get("bytes", 0) > self.max_model_bytes:
            found.append(f"{cost['bytes'] / 1000:,.0f} kB > {self.max_model_bytes / 1000:,.0f} kB")
        arena = cost.get("arena_bytes")
        if self.max_arena_bytes is not None and arena is not None and arena > self.max_arena_bytes:
            found.append(f"arena {arena / 1000:,.0f} kB > {self.max_arena_bytes / 1000:,.0f} kB")
        return found

    def to_dict(self) -> dict[str, Any]:
        return {"max_latency_ms": self.max_latency_ms, "max_model_bytes": self.max_model_bytes,
                "max_arena_bytes": self.max_arena_bytes}  # fmt: skip


def key(size: int, width: float) -> str:
    return f"{size}x{width:g}"


class Shapes:
    """The probed cost of each (size, width) of a search, probed on first use."""

    def __init__(self, out: Path, classes: list[str], how: LatencyOn, budget: Budget):
        self.root, self.classes, self.how, self.budget = out / "shapes", classes, how, budget

    def cost(self, size: int, width: float) -> dict[str, Any]:
        """The shape's bytes, arena (when the budget has one) and latency, with the budget's verdict."""
        folder = self.root / key(size, width)
        for _ in range(600):  # another process of the study may be probing it: wait for its result
            if (folder / SHAPE).is_file():
                return json.loads((folder / SHAPE).read_text())
            try:
                with run_lock(folder, "search shape probe"):
                    if not (folder / SHAPE).is_file():
                        write_json(folder / SHAPE, self._probe(folder, size, width))
            except RunLocked:
                time.sleep(1)
        raise ConstraintViolated(f"waited 10 minutes for another process to probe {key(size, width)} in {folder}")

    def within_budget(self, sizes: tuple[int, ...], widths: tuple[float, ...]) -> list[tuple[int, float]]:
        """The shapes within budget, probing from the smallest size of each width up until one is over
        (a larger input never costs less). Raises :class:`ConstraintViolated` when none is."""
        fits, smallest = [], None
        for width in widths:
            for size in sizes:
                cost = self.cost(size, width)
                if smallest is None or cost["latency"]["ms"] < smallest[2]["latency"]["ms"]:
                    smallest = (size, width, cost)
                if cost["over_budget"]:
                    break
                fits.append((size, width))
        if not fits:
            size, width, cost = smallest
            raise ConstraintViolated(
                f"no candidate fits the budget: the cheapest, {size} px at width {width:g}, needs "
                f"{'; '.join(cost['over_budget'])} ({self.how.describe()})",
                hint="raise --max-latency-ms / --max-model-kb, or add smaller --sizes / --widths")  # fmt: skip
        return fits

    def _probe(self, folder: Path, size: int, width: float) -> dict[str, Any]:
        started = time.perf_counter()
        path = convert_untrained(folder, size, width, self.classes)
        cost: dict[str, Any] = {"size": size, "width": width, "bytes": path.stat().st_size}
        cost["latency"] = on_target(host_latency(path), self.how)
        if self.budget.max_arena_bytes is not None:
            from edgetl.package.tflm import check_model

            pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), np.uint8)
            cost["arena_bytes"] = check_model(path, pixels, compare_litert=False).arena_bytes
        cost["over_budget"] = self.budget.problems(cost)
        cost["probe_s"] = round(time.perf_counter() - started, 2)
        log.info("shape %s: %s kB, %.3g ms (%s)%s", key(size, width), f"{cost['bytes'] / 1000:,.0f}",
                 cost["latency"]["ms"], cost["latency"]["how"],
                 f": over budget ({'; '.join(cost['over_budget'])})" if cost["over_budget"] else "")  # fmt: skip
        return cost


def convert_untrained(folder: Path, size: int, width: float, classes: list[str]) -> Path:
    """``folder/model_int8.tflite``: an untrained model of the shape, through the export's converter."""
    import torch

    from edgetl.export.convert import ConverterJob, run_converter
    from edgetl.export.tf_graph import save_graph
    from edgetl.export.tflite_process import GRAPH
    from edgetl.export.tool_metadata import ModelDescription, finish_for_tools
    from edgetl.train.model import EdgeClassifier

    torch.manual_seed(0)
    model = EdgeClassifier(len(classes), width).eval()
    save_graph(model, size, folder / GRAPH)
    calibration = np.random.default_rng(0).integers(0, 256, (CALIBRATION_IMAGES, size, size, 3), np.uint8)
    np.save(folder / "calibration.npy", calibration)
    job = ConverterJob(workdir=str(folder), graph=True, int8=True, calibration=str(folder / "calibration.npy"),
                       calibration_workers=1)  # fmt: skip
    run_converter(job, folder / "convert.log")
    path = folder / "model_int8.tflite"
    about = ModelDescription(f"probe {key(size, width)}", "an untrained model of this shape", "0", classes, size)
    finish_for_tools(path, about, "uint8")
    for leftover in (GRAPH, "calibration.npy", "model_float32.tflite", "job.json"):
        (folder / leftover).unlink(missing_ok=True)
    return path
