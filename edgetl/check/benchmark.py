"""``edgetl benchmark RUN``: every model of a run side by side on this host.

Per model (the PyTorch float model, ONNX through onnxruntime, each TFLite file through LiteRT, and the
accelerator models of the run's bundles, whose speed is the compiler's estimate): file size, top-1 on
the held-out images, top-1 agreement with the float model, and single-image latency (median and p90
of ``runs`` timed calls after 5 warm-up calls, per thread count). The models are timed interleaved
(:func:`edgetl.runtime.bench.interleaved_latency`: round after round, each model once), so a load that
comes and goes meets them alike; the speed-up against the TFLite float32 model at the same thread count
(the float model a device would run; else PyTorch) is the median of the per-round ratios. When the host
was busy meanwhile or the timings scattered, the report says so (:class:`~edgetl.runtime.bench.HostLoad`).

Writes ``benchmark.json`` and ``benchmark.md`` into the run (read by ``report.html``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.check.runners import runner_for
from edgetl.errors import RunDirError
from edgetl.rundir import (
    ARTIFACTS,
    MODEL,
    atomic_write,
    read_manifest,
    run_bundles,
    run_lock,
    verify_files,
    write_json,
)

log = logging.getLogger(__name__)

WARMUP = 5


@dataclass
class BenchmarkReport:
    host: str
    threads: list[int]
    runs: int
    data: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    devices: dict[str, Any] = field(default_factory=dict)  # on-target verdicts and board latencies (on_target)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "threads": self.threads, "runs": self.runs, "data": self.data, "rows": self.rows,
                "devices": self.devices}  # fmt: skip


def benchmark(run_dir: str | os.PathLike, threads: list[int], data: str | os.PathLike | None = None,
              runs: int = 30) -> BenchmarkReport:  # fmt: skip
    """Measure every model of ``run_dir`` and write benchmark.json / benchmark.md, holding the run's lock.

    Raises:
        RunDirError: the run was never fine-tuned, or a model differs from its manifest hash.
        DataError: ``data`` is unusable, or the run's dataset changed (pass ``data``).
    """
    from edgetl.data.heldout import evaluation_set
    from edgetl.train.checkpoint import load_checkpoint
    from edgetl.train.loop import agreement, inference_copy, top1, torch_logits

    with run_lock(run_dir, "benchmark"):
        run_dir = Path(run_dir)
        manifest = read_manifest(run_dir)
        names = [n for n in (MODEL, *ARTIFACTS) if n in manifest["files"]]
        tampered = [n for n in verify_files(run_dir, manifest) if n in names]
        if tampered:
            raise RunDirError(f"{', '.join(tampered)} in {run_dir} differ from the manifest's sha256")
        split, description, _, _ = evaluation_set(run_dir, manifest, data)
        model, _ = load_checkpoint(run_dir)
        reference = torch_logits(model, split.images)
        report = BenchmarkReport(host_description(), threads, runs,
                                 {k: description[k] for k in ("source", "count") if k in description})  # fmt: skip
        sample = split.images[:1]
        for name in names:
            logits = reference if name == MODEL else runner_for(run_dir / name)(split.images)
            kind = ("pytorch", "float32") if name == MODEL else ARTIFACTS[name]
            accuracy = {"top1": top1(logits, split.labels), "agreement": agreement(logits, reference)}
            report.rows.append({"artifact": name, "format": kind[0], "precision": kind[1],
                                "bytes": manifest["files"][name]["size"], **accuracy})  # fmt: skip
        _time_interleaved(report, run_dir, names, inference_copy(model), sample)
        report.rows += _accelerator_estimates(run_dir)
        report.devices = device_results(manifest)
        write_json(run_dir / "benchmark.json", report.to_dict())
        atomic_write(run_dir / "benchmark.md", benchmark_markdown(report))
        return report


def device_results(manifest: dict[str, Any]) -> dict[str, Any]:
    """What ran where the targets run (the manifest's ``on_target`` stage): verdicts and board latencies."""
    stage = manifest["stages"].get("on_target") or {}
    return {"verdicts": stage.get("verdicts", {}), "boards": stage.get("boards", {})}


def refresh_devices(run_dir: str | os.PathLike) -> None:
    """Bring benchmark.json / benchmark.md up to date with the run's on-target results (no re-timing)."""
    import json

    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / "benchmark.json").read_text())
        report = BenchmarkReport(saved["host"], saved["threads"], saved["runs"], saved["data"], saved["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        return  # never benchmarked (or unreadable): `edgetl benchmark` writes both with the devices
    report.devices = device_results(read_manifest(run_dir))
    write_json(run_dir / "benchmark.json", report.to_dict())
    atomic_write(run_dir / "benchmark.md", benchmark_markdown(report))


def host_description() -> str:
    """The CPU model and core count, e.g. "Intel(R) Xeon(R) Processor, 2 cores"."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def _time_interleaved(report: BenchmarkReport, run_dir: Path, names: list[str], model: Any,
                      sample: np.ndarray) -> None:  # fmt: skip
    """Every model's latency per thread count, timed round-robin; the speed-ups; the host's load."""
    from edgetl.runtime.bench import HostLoad, interleaved_latency, paired_ratio, timing_warning

    rows = {row["artifact"]: row for row in report.rows}
    base = "model_float32.tflite" if "model_float32.tflite" in names else MODEL
    report.data["speedup_baseline"] = base
    spread: dict[str, dict] = {}
    with HostLoad() as load:
        for count in report.threads:
            log.info("timing %d model(s) interleaved, %d thread(s)", len(names), count)
            with _torch_threads(count):
                timed = interleaved_latency(_calls(run_dir, names, model, sample, count), report.runs, WARMUP)
            for name, stats in timed.items():
                rows[name].setdefault("latency_ms", {})[str(count)] = {"median": stats["median_ms"],
                                                                       "p90": stats["p90_ms"]}  # fmt: skip
                rows[name].setdefault("speedup", {})[str(count)] = paired_ratio(timed[base], stats)
                spread[f"{name}, {count} thread(s)"] = stats
    report.data["host_load"] = load.to_dict()
    report.data["warning"] = timing_warning(load, spread)
    if report.data["warning"]:
        log.warning("%s", report.data["warning"])


def _calls(run_dir: Path, names: list[str], model: Any, sample: np.ndarray, threads: int) -> dict[str, Any]:
    """One call per model: a single-image inference at ``threads`` threads."""
    import torch

    from edgetl.runtime.model import open_model
    from edgetl.train.augment import to_model_input

    calls = {}
    for name in names:
        if name == MODEL:
            pixels = to_model_input(torch.from_numpy(sample)).contiguous(memory_format=torch.channels_last)

            def forward(pixels: Any = pixels) -> Any:
                with torch.inference_mode():
                    return model(pixels)

            calls[name] = forward
        else:
            opened = open_model(str(run_dir / name), threads)
            tensor = opened.to_input(sample[0])
            calls[name] = lambda opened=opened, tensor=tensor: opened.invoke(tensor)
    return calls


@contextlib.contextmanager
def _torch_threads(count: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to ``count`` inside the block."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _accelerator_estimates(run_dir: Path) -> list[dict[str, Any]]:
    """The compiled models of the run's bundles: Vela's inference-time estimate (an estimate, not a
    measurement); the Edge TPU compiler gives none, so only its size is listed."""
    rows = []
    for _, bundle in run_bundles(run_dir):
        accelerator = bundle.get("accelerator") or {}
        compiled = accelerator.get("model")  # set when the compiler ran
        if not compiled:
            continue
        row = {"artifact": f"{bundle['name']}/{compiled}", "format": bundle["target"].get("name", ""),
               "precision": "int8", "bytes": bundle.get("files", {}).get(compiled, {}).get("size"),
               "estimate": True, "latency_ms": {}}  # fmt: skip
        if accelerator.get("inference_time_s"):
            row["latency_ms"] = {"accelerator": {"median": 1e3 * accelerator["inference_time_s"], "p90": None}}
        rows.append(row)
    return rows


def benchmark_markdown(report: BenchmarkReport) -> str:
    threads = [str(t) for t in report.threads]
    head = "| model | size | top-1 | agreement | " + " | ".join(f"{t} thread(s): median / p90 ms" for t in threads)
    lines = [
        f"# Benchmark: {report.data.get('count')} images ({report.data.get('source')}), host {report.host}",
        "",
        f"Single-image latency, {report.runs} timed runs after {WARMUP} warm-up calls per thread count, the models "
        f"timed interleaved; speed-up against {report.data.get('speedup_baseline')} at the same thread count "
        "(median of the per-round ratios).",
        "",
        *([f"**Warning: {report.data['warning']}.**", ""] if report.data.get("warning") else []),
        head + " |",
        "|---|---|---|---|" + "---|" * len(threads),
    ]
    for row in report.rows:
        cells = [f"{row['artifact']}" + (" (estimate)" if row.get("estimate") else ""),
                 f"{row['bytes'] / 2**20:.2f} MiB" if row.get("bytes") else "-",
                 f"{100 * row['top1']:.2f} %" if "top1" in row else "-",
                 f"{100 * row['agreement']:.2f} %" if "agreement" in row else "-"]  # fmt: skip
        for t in threads:
            latency, speedup = row["latency_ms"].get(t), row.get("speedup", {}).get(t)
            cells.append(f"{latency['median']:.2f} / {latency['p90']:.2f} ({speedup:.2f}×)" if latency else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + devices_markdown(report.devices)) + "\n"


def devices_markdown(devices: dict[str, Any]) -> list[str]:
    """The on-target rows: accuracy where the bundle runs (emulated or a board), and a board's latency."""
    lines = []
    if devices.get("verdicts"):
        lines += ["", "## Where it runs: accuracy", "",
                  "| target | where | images | top-1 | agreement with float | with the host's int8 | verdict |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for v in devices["verdicts"].values():
            lines.append(f"| {v['target']} | {v['described']} | {v['count']} | {100 * v['top1']:.2f} % | "
                         f"{100 * v['agreement']:.2f} % | {100 * v['agreement_with_host']:.2f} % | "
                         f"{'PASS' if v['passed'] else 'FAIL'} |")  # fmt: skip
    if devices.get("boards"):
        lines += ["", "## Where it runs: latency on a board (`edgetl bench BUNDLE --ssh HOST`)", "",
                  "| bundle | board | software | threads | invoke median / p90 ms | frame median ms |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        for b in devices["boards"].values():
            device = b.get("device", {})
            software = ", ".join(f"{k} {v}" for k, v in sorted(device.get("versions", {}).items()))
            for r in b.get("results", []):
                lines.append(f"| {b.get('bundle')} | {device.get('board')} ({device.get('machine')}) | {software} | "
                             f"{r['threads']} | {r['invoke_ms_median']:.2f} / {r['invoke_ms_p90']:.2f} | "
                             f"{r['frame_ms_median']:.2f} |")  # fmt: skip
        lines += [f"\n{b.get('bundle')} on {b.get('device', {}).get('board')}: **{b['warning']}.**"
                  for b in devices["boards"].values() if b.get("warning")]  # fmt: skip
    return lines
