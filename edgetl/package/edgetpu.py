"""Compile a full-integer model with ``edgetpu_compiler`` and read what it says.

The compiler (x86-64 Linux only, from Coral's apt repository) prints a summary and an operation table:

    On-chip memory used for caching model parameters: 3.73MiB
    Off-chip memory used for streaming uncached model parameters: 0.00B
    Number of Edge TPU subgraphs: 1
    Total number of operations: 65
    Number of operations that will run on Edge TPU: 64        (only when some do not)
    Number of operations that will run on CPU: 1

    Operator                       Count      Status
    ADD                            10         Mapped to Edge TPU
    SOFTMAX                        1          More than one subgraph is not supported

Ops that are not mapped run on the host CPU, silently and slowly; :func:`parse_log` makes them a
number that packaging can refuse.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgetl.errors import CompilerFailed, MissingDependencyError
from edgetl.subproc import die_with_parent

COMPILER = "edgetpu_compiler"
MAPPED = "Mapped to Edge TPU"
INSTALL_HINT = (
    "install it on an x86-64 Linux host (Coral's apt repository: apt install edgetpu-compiler), "
    "or package with --no-compile and compile the bundle's model there"
)
_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


@dataclass
class EdgeTPUReport:
    compiled: bool
    error: str | None = None
    compiler_version: str | None = None
    on_chip_bytes: int | None = None
    on_chip_remaining_bytes: int | None = None
    off_chip_bytes: int | None = None
    subgraphs: int | None = None
    total_ops: int | None = None
    tpu_ops: int | None = None
    cpu_ops: int | None = None
    operations: list[dict[str, Any]] = field(default_factory=list)  # {"op", "count", "status"}

    @property
    def mapped_fraction(self) -> float | None:
        if not self.total_ops:
            return None
        return (self.tpu_ops or 0) / self.total_ops

    @property
    def cpu_operations(self) -> list[dict[str, Any]]:
        return [row for row in self.operations if row["status"] != MAPPED]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mapped_fraction": self.mapped_fraction}


def _bytes(text: str) -> int:
    match = re.fullmatch(r"([\d.]+)\s*(B|KiB|MiB|GiB)", text.strip())
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return round(float(match.group(1)) * _UNITS[match.group(2)])


def parse_log(text: str) -> EdgeTPUReport:
    """Parse edgetpu_compiler's stdout (its summary and operation table)."""
    version = re.search(r"Edge TPU Compiler version (\S+)", text)
    failed = re.search(r"^(?:ERROR: )?Compilation failed:?\s*(.*)$", text, re.M)
    if failed or "Model compiled successfully" not in text:
        reason = (failed.group(1).strip() if failed else "") or "no 'Model compiled successfully' in its output"
        return EdgeTPUReport(compiled=False, error=reason, compiler_version=version and version.group(1))

    def field_value(label: str) -> str | None:
        match = re.search(rf"^{re.escape(label)}:\s*(.+)$", text, re.M)
        return match.group(1).strip() if match else None

    operations = []
    table = re.search(r"^Operator\s+Count\s+Status\s*$(.*)", text, re.M | re.S)
    if table:
        for line in table.group(1).splitlines():
            row = re.match(r"^([A-Z][A-Z0-9_]*)\s+(\d+)\s+(\S.*?)\s*$", line)
            if row:
                operations.append({"op": row.group(1), "count": int(row.group(2)), "status": row.group(3)})
    total = field_value("Total number of operations")
    tpu, cpu = field_value("Number of operations that will run on Edge TPU"), field_value(
        "Number of operations that will run on CPU"
    )
    mapped = sum(r["count"] for r in operations if r["status"] == MAPPED)
    unmapped = sum(r["count"] for r in operations if r["status"] != MAPPED)
    sizes = {}
    for key, label in (
        ("on_chip_bytes", "On-chip memory used for caching model parameters"),
        ("on_chip_remaining_bytes", "On-chip memory remaining for caching model parameters"),
        ("off_chip_bytes", "Off-chip memory used for streaming uncached model parameters"),
    ):
        value = field_value(label)
        sizes[key] = _bytes(value) if value else None
    subgraphs = field_value("Number of Edge TPU subgraphs")
    return EdgeTPUReport(
        compiled=True,
        compiler_version=version and version.group(1),
        subgraphs=int(subgraphs) if subgraphs else None,
        total_ops=int(total) if total else (mapped + unmapped or None),
        tpu_ops=int(tpu) if tpu else mapped,
        cpu_ops=int(cpu) if cpu else unmapped,
        operations=operations,
        **sizes,
    )


def compile_script(model: str, args: tuple[str, ...]) -> str:
    """The one-line compile step for a bundle packaged with --no-compile."""
    return f"#!/bin/sh\n# Run on an x86-64 Linux host with edgetpu_compiler installed.\nset -e\ncd \"$(dirname \"$0\")\"\n{COMPILER} {' '.join(args)} -s -o . {model}\n"  # noqa: E501


def compile_model(model: Path, workdir: Path, args: tuple[str, ...]) -> tuple[Path, str, EdgeTPUReport]:
    """Run the compiler on ``model`` into ``workdir``; return (compiled model, log text, report).

    Raises:
        MissingDependencyError: the compiler is not on PATH.
        CompilerFailed: it ran and did not produce a model.
    """
    exe = shutil.which(COMPILER)
    if exe is None:
        raise MissingDependencyError(f"{COMPILER} is not on PATH", hint=INSTALL_HINT)
    proc = subprocess.run([exe, *args, "-s", "-o", str(workdir), str(model)], capture_output=True, text=True,
                          preexec_fn=die_with_parent())  # fmt: skip
    text = proc.stdout + proc.stderr
    report = parse_log(text)
    compiled = workdir / f"{model.stem}_edgetpu.tflite"
    if proc.returncode != 0 or not report.compiled or not compiled.is_file():
        raise CompilerFailed(f"{COMPILER} failed: {report.error or f'exit code {proc.returncode}'}")
    return compiled, text, report
