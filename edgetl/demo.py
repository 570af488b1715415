"""``edgetl demo``: the whole pipeline on an embedded default, small enough for a laptop CPU.

Generates the shapes dataset (:mod:`edgetl.data.synthetic`) unless a folder is given, resolves ImageNet
weights if it can (else says loudly that it trains from scratch, and why), fine-tunes, exports to
ONNX / TFLite float32 / int8, checks parity, packages a bundle for ``rpi4-cpu-96`` and classifies a
few held-out images with the bundle through the device runtime.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.config import FinetuneConfig
from edgetl.errors import EdgetlError, ExitCode, WeightsError

log = logging.getLogger(__name__)

# CPU-friendly settings: finishes in a few minutes on two cores.
DEMO_TARGET = "rpi4-cpu-96"
DEMO_DATA = {"per_class": 100, "test_per_class": 20, "size": 96}
DEMO_CONFIG = {
    "head_epochs": 3,
    "finetune_epochs": 4,
    "batch_size": 32,
    "patience": 2,
    "lr": 2e-3,
    "finetune_lr": 5e-4,
}


@dataclass
class DemoResult:
    data: Path
    run_dir: Path
    weights: str
    finetune: dict[str, Any]
    export: dict[str, Any] | None = None
    bundle: dict[str, Any] | None = None
    predictions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "run_dir": str(self.run_dir),
            "weights": self.weights,
            "finetune": self.finetune,
            "export": self.export,
            "bundle": self.bundle,
            "predictions": self.predictions,
            "notes": self.notes,
        }

    @property
    def exit_code(self) -> ExitCode:
        """3 when an export failed parity (the bundle is then not made)."""
        failed = self.export is not None and not self.export["parity_passed"]
        return ExitCode.PARITY_FAILED if failed else ExitCode.OK


def resolve_demo_weights(candidate: str | None) -> tuple[str, str | None]:
    """Return (weights, note): the candidate if it can be loaded, else "none" and why."""
    from edgetl.train.model import EdgeClassifier, load_initial_weights

    candidate = candidate or "imagenet"
    if candidate == "none":
        return "none", None
    try:
        load_initial_weights(EdgeClassifier(2), candidate, 1.0)
        return candidate, None
    except WeightsError as exc:
        note = (
            f"TRAINING FROM SCRATCH: ImageNet weights unavailable ({exc.message}). "
            "Set EDGETL_WEIGHTS=PATH to a MobileNetV2 state_dict for a much better model."
        )
        log.warning(note)
        return "none", note


def run_demo(
    out_dir: str | Path, data: str | None = None, weights: str | None = None, with_export: bool = True
) -> DemoResult:
    """Generate data if needed, fine-tune, and return where everything went.

    A previous demo run in ``out_dir`` is replaced (its dataset is reused when unchanged).
    """
    import shutil

    from edgetl.data import synthetic as synth
    from edgetl.train.finetune import finetune

    out_dir = Path(out_dir)
    data_dir = Path(data) if data else synth.generate(out_dir / "data", **DEMO_DATA)
    weights, note = resolve_demo_weights(weights)
    run_dir = out_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    from edgetl.targets import load_target

    target = load_target(DEMO_TARGET)
    # Precedence: defaults < target < the demo's own settings.
    cfg = FinetuneConfig.build({"image_size": target.input.size}, DEMO_CONFIG, {"weights": weights})
    result = finetune(data_dir, run_dir, cfg)
    notes = [note] if note else []
    exported = None
    if not with_export:
        notes.append("export skipped (--no-export)")
    elif importlib.util.find_spec("tensorflow") is None:
        notes.append('export skipped: pip install "edgetl[export]" for ONNX / TFLite export and parity')
    else:
        from edgetl.config import export_config
        from edgetl.pipeline import export_and_check

        # gated as `edgetl export --target` gates: with the thresholds of the target it packages for
        cfg = export_config(target, int8=True, max_drop=None, min_agreement=None)
        exported = export_and_check(run_dir, cfg).to_dict()
    bundle, predictions = None, []
    if exported and exported["parity_passed"]:
        packaged = _package(run_dir, target, notes)
        bundle = packaged.to_dict()
        predictions = _classify_with_bundle(packaged.bundle_dir, data_dir)
    elif exported:
        notes.append("not packaged: an artifact failed parity (see parity.md)")
    from edgetl.report import write_report

    notes.append(f"the run on one page: {write_report(run_dir)}")
    return DemoResult(
        data=data_dir,
        run_dir=run_dir,
        weights=weights,
        finetune=result.to_dict(),
        export=exported,
        bundle=bundle,
        predictions=predictions,
        notes=notes,
    )


def _package(run_dir: Path, target: Any, notes: list[str]) -> Any:
    """Package for the demo's Pi target, checked on its emulated CPU where qemu-user and the package
    registries are at hand; where they are not, packaged without (and the notes say why)."""
    from edgetl.errors import MissingDependencyError
    from edgetl.ontarget.userland import SetupError
    from edgetl.pipeline import package_verified

    try:
        return package_verified(run_dir, target)
    except (MissingDependencyError, SetupError) as exc:
        notes.append(f"not checked on the emulated Pi: {exc.message}" + (f" ({exc.hint})" if exc.hint else ""))
        return package_verified(run_dir, target, on_target=False)


def _classify_with_bundle(bundle_dir: Path, data_dir: Path, per_class: int = 1) -> list[dict[str, Any]]:
    """Classify a few held-out images exactly as the device would: the bundle's own runtime copy."""
    import json
    import subprocess
    import sys

    from edgetl.subproc import die_with_parent

    test_root = data_dir / "test" if (data_dir / "test").is_dir() else data_dir
    images = [sorted(d.glob("*"))[0].resolve() for d in sorted(test_root.iterdir()) if d.is_dir()][: 5 * per_class]
    proc = subprocess.run(
        [sys.executable, "-m", "edgetl_runtime", ".", *map(str, images), "--json", "--top-k", "1"],
        cwd=bundle_dir, capture_output=True, text=True, check=False, preexec_fn=die_with_parent(),
    )  # fmt: skip
    if proc.returncode != 0:
        raise EdgetlError(f"the bundle's runtime failed: {proc.stderr.strip().splitlines()[-1][:300]}")
    out = []
    for line in proc.stdout.splitlines():
        row = json.loads(line)
        out.append({"source": row["source"], "true": Path(row["source"]).parent.name,
                    "label": row["top"][0]["label"], "score": row["top"][0]["score"],
                    "latency_ms": row["latency_ms"]})  # fmt: skip
    return out
