"""What a run must pass before it is packaged for a target: an artifact that is whole and untampered,
fits the target's limits, passed parity by the target's thresholds on enough evidence, and (after an
accelerator compiler) runs on the accelerator."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgetl.check.parity import weaker_evidence
from edgetl.config import Thresholds
from edgetl.errors import ConstraintViolated, OpsOnCPU, ParityRefused, RunDirError
from edgetl.rundir import MODEL, QAT_WEIGHTS, verify_files
from edgetl.runtime.modelfile import ModelFileError, check_tflite_bytes
from edgetl.targets import Target


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
    thresholds = Thresholds(max_drop=target.parity.max_drop, min_agreement=target.parity.min_agreement)
    passed = metrics["passed"] and thresholds.passes(metrics)
    metrics.update(
        passed_for_target=bool(passed),
        target_thresholds={"max_drop": target.parity.max_drop, "min_agreement": target.parity.min_agreement},
        data=check.get("data"),
        thresholds=check.get("thresholds"),
        evidence_problems=evidence_problems(manifest, target),
        failed_before=failed_before(manifest, artifact, target, int((check.get("data") or {}).get("count", 0))),
    )
    return bool(passed), metrics


def failed_before(manifest: dict[str, Any], artifact: str, target: Target, count: int) -> list[dict[str, Any]]:
    """The recorded verdicts on these exact bytes of ``artifact`` that fail the target's thresholds on at
    least ``count`` images (the shipping verdict's): evidence at least as strong that it fails, which no
    waiver can overrule (:func:`edgetl.check.parity.verdict_history`)."""
    sha256 = (manifest["files"].get(artifact) or {}).get("sha256")
    thresholds = Thresholds(max_drop=target.parity.max_drop, min_agreement=target.parity.min_agreement)
    found = []
    history = manifest.get("parity_history")
    for item in history if isinstance(history, list) else []:
        measured = (item.get("artifacts") or {}).get(artifact) if isinstance(item, dict) else None
        if not _is_verdict(measured) or measured["sha256"] != sha256 or thresholds.passes(measured):
            continue
        data = item.get("data") if isinstance(item.get("data"), dict) else {}
        if isinstance(data.get("count"), int) and data["count"] >= count:
            found.append({"checked_at": item.get("checked_at"), "source": data.get("source"),
                          "root": data.get("root"), "count": data.get("count"), "top1": measured["top1"],
                          "delta_top1_pp": measured["delta_top1_pp"], "agreement": measured["agreement"]})  # fmt: skip
    return found


def _is_verdict(measured: Any) -> bool:
    return isinstance(measured, dict) and isinstance(measured.get("sha256"), str) and all(
        isinstance(measured.get(key), (int, float)) for key in ("top1", "delta_top1_pp", "agreement")
    )


def describe_failure(item: dict[str, Any]) -> str:
    """One failed verdict in a line: where, how many images, Δtop-1 and agreement."""
    where = item.get("source") or "?"
    if item.get("source") == "folder" and item.get("root"):
        where = f"folder {item['root']}"
    return (f"{item['count']} images of the {where} at {item.get('checked_at') or '?'}: "
            f"top-1 Δ {item['delta_top1_pp']:+.2f} pp, agreement {100 * item['agreement']:.2f}%")


def evidence_problems(manifest: dict[str, Any], target: Target) -> list[str]:
    """How the recorded verdict's evidence falls short: fewer images than the target's
    ``parity.min_images`` (or than the run's whole validation split, when that is smaller), or weaker
    than the export's own check (fewer images, looser thresholds). Empty: good enough to ship on."""
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
    too_big = None if size is None else over(artifact, size, target.constraints.max_model_bytes)
    if too_big:
        problems.append(too_big)
    shape = spec["input"]["shape"]
    side = shape[2] if target.input.layout == "NCHW" else shape[1]
    if side not in target.input.accepted:
        need, other = target.input.size, [n for n in target.input.accepted if n != target.input.size]
        also = f" (or {', '.join(f'{n}x{n}' for n in other)})" if other else ""
        problems.append(f"model input is {side}x{side}, the target needs {need}x{need}{also}")
    if spec["input"]["dtype"] != target.input.dtype:
        problems.append(f"model input dtype is {spec['input']['dtype']}, the target needs {target.input.dtype}")
    if target.precision == "int8" and spec["output"]["dtype"] != target.quantization.output_dtype:
        problems.append(f"model output dtype is {spec['output']['dtype']}, the target needs "
                        f"{target.quantization.output_dtype} (export with --target {target.name})")  # fmt: skip
    if target.constraints.static_shapes and any(not isinstance(d, int) or d <= 0 for d in shape):
        problems.append(f"model input shape {shape} is not static")
    if shape[0] != target.constraints.batch:
        problems.append(f"model batch is {shape[0]}, the target needs {target.constraints.batch}")
    return problems


def judge_parity(manifest: dict[str, Any], artifact: str, target: Target, force: bool,
                  accept_weak_parity: bool) -> tuple[bool, dict[str, Any]]:  # fmt: skip
    """The verdict package ships on; refuses a failed or weakly evidenced one unless told otherwise.
    Returns (whether ``force`` overrode a failure, the verdict as the bundle records it).

    Raises:
        ParityRefused: failed parity (unless ``force``), or too little evidence (unless
            ``accept_weak_parity`` or ``force``; the waiver is recorded as ``evidence_waived``).
    """
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
    failures = parity.pop("failed_before", [])
    if failures:
        parity["failed_verdicts"] = [describe_failure(item) for item in failures]
    if passed and failures and not force:
        raise ParityRefused(
            f"{artifact} failed parity for {target.name} on {describe_failure(failures[-1])}; the later check "
            f"on {parity['data']['count']} images cannot overrule it (--accept-weak-parity waives too few "
            "images, never a failed verdict on as many or more)",
            hint="fix the model (edgetl export's remedies, edgetl qat) and check again; --force packages it "
                 "anyway and records the failure in the bundle",
        )  # fmt: skip
    if passed and problems and not (accept_weak_parity or force):
        raise ParityRefused(
            f"the parity verdict for {artifact} is too weak to ship on: {'; '.join(problems)}",
            hint="run edgetl check on the validation split or a larger --data folder; --accept-weak-parity "
                 "packages anyway and records that in the bundle",
        )  # fmt: skip
    if problems:
        parity["evidence_waived"] = "; ".join(problems)
    return bool(force and (not passed or failures)), parity


def refuse_fallback(cpu_ops: int, total: int | None, where: str, ops: str, target: Target,
                     allow_cpu_ops: bool) -> None:  # fmt: skip
    """Raise OpsOnCPU when more operations than the target allows stay on the CPU."""
    allowed = target.compile.max_cpu_ops
    if cpu_ops <= allowed or allow_cpu_ops or target.compile.allow_cpu_ops:
        return
    allowance = f" (the target allows {allowed})" if allowed else ""
    raise OpsOnCPU(
        f"{cpu_ops} of {total} operations would run on the CPU, not {where}{allowance}: {ops or 'see the log'}",
        hint="change the model, or package with --allow-cpu-ops to accept the fallback",
    )


def over(what: str, used: int, limit: int | None) -> str | None:
    if limit is None or used <= limit:
        return None
    return f"{what} is {used:,} bytes, {used - limit:,} over the target's {limit:,}"


def trusted_model(run_dir: Path, manifest: dict[str, Any], target: Target, compiled_later: bool) -> bytes:
    """The artifact the target ships, after every check that needs no compiler: it exists, nothing the
    bundle takes differs from the manifest, it is a whole model, and it fits the target.

    Raises:
        RunDirError: not exported for this target, tampered with, or not a whole model.
        ConstraintViolated: it breaks a target limit (size unless ``compiled_later``, input, batch).
    """
    artifact = target.artifact
    if artifact not in manifest["files"] or "export" not in manifest["stages"]:
        raise RunDirError(f"{run_dir} has no {artifact}, which {target.name} ships",
                          hint=f"run: edgetl export {run_dir} --target {target.name}")  # fmt: skip
    trusted = (artifact, "labels.txt", MODEL, QAT_WEIGHTS)
    tampered = [n for n in verify_files(run_dir, manifest) if n in trusted]
    if tampered:
        raise RunDirError(f"{', '.join(tampered)} in {run_dir} differ from the manifest's sha256")
    model_bytes = (run_dir / artifact).read_bytes()
    if artifact.endswith(".tflite"):
        try:
            check_tflite_bytes(model_bytes, str(run_dir / artifact))
        except ModelFileError as exc:
            raise RunDirError(str(exc), hint=f"export the run again: edgetl export {run_dir}") from None
    problems = check_constraints(manifest, artifact, target, None if compiled_later else len(model_bytes))
    if problems:
        more = f" (+{len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise ConstraintViolated(f"{target.name}: {problems[0]}{more}")
    return model_bytes
