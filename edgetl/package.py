"""Package a checked run for a target: a verified, self-describing, reproducible bundle.

The bundle folder holds the target's artifact, ``labels.txt``, ``manifest.json`` (schema version,
edgetl version, target, preprocessing and I/O spec, every file's sha256 and size, parity, calibration
hash, training summary, tool versions), the device runtime (``edgetl_runtime/``, copied as is),
``requirements-device.txt`` and ``README.txt``. The ``.tar.gz`` beside it is byte-for-byte
reproducible: sorted entries, fixed mtime (``SOURCE_DATE_EPOCH`` or 1980-01-01), owner 0/0, fixed
modes, and a gzip header without a timestamp or file name.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgetl import __version__
from edgetl.artifacts import MODEL, QAT_WEIGHTS, atomic_path, dumps_json, read_manifest, run_lock, verify_files
from edgetl.errors import EdgetlError, ExitCode, RunDirError
from edgetl.targets import Target

RUNTIME_DIR = "edgetl_runtime"
DEFAULT_EPOCH = 315532800  # 1980-01-01T00:00:00Z, the earliest time a zip can hold too


class ParityRefused(EdgetlError):
    exit_code = ExitCode.PARITY_FAILED


class ConstraintViolated(EdgetlError):
    exit_code = ExitCode.CONSTRAINT_VIOLATED


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
        }


def source_date_epoch() -> int:
    value = os.environ.get("SOURCE_DATE_EPOCH")
    if value is None:
        return DEFAULT_EPOCH
    try:
        return int(value)
    except ValueError:
        raise EdgetlError(f"SOURCE_DATE_EPOCH must be an integer, got {value!r}") from None


def parity_verdict(manifest: dict[str, Any], artifact: str, target: Target) -> tuple[bool, dict[str, Any]]:
    """Whether ``artifact`` passed parity, judged by the target's own thresholds on the recorded metrics.

    The metrics also carry the evidence they stand on (``data``: source, image count, content sha256;
    ``thresholds``) and, under ``evidence_problems``, how that evidence falls short of what the target
    requires (:func:`evidence_problems`).
    """
    check = manifest["stages"].get("check")
    if check is None or artifact not in check.get("artifacts", {}):
        return False, {"reason": "not checked"}
    metrics = dict(check["artifacts"][artifact])
    from edgetl.parity import Thresholds

    thresholds = Thresholds(max_drop=target.parity.max_drop, min_agreement=target.parity.min_agreement)
    passed = metrics["passed"] and thresholds.passes(metrics)
    metrics.update(
        passed_for_target=bool(passed),
        target_thresholds={"max_drop": target.parity.max_drop, "min_agreement": target.parity.min_agreement},
        data=check.get("data"),
        thresholds=check.get("thresholds"),
        evidence_problems=evidence_problems(manifest, target),
    )
    return bool(passed), metrics


def evidence_problems(manifest: dict[str, Any], target: Target) -> list[str]:
    """How the recorded verdict's evidence falls short: fewer images than the target's
    ``parity.min_images`` (or than the run's whole validation split, when that is smaller), or weaker
    than the export's own check (fewer images, looser thresholds). Empty: good enough to ship on."""
    from edgetl.parity import weaker_evidence

    check = manifest["stages"]["check"]
    data = check.get("data") or {}
    count = int(data.get("count", 0))
    val_count = (manifest["stages"].get("finetune", {}).get("counts") or {}).get("val")
    needed = min(target.parity.min_images, val_count) if val_count else target.parity.min_images
    problems = []
    if count < needed:
        problems.append(f"the verdict rests on {count} images, {target.name} needs at least {needed}")
    exported = manifest["stages"].get("export", {}).get("parity_evidence")
    evidence = {"data": data, "thresholds": check.get("thresholds") or {}}
    if exported and evidence["thresholds"]:
        problems += weaker_evidence(evidence, exported)
    return problems


def check_constraints(manifest: dict[str, Any], artifact: str, target: Target, size: int | None) -> list[str]:
    """Every way the artifact breaks the target's limits (empty: it fits); ``size=None`` skips the size."""
    problems = []
    spec = manifest["stages"]["export"]["artifacts"][artifact]
    too_big = None if size is None else _over(artifact, size, target.constraints.max_model_bytes)
    if too_big:
        problems.append(too_big)
    shape = spec["input"]["shape"]
    side = shape[2] if target.input.layout == "NCHW" else shape[1]
    if side != target.input.size:
        need = target.input.size
        problems.append(f"model input is {side}x{side}, the target needs {need}x{need}")
    if spec["input"]["dtype"] != target.input.dtype:
        problems.append(f"model input dtype is {spec['input']['dtype']}, the target needs {target.input.dtype}")
    if target.constraints.static_shapes and any(not isinstance(d, int) or d <= 0 for d in shape):
        problems.append(f"model input shape {shape} is not static")
    if shape[0] != target.constraints.batch:
        problems.append(f"model batch is {shape[0]}, the target needs {target.constraints.batch}")
    return problems


def runtime_files() -> dict[str, bytes]:
    """The device runtime's sources, as they will sit in the bundle."""
    source = Path(__file__).resolve().parent / "runtime"
    return {f"{RUNTIME_DIR}/{p.name}": p.read_bytes() for p in sorted(source.glob("*.py"))}


def bundle_readme(name: str, target: Target, model: str, accelerator: dict[str, Any] | None = None,
                  tflm: dict[str, Any] | None = None) -> str:  # fmt: skip
    shape = f"input {target.input.size}x{target.input.size} RGB {target.input.dtype} {target.input.layout}"
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
) -> PackageResult:
    """Build the bundle folder and its reproducible ``.tar.gz``.

    Raises:
        RunDirError: nothing exported for this target's artifact, or run files differ from the manifest.
        ParityRefused: the artifact failed (or never had) the parity check, unless ``force``; or its
            verdict rests on weaker evidence than the target requires (too few images, weaker than
            the export's own check), unless ``accept_weak_parity`` (or ``force``), which the bundle
            manifest records as ``parity.evidence_waived``.
        ConstraintViolated: the model breaks a target limit (size, input, static shape, batch).
        MissingDependencyError: the target's compiler is not installed (``compile_model=False``
            ships the compile-ready model and a script instead).
        OpsOnCPU: the Edge TPU compiler or Vela left more operations on the CPU than the target
            allows, unless ``allow_cpu_ops``.
        ConstraintViolated: also when the compiled model, Vela's SRAM use or the TFLM arena exceed
            the target's budgets (the message says by how much).
        TFLMUnsupported: TFLite Micro cannot run the model (``check_tflm=False`` skips that run).
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    artifact = target.artifact
    if artifact not in manifest["files"] or "export" not in manifest["stages"]:
        raise RunDirError(
            f"{run_dir} has no {artifact}, which {target.name} ships",
            hint=f"run: edgetl export {run_dir} --target {target.name}",
        )
    trusted = (artifact, "labels.txt", MODEL, QAT_WEIGHTS)
    tampered = [n for n in verify_files(run_dir, manifest) if n in trusted]
    if tampered:
        raise RunDirError(f"{', '.join(tampered)} in {run_dir} differ from the manifest's sha256")
    model_bytes = (run_dir / artifact).read_bytes()
    if artifact.endswith(".tflite"):
        from edgetl.runtime.modelfile import ModelFileError, check_tflite_bytes

        try:
            check_tflite_bytes(model_bytes, str(run_dir / artifact))
        except ModelFileError as exc:
            raise RunDirError(str(exc), hint=f"export the run again: edgetl export {run_dir}") from None
    compiled_later = target.compile.tool == "vela" and compile_model  # Vela's output is what must fit
    problems = check_constraints(manifest, artifact, target, None if compiled_later else len(model_bytes))
    if problems:
        more = f" (+{len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ConstraintViolated(f"{target.name}: {problems[0]}{more}")

    passed, parity = _judge_parity(manifest, artifact, target, force, accept_weak_parity)
    finetune = manifest["stages"]["finetune"]
    export = manifest["stages"]["export"]
    contents: dict[str, bytes] = {
        artifact: model_bytes,
        "labels.txt": (run_dir / "labels.txt").read_bytes(),
        "requirements-device.txt": "".join(f"{r}\n" for r in target.device.requirements).encode(),
        **runtime_files(),
    }
    accelerator = tflm = None
    firmware_model = artifact  # what a TFLM firmware compiles in
    if target.compile.tool == "edgetpu_compiler":
        accelerator = _edgetpu(run_dir, artifact, target, contents, compile_model, allow_cpu_ops)
    elif target.compile.tool == "vela":
        accelerator = _vela(run_dir, artifact, target, contents, compile_model, allow_cpu_ops)
        firmware_model = accelerator.get("model", artifact)
    io = {key: export["artifacts"][artifact][key] for key in ("input", "output")}
    if target.runtime == "tflm" and target.compile.tool == "":  # the Cortex-M runs every op itself
        tflm = _tflm(run_dir, manifest, artifact, io, target) if check_tflm else None
    if target.runtime == "tflm":  # firmware compiles the model in: C array + header
        from edgetl.c_array import c_sources

        labels = (run_dir / "labels.txt").read_text().splitlines()
        header, source = c_sources(contents[firmware_model], io, labels, name="edgetl_model")
        contents["edgetl_model_data.h"], contents["edgetl_model_data.c"] = header.encode(), source.encode()
    name = f"{run_dir.resolve().name}-{target.name}"
    contents["README.txt"] = bundle_readme(name, target, artifact, accelerator, tflm).encode()
    files = {rel: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
             for rel, data in sorted(contents.items())}  # fmt: skip
    bundle_manifest = {
        "kind": "edgetl-bundle",
        "schema_version": 1,
        "edgetl_version": __version__,
        "name": name,
        "model": artifact,
        "num_classes": finetune["arch"]["num_classes"],
        "target": target.to_dict(),
        "preprocess": finetune["preprocess"],
        "io": io,
        "files": files,
        "parity": parity,
        "forced": bool(force and not passed),
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
            "run_model_sha256": manifest["files"]["model.pt"]["sha256"],
            # a QAT run's quantised models come from these weights (edgetl.qat)
            "qat_weights_sha256": manifest["files"].get(QAT_WEIGHTS, {}).get("sha256"),
        },
        "versions": {**finetune.get("versions", {}), **export.get("versions", {})},
    }
    contents["manifest.json"] = dumps_json(bundle_manifest).encode()

    out = Path(out) if out is not None else run_dir / "bundles"
    bundle_dir = out / name
    archive = out / f"{name}.tar.gz"
    data = _reproducible_targz(name, contents, source_date_epoch())
    with run_lock(out, "package"):  # two packagers of one bundle would swap folders under each other
        _write_dir(bundle_dir, contents)
        with atomic_path(archive) as tmp:
            tmp.write_bytes(data)
    return PackageResult(
        bundle_dir=bundle_dir,
        archive=archive,
        archive_sha256=hashlib.sha256(data).hexdigest(),
        target=target.name,
        files=files,
        forced=bundle_manifest["forced"],
        parity=parity,
        accelerator=accelerator,
        tflm=tflm,
    )


def _judge_parity(manifest: dict[str, Any], artifact: str, target: Target, force: bool,
                  accept_weak_parity: bool) -> tuple[bool, dict[str, Any]]:  # fmt: skip
    """The verdict package ships on; refuses a failed or weakly evidenced one unless told otherwise."""
    passed, parity = parity_verdict(manifest, artifact, target)
    if not passed and not force:
        reason = parity.get("reason") or (
            f"top-1 Δ {parity['delta_top1_pp']:+.2f} pp, agreement {100 * parity['agreement']:.2f}% "
            f"(target: ≥ -{target.parity.max_drop} pp, ≥ {100 * target.parity.min_agreement:.1f}%)"
        )
        raise ParityRefused(
            f"{artifact} failed parity for {target.name}: {reason}",
            hint="see parity.md; --force packages it anyway and records that in the manifest",
        )
    problems = parity.pop("evidence_problems", [])
    if passed and problems and not (accept_weak_parity or force):
        raise ParityRefused(
            f"the parity verdict for {artifact} is too weak to ship on: {'; '.join(problems)}",
            hint="run edgetl check on the validation split or a larger --data folder; --accept-weak-parity "
                 "packages anyway and records that in the bundle",
        )  # fmt: skip
    if problems:
        parity["evidence_waived"] = "; ".join(problems)
    return passed, parity


def _edgetpu(run_dir: Path, artifact: str, target: Target, contents: dict[str, bytes], compile_model: bool,
             allow_cpu_ops: bool) -> dict[str, Any]:  # fmt: skip
    """Compile for the Edge TPU into ``contents`` (or add the script to do it elsewhere)."""
    from edgetl.edgetpu import COMPILER, compile_script
    from edgetl.edgetpu import compile_model as run_compiler

    if not compile_model:
        contents["compile_edgetpu.sh"] = compile_script(artifact, target.compile.args).encode()
        return {"tool": COMPILER, "compiled": False, "script": "compile_edgetpu.sh"}
    with tempfile.TemporaryDirectory() as tmp:
        compiled, log_text, report = run_compiler(run_dir / artifact, Path(tmp), target.compile.args)
        ops = ", ".join(f"{r['op']} x{r['count']} ({r['status']})" for r in report.cpu_operations)
        _refuse_fallback(report.cpu_ops or 0, report.total_ops, "the Edge TPU", ops, target, allow_cpu_ops)
        contents[compiled.name] = compiled.read_bytes()
        contents["edgetpu_compiler.log"] = log_text.encode()
    return {"tool": COMPILER, "compiled": True, "model": compiled.name, **report.to_dict()}


def _refuse_fallback(cpu_ops: int, total: int | None, where: str, ops: str, target: Target,
                     allow_cpu_ops: bool) -> None:  # fmt: skip
    """Raise OpsOnCPU when more operations than the target allows stay on the CPU."""
    from edgetl.errors import OpsOnCPU

    allowed = target.compile.max_cpu_ops
    if cpu_ops <= allowed or allow_cpu_ops or target.compile.allow_cpu_ops:
        return
    allowance = f" (the target allows {allowed})" if allowed else ""
    raise OpsOnCPU(
        f"{cpu_ops} of {total} operations would run on the CPU, not {where}{allowance}: {ops or 'see the log'}",
        hint="change the model, or package with --allow-cpu-ops to accept the fallback",
    )


def _over(what: str, used: int, limit: int | None) -> str | None:
    if limit is None or used <= limit:
        return None
    return f"{what} is {used:,} bytes, {used - limit:,} over the target's {limit:,}"


def _vela(run_dir: Path, artifact: str, target: Target, contents: dict[str, bytes], compile_model: bool,
          allow_cpu_ops: bool) -> dict[str, Any]:  # fmt: skip
    """Compile for the Ethos-U NPU with Vela into ``contents`` (or add the script to do it elsewhere)."""
    from edgetl import vela

    if not compile_model:
        contents["compile_vela.sh"] = vela.compile_script(artifact, target.compile.args).encode()
        return {"tool": "vela", "compiled": False, "script": "compile_vela.sh"}
    with tempfile.TemporaryDirectory(prefix="edgetl-vela-") as tmp:
        compiled, log_text, summary, report = vela.compile_model(run_dir / artifact, Path(tmp), target.compile.args)
        ops = ", ".join(f"{r['tensor']}" + (f" ({r['op']}: {r['reason']})" if r["reason"] else "")
                        for r in report.cpu_operations[:5]) + (", ..." if len(report.cpu_operations) > 5 else "")
        _refuse_fallback(report.cpu_ops, report.npu_ops + report.cpu_ops, "the NPU", ops, target, allow_cpu_ops)
        size = compiled.stat().st_size
        problems = [p for p in (
            _over(f"{compiled.name}", size, target.constraints.max_model_bytes),
            _over(f"Vela's SRAM use ({report.accelerator}, {report.memory_mode})", report.sram_bytes,
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
    from edgetl import tflm
    from edgetl.parity import evaluation_set

    images, description, _, _ = evaluation_set(run_dir, manifest, None)
    pixels, labels = images.images[:max_images], images.labels[:max_images]
    report = tflm.check_model(run_dir / artifact, pixels, io, labels)
    problem = _over("the TFLite Micro tensor arena", report.arena_bytes, target.constraints.max_arena_bytes)
    if problem:
        raise ConstraintViolated(f"{target.name}: {problem}")
    return {**report.to_dict(), "data": {**description, "count": len(pixels)}}


def _write_dir(bundle_dir: Path, contents: dict[str, bytes]) -> None:
    """Write the folder beside its final place, then swap it in (never half a bundle)."""
    bundle_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in bundle_dir.parent.glob(f".{bundle_dir.name}.*"):  # a killed packager's (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{bundle_dir.name}.", dir=bundle_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle folder is for everyone to read
    try:
        for rel, data in contents.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        old = bundle_dir.with_name(f".{bundle_dir.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if bundle_dir.exists():
            bundle_dir.rename(old)
        tmp.rename(bundle_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _reproducible_targz(name: str, contents: dict[str, bytes], mtime: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directories = sorted({str(Path(name, rel).parent) for rel in contents} | {name})
        for directory in directories:
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            _normalise(info, mtime)
            tar.addfile(info)
        for rel in sorted(contents):
            info = tarfile.TarInfo(f"{name}/{rel}")
            info.size, info.mode = len(contents[rel]), 0o644
            _normalise(info, mtime)
            tar.addfile(info, io.BytesIO(contents[rel]))
    out = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=out, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return out.getvalue()


def _normalise(info: tarfile.TarInfo, mtime: int) -> None:
    info.mtime = mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.pax_headers = {}
