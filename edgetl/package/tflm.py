"""Prove a full-integer model runs on TensorFlow Lite Micro, and measure the tensor arena it needs.

The ``tflite-micro`` Python package wraps the same C++ interpreter and reference kernels a firmware
build links, with TFLM's recording allocator. :func:`check_model`:

1. runs the model on validation images with a generous arena: every op must have a TFLM kernel
   (an op without one is named in the error), and the recording allocator reports the arena it used;
2. proves that figure is the minimum: one inference at exactly that size succeeds and one at 16 bytes
   less fails;
3. compares TFLM's outputs with LiteRT's on the same images (top-1 agreement, difference in output
   quantisation steps): with LiteRT's reference kernels TFLM must agree bit for bit (the same int8
   arithmetic); against LiteRT's default XNNPACK kernels, which the parity check used, the int8
   rounding differs a little and the difference is reported. With labels, TFLM's top-1 too.

Every TFLM call runs in a child process: an arena that is too small can crash the interpreter, and
TFLM prints its allocation report from C, not through Python.

The arena is measured on this 64-bit host. TFLM's per-tensor bookkeeping holds pointers, so on a
32-bit Cortex-M the same model needs a little less (a few KiB at most for MobileNetV2): the figure
is a safe upper bound for firmware.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError, TFLMUnsupported, require
from edgetl.runtime.model import integer_input
from edgetl.subproc import die_with_parent

ARENA_STEP = 16  # TFLM aligns arena allocations to 16 bytes
_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
_MISSING_OP = re.compile(r"(?:Failed to get registration from op code|Didn't find op for builtin opcode)\s+'?(\w+)")


@dataclass
class TFLMReport:
    version: str
    arena_bytes: int  # the minimum tensor arena, from TFLM's recording allocator
    arena_verified: bool  # ran at exactly arena_bytes, failed at arena_bytes - ARENA_STEP
    images: int
    top1: float | None  # TFLM's top-1 on the labels, when given
    compared: dict[str, dict[str, Any]]  # reference name -> agreement, max/mean abs diff in output steps
    invoke_ms_host: float  # median TFLM invoke on this host (reference kernels; not a device figure)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("tflite-micro")


def _worker(model: str, arena: int, inputs: str, outputs: str) -> int:
    """Child process: run every input through TFLM with ``arena`` bytes; save raw outputs and timings."""
    import time

    from tflite_micro.python.tflite_micro import runtime

    batch = np.load(inputs)
    interpreter = runtime.Interpreter.from_file(model, arena_size=arena)
    results, times = [], []
    for tensor in batch:
        interpreter.set_input(tensor[None], 0)
        start = time.perf_counter()
        interpreter.invoke()
        times.append(time.perf_counter() - start)
        results.append(np.array(interpreter.get_output(0))[0])
    np.save(outputs, np.stack(results))
    sys.stdout.flush()
    interpreter.print_allocations()  # C stdout: "Arena allocation total N bytes", ...
    print(json.dumps({"invoke_ms": 1000 * float(np.median(times))}), flush=True)
    return 0


def _run(model: Path, arena: int, batch: np.ndarray, workdir: Path) -> tuple[bool, str, np.ndarray | None]:
    """Run TFLM on ``batch`` in a child process: (succeeded, its output, raw outputs)."""
    inputs, outputs = workdir / "inputs.npy", workdir / "outputs.npy"
    np.save(inputs, batch)
    outputs.unlink(missing_ok=True)
    code = f"import sys; from edgetl.package.tflm import _worker; sys.exit(_worker({str(model)!r}, {arena}, {str(inputs)!r}, {str(outputs)!r}))"  # noqa: E501
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=die_with_parent())
    text = proc.stdout + proc.stderr
    ok = proc.returncode == 0 and outputs.is_file()
    return ok, text, np.load(outputs) if ok else None


def litert_outputs(model: str | Path, batch: np.ndarray, reference_kernels: bool) -> np.ndarray:
    """Raw outputs of LiteRT on prepared inputs: its reference kernels, or its default (XNNPACK) ones."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
    interpreter = Interpreter(model_path=str(model), experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    results = []
    for tensor in batch:
        interpreter.set_tensor(inp["index"], tensor[None])
        interpreter.invoke()
        results.append(interpreter.get_tensor(out["index"])[0].copy())
    return np.stack(results)


def compare_raw(ours: np.ndarray, reference: np.ndarray, labels: np.ndarray | None = None) -> dict[str, Any]:
    """TFLM's raw outputs against another runtime's: top-1 agreement, differences in output steps."""
    steps = np.abs(ours.astype(np.int64) - reference.astype(np.int64))
    return {
        "agreement": float(np.mean(ours.argmax(1) == reference.argmax(1))),
        "max_abs_diff_steps": int(steps.max()),
        "mean_abs_diff_steps": float(steps.mean()),
        "reference_top1": None if labels is None else float(np.mean(reference.argmax(1) == labels)),
    }


def check_model(model: str | Path, pixels: np.ndarray, io: dict[str, Any] | None = None,
                labels: np.ndarray | None = None, compare_litert: bool = True) -> TFLMReport:  # fmt: skip
    """Run ``model`` with TFLite Micro on ``pixels`` (uint8 ``[N, H, W, 3]``) and measure its arena.

    Args:
        model: a full-integer .tflite file.
        pixels: the images, already at the model's input size.
        io: the model's ``{"input": spec, "output": spec}`` as recorded in the manifest.
        labels: the images' classes, for TFLM's top-1.
        compare_litert: also run LiteRT (reference and default kernels) on the same inputs and compare.

    Raises:
        MissingDependencyError: tflite-micro is not installed.
        TFLMUnsupported: an op has no TFLM kernel, or the model does not run at all.
    """
    require("tflite_micro", "mcu", import_it=False)
    model = Path(model).resolve()
    io = io or {}
    dtype = io.get("input", {}).get("dtype", "uint8")
    if dtype not in ("uint8", "int8"):
        raise ValueError(f"TFLite Micro check needs a uint8 or int8 input, the model takes {dtype}")
    batch = integer_input(pixels, dtype)
    generous = max(64 << 20, 10 * model.stat().st_size)
    with tempfile.TemporaryDirectory(prefix="edgetl-tflm-") as tmp:
        workdir = Path(tmp)
        ok, text, raw = _run(model, generous, batch, workdir)
        if not ok:
            missing = sorted(set(_MISSING_OP.findall(text)))
            if missing:
                raise TFLMUnsupported(
                    f"TFLite Micro has no kernel for {', '.join(missing)} in {model.name}",
                    hint="a TFLM microcontroller cannot run this op; change the model",
                )
            last = [line for line in text.strip().splitlines() if line.strip()][-1:] or ["no output"]
            raise TFLMUnsupported(f"TFLite Micro could not run {model.name}: {last[0]}")
        total = _TOTAL.search(text)
        if total is None:
            raise EdgetlError("TFLite Micro did not report its arena use (unexpected tflite-micro version?)")
        arena = int(total.group(1))
        invoke_ms = json.loads(re.search(r'^\{"invoke_ms".*$', text, re.M).group(0))["invoke_ms"]
        fits, _, _ = _run(model, arena, batch[:1], workdir)
        short, _, _ = _run(model, arena - ARENA_STEP, batch[:1], workdir)
    labels = None if labels is None else np.asarray(labels)[: len(batch)]
    compared = {}
    if compare_litert:
        for name, reference_kernels in (("litert_reference_kernels", True), ("litert_default_kernels", False)):
            compared[name] = compare_raw(raw, litert_outputs(model, batch, reference_kernels), labels)
    return TFLMReport(
        version=version(),
        arena_bytes=arena,
        arena_verified=bool(fits and not short),
        images=len(batch),
        top1=None if labels is None else float(np.mean(raw.argmax(1) == labels)),
        compared=compared,
        invoke_ms_host=invoke_ms,
    )
