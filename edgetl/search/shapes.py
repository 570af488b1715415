"""What a model shape costs, known before any training: an untrained MobileNetV2 of that input size,
width and class count, converted to int8 exactly as ``edgetl export`` converts a trained one. Its file
size and tensor arena are the trained model's (weights do not change them, to a few bytes of metadata),
and so is its latency (integer kernels take the same time whatever the weights).

Every shape of a search is probed once, at its start, and kept in ``DIR/shapes/<size>x<width>/shape.json``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import ConstraintViolated
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
    """The probed cost of each (size, width) of a search."""

    def __init__(self, out: Path, classes: list[str], how: LatencyOn, budget: Budget):
        self.root, self.classes, self.how, self.budget = out / "shapes", classes, how, budget

    def cost(self, size: int, width: float) -> dict[str, Any]:
        """The shape's bytes, arena (when the budget has one) and latency, with the budget's verdict."""
        return self.costs([(size, width)])[0]

    def costs(self, shapes: list[tuple[int, float]]) -> list[dict[str, Any]]:
        """:meth:`cost` of each shape; the ones not yet probed are probed together (TensorFlow starts once
        for all their conversions; the latencies are then timed one after another, nothing else running).
        Another process of the study probing at the same time is waited for."""
        if any(not (self._folder(*shape) / SHAPE).is_file() for shape in shapes):
            with run_lock(self.root, "search shape probe", wait=600):
                self._probe([shape for shape in shapes if not (self._folder(*shape) / SHAPE).is_file()])
        return [json.loads((self._folder(*shape) / SHAPE).read_text()) for shape in shapes]

    def within_budget(self, sizes: tuple[int, ...], widths: tuple[float, ...]) -> list[tuple[int, float]]:
        """The shapes within budget (all probed). Raises :class:`ConstraintViolated` when none is."""
        shapes = [(size, width) for width in widths for size in sizes]
        costs = self.costs(shapes)
        fits = [shape for shape, cost in zip(shapes, costs, strict=True) if not cost["over_budget"]]
        if not fits:
            cost = min(costs, key=lambda c: c["latency"]["ms"])
            raise ConstraintViolated(
                f"no candidate fits the budget: the cheapest, {cost['size']} px at width {cost['width']:g}, needs "
                f"{'; '.join(cost['over_budget'])} ({self.how.describe()})",
                hint="raise --max-latency-ms / --max-model-kb, or add smaller --sizes / --widths")  # fmt: skip
        return fits

    def _folder(self, size: int, width: float) -> Path:
        return self.root / key(size, width)

    def _probe(self, shapes: list[tuple[int, float]]) -> None:
        if not shapes:
            return
        started = time.perf_counter()
        folders = [self._folder(*shape) for shape in shapes]
        paths = convert_untrained(folders, shapes, self.classes)
        log.info("probed %d shape(s) in %.0f s", len(shapes), time.perf_counter() - started)
        for (size, width), folder, path in zip(shapes, folders, paths, strict=True):
            cost: dict[str, Any] = {"size": size, "width": width, "bytes": path.stat().st_size}
            cost["latency"] = on_target(host_latency(path), self.how)
            if self.budget.max_arena_bytes is not None:
                from edgetl.package.tflm import check_model

                pixels = np.random.default_rng(0).integers(0, 256, (1, size, size, 3), np.uint8)
                cost["arena_bytes"] = check_model(path, pixels, compare_litert=False).arena_bytes
            cost["over_budget"] = self.budget.problems(cost)
            write_json(folder / SHAPE, cost)
            log.info("shape %s: %s kB, %.3g ms (%s)%s", key(size, width), f"{cost['bytes'] / 1000:,.0f}",
                     cost["latency"]["ms"], cost["latency"]["how"],
                     f": over budget ({'; '.join(cost['over_budget'])})" if cost["over_budget"] else "")  # fmt: skip


def convert_untrained(folders: list[Path], shapes: list[tuple[int, float]], classes: list[str]) -> list[Path]:
    """``folder/model_int8.tflite`` for each shape: an untrained model of that shape, through the export's
    converter (one converter process for all)."""
    import torch

    from edgetl.export.convert import ConverterJob, run_converters
    from edgetl.export.tf_graph import save_graph
    from edgetl.export.tflite_process import GRAPH
    from edgetl.export.tool_metadata import ModelDescription, finish_for_tools
    from edgetl.train.model import EdgeClassifier

    jobs = []
    for folder, (size, width) in zip(folders, shapes, strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_graph(EdgeClassifier(len(classes), width).eval(), size, folder / GRAPH)
        pixels = np.random.default_rng(0).integers(0, 256, (CALIBRATION_IMAGES, size, size, 3), np.uint8)
        np.save(folder / "calibration.npy", pixels)
        jobs.append(ConverterJob(workdir=str(folder), graph=True, int8=True,
                                 calibration=str(folder / "calibration.npy"), calibration_workers=1))  # fmt: skip
    run_converters(jobs, folders[0].parent / "convert.log")
    for folder, (size, width) in zip(folders, shapes, strict=True):
        about = ModelDescription(f"probe {key(size, width)}", "an untrained model of this shape", "0", classes, size)
        finish_for_tools(folder / "model_int8.tflite", about, "uint8")
        for leftover in (GRAPH, "calibration.npy", "model_float32.tflite", "job.json"):
            (folder / leftover).unlink(missing_ok=True)
    return [folder / "model_int8.tflite" for folder in folders]
