"""Package a checked run for a target: a verified, self-describing, reproducible bundle.

The bundle folder holds the target's artifact, ``labels.txt``, ``manifest.json`` (schema version,
edgetl version, target, preprocessing and I/O spec, every file's sha256 and size, parity, calibration
hash, training summary, tool versions), the device runtime (``edgetl_runtime/``, copied as is),
``requirements-device.txt`` and ``README.txt``. The ``.tar.gz`` beside it is byte-for-byte
reproducible: sorted entries, fixed mtime (``SOURCE_DATE_EPOCH`` or 1980-01-01), owner 0/0, fixed
modes, and a gzip header without a timestamp or file name (:mod:`edgetl.package.archive`). What the run
must pass first is :mod:`edgetl.package.gates`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl import __version__
from edgetl.errors import ConstraintViolated
from edgetl.package.archive import reproducible_targz, source_date_epoch, write_dir
from edgetl.package.gates import judge_parity, over, refuse_fallback, trusted_model
from edgetl.rundir import MODEL, QAT_WEIGHTS, atomic_path, dumps_json, read_manifest, run_lock
from edgetl.targets import Target

RUNTIME_DIR = "edgetl_runtime"


@dataclass
class PackageResult:
    bundle_dir: Path
    archive: Path
    archive_sha256: str
    target: str
    files: dict[str, dict[str, Any]]
    forced: bool
    parity: dict[str, Any]
    accelerator: dict[str, Any] | None = None  # compiler report (Edge TPU, Vela)
    tflm: dict[str, Any] | None = None  # TFLite Micro run: arena, agreement with LiteRT
    on_target: dict[str, Any] | None = None  # the verdict where the target runs it (edgetl.ontarget)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle_dir": str(self.bundle_dir),
            "archive": str(self.archive),
            "archive_sha256": self.archive_sha256,
            "archive_bytes": self.archive.stat().st_size,
            "target": self.target,
            "files": self.files,
            "forced": self.forced,
            "parity": self.parity,
            "accelerator": self.accelerator,
            "tflm": self.tflm,
            "on_target": self.on_target,
        }


def runtime_files() -> dict[str, bytes]:
    """The device runtime's sources, as they will sit in the bundle."""
    source = Path(__file__).resolve().parents[1] / "runtime"
    return {f"{RUNTIME_DIR}/{p.name}": p.read_bytes() for p in sorted(source.glob("*.py"))}


def bundle_readme(name: str, target: Target, model: str, accelerator: dict[str, Any] | None = None,
                  tflm: dict[str, Any] | None = None, preprocess: dict[str, Any] | None = None) -> str:  # fmt: skip
    side = preprocess["image_size"] if preprocess else target.input.size
    shape = f"input {side}x{side} RGB {target.input.dtype} {target.input.layout}"
    crop = preprocess["image_size"] / preprocess["resize_size"] if preprocess else 0.875
    if target.runtime == "tflm":
        compiled = (accelerator or {}).get("model")
        firmware = compiled or model
        arena = (f"TFLite Micro needed a tensor arena of {tflm['arena_bytes']:,} bytes (measured on a 64-bit host: "
                 "an upper bound for a 32-bit MCU)." if tflm else "")  # fmt: skip
        if accelerator and accelerator.get("tool") == "vela" and accelerator.get("compiled"):
            arena = (f"Vela ({accelerator['accelerator']}, {accelerator['system_config']}, "
                     f"{accelerator['memory_mode']}) plans {accelerator['sram_bytes']:,} bytes of SRAM; "
                     "the ethos-u custom op needs the Ethos-U driver and TFLM's ethos-u kernel.")  # fmt: skip
        return f"""{name}: an edgetl bundle for {target.name} ({target.description})

Firmware: compile edgetl_model_data.c into your TensorFlow Lite for Microcontrollers build; it holds
{firmware} as a 16-byte-aligned const array, and edgetl_model_data.h declares it with its length,
the input/output shape, dtype, scale and zero point, and the labels:

    #include "edgetl_model_data.h"
    const tflite::Model* model = tflite::GetModel(edgetl_model_data);

{arena}
Model: {model}; {shape}; labels in labels.txt; everything else in manifest.json.
To try the same int8 model on a host: python3 -m {RUNTIME_DIR} . image.jpg (needs requirements of the
rpi targets: numpy, ai-edge-litert, OpenCV).
"""
    return f"""{name}: an edgetl bundle for {target.name} ({target.description})

Install the runtime's dependencies on the device (no torch, no TensorFlow, no edgetl):

    pip install -r requirements-device.txt

Classify images or folders (the runtime checks every file's sha256 against manifest.json first):

    python3 -m {RUNTIME_DIR} . path/to/image.jpg path/to/folder --top-k 3

Model: {model}; {shape}; labels in labels.txt; everything else in manifest.json.

Other runtimes: MediaPipe Tasks' ImageClassifier loads {model} as it is (labels from its metadata). Give
it the region edgetl's preprocessing crops, or it stretches the whole frame and answers differently on
a few percent of photos: ImageProcessingOptions(region_of_interest=RectF(...)) with the centred square
whose side is {crop:.3f} of the image's shorter side.
"""


def package(
    run_dir: str | os.PathLike,
    target: Target,
    out: str | os.PathLike | None = None,
    force: bool = False,
    *,
    compile_model: bool = True,
    allow_cpu_ops: bool = False,
    check_tflm: bool = True,
    accept_weak_parity: bool = False,
    on_target: Callable[[Path], dict[str, Any] | None] | None = None,
) -> PackageResult:
    """Build the bundle folder and its reproducible ``.tar.gz``.

    Raises:
        RunDirError: nothing exported for this target's artifact, or run files differ from the manifest.
        ParityRefused: see :func:`edgetl.package.gates.judge_parity`: a failed or missing verdict, or one
            that a verdict on as many or more images contradicts, unless ``force``; one on too little
            evidence, unless ``accept_weak_parity`` (both recorded in the bundle manifest).
        ConstraintViolated: the model breaks a target limit (size, input, static shape, batch), or the
            compiled model, Vela's SRAM use or the TFLM arena exceed the target's budgets.
        MissingDependencyError: the target's compiler is not installed (``compile_model=False``
            ships the compile-ready model and a script instead).
        OpsOnCPU: the Edge TPU compiler or Vela left more operations on the CPU than the target
            allows, unless ``allow_cpu_ops``.
        TFLMUnsupported: TFLite Micro cannot run the model (``check_tflm=False`` skips that run).
        RunLocked: another process writes the same output folder.
        what ``on_target`` raises (see :func:`_check_staged`).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    compiled_later = target.compile.tool == "vela" and compile_model  # Vela's output is what must fit
    model_bytes = trusted_model(run_dir, manifest, target, compiled_later)
    forced, parity = judge_parity(manifest, target.artifact, target, force, accept_weak_parity)
    contents: dict[str, bytes] = {
        target.artifact: model_bytes,
        "labels.txt": (run_dir / "labels.txt").read_bytes(),
        "requirements-device.txt": "".join(f"{r}\n" for r in target.device.requirements).encode(),
        **runtime_files(),
    }
    io = {key: manifest["stages"]["export"]["artifacts"][target.artifact][key] for key in ("input", "output")}
    accelerator, tflm = _compile(run_dir, manifest, target, contents, io, compile_model, allow_cpu_ops, check_tflm)
    name = f"{run_dir.resolve().name}-{target.name}"
    preprocess = manifest["stages"]["finetune"]["preprocess"]
    contents["README.txt"] = bundle_readme(name, target, target.artifact, accelerator, tflm, preprocess).encode()
    files = {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
             for rel, data in sorted(contents.items())}  # fmt: skip
    bundle_manifest = _bundle_manifest(manifest, target, name, io, files, parity, forced, accelerator, tflm)
    bundle_manifest["on_target"] = _check_staged(on_target, name, contents, bundle_manifest)
    contents["manifest.json"] = dumps_json(bundle_manifest).encode()
    out = Path(out) if out is not None else run_dir / "bundles"
    data = reproducible_targz(name, contents, source_date_epoch())
    with run_lock(out, "package"):  # two packagers of one bundle would swap folders under each other
        write_dir(out / name, contents)
        with atomic_path(out / f"{name}.tar.gz") as tmp:
            tmp.write_bytes(data)
    return PackageResult(bundle_dir=out / name, archive=out / f"{name}.tar.gz",
                         archive_sha256=hashlib.sha256(data).hexdigest(), target=target.name, files=files,
                         forced=bundle_manifest["forced"], parity=parity, accelerator=accelerator,
                         tflm=tflm, on_target=bundle_manifest["on_target"])  # fmt: skip


def _check_staged(on_target: Callable[[Path], dict[str, Any] | None] | None, name: str, contents: dict[str, bytes],
                  manifest: dict[str, Any]) -> dict[str, Any] | None:  # fmt: skip
    """Call ``on_target`` with the finished bundle, written to a private folder before anything is written
    to the output folder; what it returns goes into the bundle's manifest (``on_target``; None: no check)."""
    if on_target is None:
        return None
    with tempfile.TemporaryDirectory(prefix="edgetl-staged-") as tmp:
        write_dir(Path(tmp) / name, {**contents, "manifest.json": dumps_json(manifest).encode()})
        return on_target(Path(tmp) / name)


def _compile(run_dir: Path, manifest: dict[str, Any], target: Target, contents: dict[str, bytes],
             io: dict[str, Any], compile_model: bool, allow_cpu_ops: bool,
             check_tflm: bool) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:  # fmt: skip
    """The target's compile step and firmware sources, added to ``contents``: (accelerator report, TFLM report)."""
    artifact = target.artifact
    accelerator = tflm = None
    firmware_model = artifact  # what a TFLM firmware compiles in
    if target.compile.tool == "edgetpu_compiler":
        accelerator = _edgetpu(run_dir, artifact, target, contents, compile_model, allow_cpu_ops)
    elif target.compile.tool == "vela":
        accelerator = _vela(run_dir, artifact, target, contents, compile_model, allow_cpu_ops)
        firmware_model = accelerator.get("model", artifact)
    if target.runtime == "tflm" and target.compile.tool == "":  # the Cortex-M runs every op itself
        tflm = _tflm(run_dir, manifest, artifact, io, target) if check_tflm else None
    if target.runtime == "tflm":  # firmware compiles the model in: C array + header
        from edgetl.package.c_source import c_sources

        labels = (run_dir / "labels.txt").read_text().splitlines()
        header, source = c_sources(contents[firmware_model], io, labels, name="edgetl_model")
        contents["edgetl_model_data.h"], contents["edgetl_model_data.c"] = header.encode(), source.encode()
    return accelerator, tflm


def _bundle_manifest(manifest: dict[str, Any], target: Target, name: str, io: dict[str, Any],
                     files: dict[str, Any], parity: dict[str, Any], forced: bool, accelerator: dict | None,
                     tflm: dict | None) -> dict[str, Any]:  # fmt: skip
    """The bundle's manifest.json: what it is, for which target, from which run, on what evidence."""
    finetune, export = manifest["stages"]["finetune"], manifest["stages"]["export"]
    return {
        "kind": "edgetl-bundle",
        "schema_version": 1,
        "edgetl_version": __version__,
        "name": name,
        "model": target.artifact,
        "num_classes": finetune["arch"]["num_classes"],
        "target": target.to_dict(),
        "preprocess": finetune["preprocess"],
        "io": io,
        "files": files,
        "parity": parity,
        "forced": forced,
        "calibration": export.get("calibration"),
        "accelerator": accelerator,
        "tflm": tflm,
        "training": {
            "arch": finetune["arch"],
            "weights": finetune["weights"],
            "best_epoch": finetune["best_epoch"],
            "val_top1": finetune["val_top1"],
            "test_top1": finetune["test_top1"],
            "data_fingerprint": finetune["data"]["fingerprint"],
            "run_model_sha256": manifest["files"][MODEL]["sha256"],
            # a QAT run's quantised models come from these weights (edgetl.quantize.qat)
            "qat_weights_sha256": manifest["files"].get(QAT_WEIGHTS, {}).get("sha256"),
        },
        "versions": {**finetune.get("versions", {}), **export.get("versions", {})},
    }


def _edgetpu(run_dir: Path, artifact: str, target: Target, contents: dict[str, bytes], compile_model: bool,
             allow_cpu_ops: bool) -> dict[str, Any]:  # fmt: skip
    """Compile for the Edge TPU into ``contents`` (or add the script to do it elsewhere)."""
    from edgetl.package.edgetpu import COMPILER, compile_script
    from edgetl.package.edgetpu import compile_model as run_compiler

    if not compile_model:
        contents["compile_edgetpu.sh"] = compile_script(artifact, target.compile.args).encode()
        return {"tool": COMPILER, "compiled": False, "script": "compile_edgetpu.sh"}
    with tempfile.TemporaryDirectory() as tmp:
        compiled, log_text, report = run_compiler(run_dir / artifact, Path(tmp), target.compile.args)
        ops = ", ".join(f"{r['op']} x{r['count']} ({r['status']})" for r in report.cpu_operations)
        refuse_fallback(report.cpu_ops or 0, report.total_ops, "the Edge TPU", ops, target, allow_cpu_ops)
        contents[compiled.name] = compiled.read_bytes()
        contents["edgetpu_compiler.log"] = log_text.encode()
    return {"tool": COMPILER, "compiled": True, "model": compiled.name, **report.to_dict()}


def _vela(run_dir: Path, artifact: str, target: Target, contents: dict[str, bytes], compile_model: bool,
          allow_cpu_ops: bool) -> dict[str, Any]:  # fmt: skip
    """Compile for the Ethos-U NPU with Vela into ``contents`` (or add the script to do it elsewhere)."""
    from edgetl.package import vela

    if not compile_model:
        contents["compile_vela.sh"] = vela.compile_script(artifact, target.compile.args).encode()
        return {"tool": "vela", "compiled": False, "script": "compile_vela.sh"}
    with tempfile.TemporaryDirectory(prefix="edgetl-vela-") as tmp:
        compiled, log_text, summary, report = vela.compile_model(run_dir / artifact, Path(tmp), target.compile.args)
        ops = ", ".join(f"{r['tensor']}" + (f" ({r['op']}: {r['reason']})" if r["reason"] else "")
                        for r in report.cpu_operations[:5]) + (", ..." if len(report.cpu_operations) > 5 else "")
        refuse_fallback(report.cpu_ops, report.npu_ops + report.cpu_ops, "the NPU", ops, target, allow_cpu_ops)
        size = compiled.stat().st_size
        problems = [p for p in (
            over(f"{compiled.name}", size, target.constraints.max_model_bytes),
            over(f"Vela's SRAM use ({report.accelerator}, {report.memory_mode})", report.sram_bytes,
                  target.constraints.max_arena_bytes),
        ) if p]  # fmt: skip
        if problems:
            raise ConstraintViolated(f"{target.name}: {'; '.join(problems)}")
        contents[compiled.name] = compiled.read_bytes()
        contents["vela.log"] = log_text.encode()
        contents["vela_summary.csv"] = summary.encode()
    return {"tool": "vela", "compiled": True, "model": compiled.name, "model_bytes": size, **report.to_dict()}


def _tflm(run_dir: Path, manifest: dict[str, Any], artifact: str, io: dict[str, Any], target: Target,
          max_images: int = 128) -> dict[str, Any]:  # fmt: skip
    """Run the model with TFLite Micro on validation images: op support, minimum arena, LiteRT parity."""
    from edgetl.data.heldout import evaluation_set
    from edgetl.package import tflm

    images, description, _, _ = evaluation_set(run_dir, manifest, None)
    pixels, labels = images.images[:max_images], images.labels[:max_images]
    report = tflm.check_model(run_dir / artifact, pixels, io, labels)
    problem = over("the TFLite Micro tensor arena", report.arena_bytes, target.constraints.max_arena_bytes)
    if problem:
        raise ConstraintViolated(f"{target.name}: {problem}")
    return {**report.to_dict(), "data": {**description, "count": len(pixels)}}
