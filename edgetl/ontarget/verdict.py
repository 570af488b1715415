"""The on-target verdict: the bundle's own runtime, where it runs, against the float model and the host.

Parity on the workstation measures x86 kernels and the workstation's library versions; a Raspberry Pi
runs ARM kernels and the wheels its pip resolves. This verdict runs the bundle (its runtime, decoding,
preprocessing and interpreter) on the target's CPU — emulated (:mod:`edgetl.ontarget.emulate`) or on a
board over ssh (:mod:`edgetl.ontarget.board`) — on the same held-out images as the host verdict, and
records top-1, Δ and agreement with the float model, agreement with the host's int8, the largest output
difference (in the output's quantisation steps), and where it ran. The host verdict stays as it is.

A verdict is recorded in the run's manifest (stage ``on_target``) with a fingerprint of what decided
it (the model's and the runtime's sha256, the requirements, the CPU or board, the images); ``package``
reuses it while the fingerprint is unchanged instead of emulating again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.check.benchmark import refresh_devices
from edgetl.check.metrics import compare
from edgetl.config import Thresholds
from edgetl.ontarget.emulate import DeviceScores, describe, run_emulated
from edgetl.rundir import atomic_write, read_manifest, run_lock, update_manifest
from edgetl.targets import Target

log = logging.getLogger(__name__)

STAGE = "on_target"


def can_emulate(target: Target) -> bool:
    """Whether edgetl can run this target's CPU side under emulation (Linux-class boards)."""
    return bool(target.device.emulate and target.device.userland)


def fingerprint(bundle_dir: Path, target: Target, where_key: str, data: str | None) -> dict[str, Any]:
    """What decides an on-target verdict: model, runtime and requirements (their sha256 in the bundle),
    the CPU or board, and the images (the run's validation split, or a folder)."""
    files = json.loads((bundle_dir / "manifest.json").read_text())["files"]
    runtime = hashlib.sha256("".join(f"{rel}:{entry['sha256']}\n" for rel, entry in sorted(files.items())
                                     if rel.startswith("edgetl_runtime/")).encode()).hexdigest()  # fmt: skip
    return {"model_sha256": files[target.artifact]["sha256"], "runtime_sha256": runtime,
            "requirements_sha256": files["requirements-device.txt"]["sha256"], "where": where_key,
            "data": data or "validation split"}  # fmt: skip


def where_key(target: Target, ssh: str | None, mediapipe: str | None = None) -> str:
    if mediapipe:
        return "mediapipe"
    return f"ssh:{ssh}" if ssh else f"qemu:{target.device.emulate}:{target.device.userland}"


def recorded(run_dir: Path, target: Target, print_: dict[str, Any]) -> dict[str, Any] | None:
    """A verdict of the run with this fingerprint, judged again by ``target``'s thresholds; None if none."""
    verdicts = (read_manifest(run_dir)["stages"].get(STAGE) or {}).get("verdicts", {})
    for record in verdicts.values():
        if record.get("fingerprint") == print_:
            return {**record, **judge(record, target), "reused": True}
    return None


def judge(record: dict[str, Any], target: Target) -> dict[str, Any]:
    thresholds = Thresholds(max_drop=target.parity.max_drop, min_agreement=target.parity.min_agreement)
    return {"passed": thresholds.passes(record), "thresholds": thresholds.to_dict(), "target": target.name}


def measure(run_dir: Path, target: Target, bundle_dir: Path, *, ssh: str | None = None, data: str | None = None,
            processes: int | None = None, mediapipe: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Run the bundle where the target runs it and record the verdict in the run (and parity.md).

    Raises:
        what :func:`edgetl.ontarget.emulate.run_emulated` / :func:`edgetl.ontarget.board.run_on_board` raise.
    """
    from edgetl.check.parity import float_evaluation
    from edgetl.check.runners import runner_for

    manifest = read_manifest(run_dir)
    print_ = fingerprint(bundle_dir, target, where_key(target, ssh, mediapipe), data)
    images, description, classes, reference = float_evaluation(run_dir, manifest, data)
    host = runner_for(run_dir / target.artifact)(images.images)
    cpu_model = target.compile.tool == "edgetpu_compiler"  # the host side of an accelerator: its CPU path
    requirements = [line.strip() for line in (bundle_dir / "requirements-device.txt").read_text().splitlines()
                    if line.strip()]  # one requirement a line: "numpy >= 1.21" has spaces
    if mediapipe:
        from edgetl.ontarget.mediapipe_tasks import run_mediapipe

        spec = json.loads((bundle_dir / "manifest.json").read_text())["preprocess"]
        device = run_mediapipe(mediapipe, bundle_dir / target.artifact, list(images.paths), images.images,
                               spec["image_size"] / spec["resize_size"], len(classes))  # fmt: skip
    elif ssh:
        from edgetl.ontarget.board import run_on_board

        device = run_on_board(ssh, bundle_dir, list(images.paths), images.images, cpu_model)
    else:
        device = run_emulated(bundle_dir, list(images.paths), images.images, target.device.emulate,
                              target.device.userland, requirements, processes, cpu_model)  # fmt: skip
    output = manifest["stages"]["export"]["artifacts"][target.artifact]["output"]
    record = _record(device, reference, host, images, classes, description, output.get("scale") or 0.0)
    record.update(fingerprint=print_, **judge(record, target))
    _store(run_dir, target, record)
    return record


def shortfall(record: dict[str, Any]) -> str:
    """How a failed verdict misses its thresholds, in words."""
    limits = record["thresholds"]
    return (f"top-1 Δ {record['delta_top1_pp']:+.2f} pp, agreement {100 * record['agreement']:.2f} % with the float "
            f"model on {record['count']} images (target: ≥ -{limits['max_drop']} pp, "
            f"≥ {100 * limits['min_agreement']:.1f} %)")  # fmt: skip


SUMMARY_KEYS = ("target", "described", "fingerprint", "passed", "thresholds", "count", "top1", "delta_top1_pp",
                "agreement", "agreement_with_host", "max_output_diff", "max_output_diff_steps",
                "images_over_one_step", "inputs_differing")  # fmt: skip


def bundle_summary(record: dict[str, Any]) -> dict[str, Any]:
    """What a bundle's manifest says of its on-target verdict: no timings, so that packaging again (the
    verdict reused) gives the same bytes."""
    where = {k: v for k, v in record["where"].items() if k != "setup_seconds"}
    return {**{k: record[k] for k in SUMMARY_KEYS if k in record}, "where": where,
            "data": {k: record["data"].get(k) for k in ("source", "count", "sha256") if k in record["data"]}}


def _record(device: DeviceScores, reference: np.ndarray, host: np.ndarray, images: Any, classes: list[str],
            description: dict[str, Any], scale: float) -> dict[str, Any]:  # fmt: skip
    metrics = compare(reference, device.scores, images.labels, classes, list(images.paths), description.get("root"))
    measured = np.ones(len(host), bool) if device.kernel_measured is None else device.kernel_measured
    kernel_diff = np.abs(device.kernel_scores - host)[measured]
    steps = kernel_diff / scale if scale > 0 else None
    per_image = kernel_diff.max(1)
    pipeline_steps = np.abs(device.scores - host).max(1) / scale if scale > 0 else None
    return {
        **{k: metrics[k] for k in ("count", "top1", "delta_top1_pp", "agreement", "agreement_ci95",
                                   "cosine_min", "sqnr_db", "per_class", "disagreements") if k in metrics},
        "agreement_with_host": float((device.scores.argmax(1) == host.argmax(1)).mean()),
        # the kernels alone: the host's input crops through the device's interpreter, on ``kernel_images``
        "kernel_images": int(measured.sum()),
        "kernel_agreement_with_host": float((device.kernel_scores.argmax(1) == host.argmax(1))[measured].mean()),
        "max_output_diff": float(kernel_diff.max()),
        "max_output_diff_steps": None if steps is None else int(round(float(steps.max()))),
        "images_over_one_step": None if steps is None else int((steps.max(1) > 1.5).sum()),
        "images_with_output_diff": int((per_image > 0).sum()),
        # the same on the device's own decoding and resizing (what the board answers for the photo)
        "pipeline_max_output_diff_steps": None if pipeline_steps is None else int(round(float(pipeline_steps.max()))),
        "pipeline_images_over_one_step": None if pipeline_steps is None else int((pipeline_steps > 1.5).sum()),
        # None: the runtime resamples the photo itself (MediaPipe), so there is no input crop to compare
        "inputs_differing": int((device.input_diff_max > 0).sum()) if (device.input_diff_max >= 0).all() else None,
        "input_diff_max": int(device.input_diff_max.max()) if (device.input_diff_max >= 0).all() else None,
        "invoke_ms_median": float(np.median(device.invoke_ms)),
        "where": device.where,
        "described": describe(device.where),
        "data": description,
        "seconds": round(device.seconds, 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _store(run_dir: Path, target: Target, record: dict[str, Any]) -> None:
    with run_lock(run_dir, "check --on-target"):
        stage = read_manifest(run_dir)["stages"].get(STAGE) or {}
        verdicts = {**stage.get("verdicts", {}), f"{target.name} @ {record['fingerprint']['where']}": record}
        update_manifest(run_dir, STAGE, [], {**stage, "verdicts": verdicts})
        parity_md = run_dir / "parity.md"
        if parity_md.is_file():
            text = parity_md.read_text().split(SECTION)[0].rstrip("\n")
            atomic_write(parity_md, f"{text}\n\n{markdown(verdicts)}")
    refresh_devices(run_dir)


def record_board_bench(bundle_dir: Path, result: dict[str, Any]) -> Path | None:
    """Keep a board's ``bench`` in the run the bundle was packaged from (``RUN/bundles/NAME``), for
    benchmark.md/.json and the report; returns the run folder (None: the bundle is not inside a run)."""
    folder = bundle_dir.resolve()
    run_dir = folder.parent.parent
    if folder.parent.name != "bundles" or not (run_dir / "manifest.json").is_file():
        return None
    entry = {**result, "bundle": folder.name, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with run_lock(run_dir, "bench --ssh"):
        stage = read_manifest(run_dir)["stages"].get(STAGE) or {}
        boards = {**stage.get("boards", {}), f"{folder.name} @ {result['host']}": entry}
        update_manifest(run_dir, STAGE, [], {**stage, "boards": boards})
    refresh_devices(run_dir)
    return run_dir


SECTION = "## Where it runs"


def markdown(verdicts: dict[str, dict[str, Any]]) -> str:
    """The on-target verdicts as a parity.md section."""
    lines = [SECTION, "",
             "The bundle's own runtime (its decoding, preprocessing and interpreter) on the target's CPU, on the "
             "same images as above. Output difference: against the host's int8 on the host's exact input crops.",
             "", "| target | where | images | top-1 | Δ vs float | agreement (float) | agreement (host int8) | "
             "largest output difference | verdict | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for record in verdicts.values():
        steps = record.get("max_output_diff_steps")
        diff = f"{record['max_output_diff']:.4f}" + (f" ({steps} steps)" if steps is not None else "")
        lines.append(f"| {record['target']} | {record['described']} | {record['count']} | "
                     f"{100 * record['top1']:.2f} % | {record['delta_top1_pp']:+.2f} pp | "
                     f"{100 * record['agreement']:.2f} % | {100 * record['agreement_with_host']:.2f} % | {diff} | "
                     f"{'PASS' if record['passed'] else 'FAIL'} | {record['seconds']} |")  # fmt: skip
    return "\n".join(lines) + "\n"
