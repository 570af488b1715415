"""Compile a full-integer model for an Arm Ethos-U NPU with Vela, and read what it says.

Vela (``ethos-u-vela`` on PyPI) rewrites the .tflite so that everything the NPU supports becomes one
``ethos-u`` custom op with a command stream; what it cannot map stays as ordinary TFLite ops that
TFLite Micro runs on the Cortex-M, far slower. Its stdout says how many operators went where
(``CPU operators = 0 (0.0%)`` / ``NPU operators = 68 (100.0%)``; with ``--show-cpu-operations`` it
also names each fallback and the reason), and it writes a summary CSV with the memory use (KiB) and
the performance estimate (cycles, inference time) for the chosen accelerator and system config.
:func:`compile_model` runs it and turns both into a :class:`VelaReport` that packaging checks
against the target's allowance and budgets.
"""

from __future__ import annotations

import csv
import io
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import VelaFailed, require
from edgetl.subproc import die_with_parent

CONFIG = "Arm/vela.ini"  # the system configs shipped with Vela (Ethos_U55_High_End_Embedded, ...)
_WARNING = re.compile(r"^Warning \(supported operators\) operator: (\w+), ofm: '([^']*)'\s*\nReason: (.+)$", re.M)
_CPU_OP = re.compile(r"^\s+CPU: \w+ = (.+?) \(outputs (\[[^\]]*\])\)\s*$", re.M)


@dataclass
class VelaReport:
    vela_version: str
    accelerator: str  # e.g. "Ethos_U55_128"
    system_config: str
    memory_mode: str
    clock_hz: float
    npu_ops: int
    cpu_ops: int
    sram_bytes: int  # feature maps (and, in Dedicated_Sram mode, the arena cache) in SRAM
    flash_bytes: int  # on- plus off-chip flash: weights and the command stream
    dram_bytes: int
    inference_time_s: float  # Vela's estimate for one inference (batch 1)
    cycles_total: int
    cycles_npu: int
    macs: int
    weights_original_bytes: int
    weights_encoded_bytes: int
    cpu_operations: list[dict[str, Any]] = field(default_factory=list)  # {"tensor", "shape", "op", "reason"}

    @property
    def npu_fraction(self) -> float | None:
        total = self.npu_ops + self.cpu_ops
        return self.npu_ops / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "npu_fraction": self.npu_fraction}


def version() -> str:
    import importlib.metadata

    return importlib.metadata.version("ethos-u-vela")


def parse(stdout: str, summary_csv: str, vela_version: str = "") -> VelaReport:
    """Parse Vela's stdout (operator counts, CPU fallbacks) and its summary CSV (memory, performance)."""
    rows = list(csv.DictReader(io.StringIO(summary_csv)))
    if len(rows) != 1:
        raise ValueError(f"expected one network in Vela's summary CSV, got {len(rows)}")
    row = rows[0]

    def count(kind: str) -> int:
        match = re.search(rf"^{kind} operators = (\d+)", stdout, re.M)
        return int(match.group(1)) if match else 0

    def kib(*keys: str) -> int:
        return round(1024 * sum(float(row.get(k) or 0) for k in keys))

    # "--show-cpu-operations" names every fallback; a "Warning (supported operators)" says why (ops
    # that --ignore-ops sends to the CPU get no warning).
    why = {m.group(2): (m.group(1), m.group(3).strip()) for m in _WARNING.finditer(stdout)}
    fallbacks = [{"tensor": m.group(1), "shape": m.group(2), "op": why.get(m.group(1), (None, None))[0],
                  "reason": why.get(m.group(1), (None, None))[1]} for m in _CPU_OP.finditer(stdout)]  # fmt: skip
    return VelaReport(
        vela_version=vela_version,
        accelerator=row["accelerator_configuration"],
        system_config=row["system_config"],
        memory_mode=row["memory_mode"],
        clock_hz=float(row["core_clock"]),
        npu_ops=count("NPU"),
        cpu_ops=count("CPU"),
        sram_bytes=kib("sram_memory_used"),
        flash_bytes=kib("on_chip_flash_memory_used", "off_chip_flash_memory_used"),
        dram_bytes=kib("dram_memory_used"),
        inference_time_s=float(row["inference_time"]),
        cycles_total=int(float(row["cycles_total"])),
        cycles_npu=int(float(row["cycles_npu"])),
        macs=int(float(row["nn_macs"])),
        weights_original_bytes=int(float(row["total_original_weights"])),
        weights_encoded_bytes=int(float(row["total_npu_encoded_weights"])),
        cpu_operations=fallbacks,
    )


def command(model: str, args: tuple[str, ...], output_dir: str = ".") -> list[str]:
    """Vela's arguments for ``model``: Vela's own config file when ``args`` name one of its system
    configs and no file of their own (Vela refuses a file without a system config)."""
    config = ("--config", CONFIG) if "--system-config" in args and "--config" not in args else ()
    return [*config, *args, "--show-cpu-operations", "--output-dir", output_dir, model]


def compile_script(model: str, args: tuple[str, ...]) -> str:
    """The compile step for a bundle packaged with --no-compile."""
    line = " ".join(["vela", *command(model, args)])
    return f'#!/bin/sh\n# Needs: pip install ethos-u-vela\nset -e\ncd "$(dirname "$0")"\n{line}\n'


def compile_model(model: Path, workdir: Path, args: tuple[str, ...]) -> tuple[Path, str, str, VelaReport]:
    """Run Vela on ``model`` into ``workdir``: (compiled model, log text, summary CSV text, report).

    Raises:
        MissingDependencyError: ethos-u-vela is not installed.
        VelaFailed: it ran and did not produce a model.
    """
    require("ethosu.vela", "mcu", import_it=False)
    code = "import sys; from ethosu.vela.vela import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code, *command(str(model), args, str(workdir))],
                          capture_output=True, text=True, preexec_fn=die_with_parent())  # fmt: skip
    text = proc.stdout + proc.stderr
    compiled = workdir / f"{model.stem}_vela.tflite"
    summaries = sorted(workdir.glob(f"{model.stem}_summary_*.csv"))
    if proc.returncode != 0 or not compiled.is_file() or len(summaries) != 1:
        last = [line for line in text.strip().splitlines() if line.strip()][-1:] or [f"exit code {proc.returncode}"]
        raise VelaFailed(f"vela failed on {model.name}: {last[0]}")
    summary = summaries[0].read_text()
    return compiled, text, summary, parse(text, summary, version())
