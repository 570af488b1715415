"""Run a bundle's own runtime on the target's CPU, emulated: ``qemu-aarch64 -cpu cortex-a72`` over the
board's userland and wheels (:mod:`edgetl.ontarget.userland`), one interpreter per process, the images
split between the workstation's cores.

What comes back is :class:`DeviceScores`: each image's scores from the device's own decoding and
preprocessing, the scores of the host's exact input crop where the two inputs differ (so a kernel
difference can be told from a decoder difference), and where it ran.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError, Interrupted
from edgetl.ontarget.userland import Userland, emulation_root, ensure_userland, ensure_wheels, require_tools
from edgetl.subproc import die_with_parent

log = logging.getLogger(__name__)

SECONDS_PER_IMAGE = 20.0  # a generous ceiling: a 224-px MobileNetV2 takes ~1 s per image under qemu-user
KERNEL_SAMPLE = 100  # images whose host input crop is run too, at most (evenly spread): a second invoke each


class DeviceRunError(EdgetlError):
    """The bundle's runtime failed or crashed where it runs (emulated or on a board)."""


@dataclass
class DeviceScores:
    """A bundle's outputs on the parity images where it runs."""

    scores: np.ndarray  # float32 [N, classes]: the device's own decode + preprocessing
    kernel_scores: np.ndarray  # float32 [N, classes]: the host's input crops (= scores where inputs agree)
    input_diff_max: np.ndarray  # int [N]: largest pixel difference between the device's and the host's crop
    invoke_ms: list[float]
    where: dict[str, Any]  # kind (emulated/board), emulator, cpu, board, python, library versions
    seconds: float
    kernel_measured: np.ndarray | None = None  # bool [N]: kernel_scores are on the host's crop (None: all)


def qemu_version(qemu: str) -> str:
    try:
        first = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"version (\S+)", first)
    return f"{Path(qemu).name.replace('-static', '')} {match.group(1) if match else '?'}"


def score_command(bundle: Path, listing: Path, inputs: Path, first: int, step: int, cpu_model: bool,
                  kernel_every: int = 1) -> list[str]:  # fmt: skip
    """The runtime's ``scores`` command line (after the interpreter)."""
    return ["-m", "edgetl_runtime", "scores", str(bundle), "--list", str(listing), "--inputs", str(inputs),
            "--first", str(first), "--step", str(step), "--threads", "1", "--kernel-every", str(kernel_every),
            *(["--cpu"] if cpu_model else [])]  # fmt: skip


def run_emulated(bundle: Path, paths: list[str], host_inputs: np.ndarray, cpu: str, userland_name: str,
                 requirements: list[str], processes: int | None = None,
                 cpu_model: bool = False) -> DeviceScores:  # fmt: skip
    """The bundle's runtime under qemu-user on ``paths`` (host crops ``host_inputs``, same order).

    Raises:
        MissingDependencyError: qemu-user or debootstrap is not installed (exit 5).
        SetupError: the userland or the wheels could not be fetched.
        DeviceRunError: the runtime failed or crashed under emulation.
        Interrupted: Ctrl-C (the emulated processes are stopped).
    """
    userland = Userland.parse(userland_name)
    qemu = require_tools(userland.qemu_arch)
    started = time.perf_counter()
    root = ensure_userland(userland, qemu)
    site, versions = ensure_wheels(requirements, userland)
    # the emulated process reads the host's /proc/cpuinfo: the board is named here, not by the device
    where = {"kind": "emulated", "emulator": qemu_version(qemu), "cpu": cpu, "userland": userland.name,
             "board": f"emulated {cpu} (qemu-user)", "versions": versions}  # fmt: skip
    setup_s = time.perf_counter() - started
    count = max(1, min(processes or os.cpu_count() or 1, len(paths)))
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1",
           "PYTHONPYCACHEPREFIX": str(emulation_root() / "pycache"), "OMP_NUM_THREADS": "1"}  # fmt: skip
    python = str(root / "usr" / "bin" / f"python{userland.python}")
    with tempfile.TemporaryDirectory(prefix="tmp-run-", dir=emulation_root()) as tmp:
        listing, inputs = _write_inputs(Path(tmp), paths, host_inputs)
        every = -(-len(paths) // KERNEL_SAMPLE)  # ceil: at most KERNEL_SAMPLE images run twice
        commands = [[qemu, "-L", str(root), "-cpu", cpu, python,
                     *score_command(bundle, listing, inputs, k, count, cpu_model, every)]
                    for k in range(count)]  # fmt: skip
        lines = run_split(commands, Path(tmp), bundle, env, len(paths), f"on {describe(where)}")
    result = collect(lines, len(paths), where, time.perf_counter() - started)
    result.where["setup_seconds"] = round(setup_s, 1)
    return result


def _write_inputs(folder: Path, paths: list[str], host_inputs: np.ndarray) -> tuple[Path, Path]:
    listing, inputs = folder / "images.txt", folder / "inputs.npy"
    listing.write_text("".join(f"{os.path.abspath(p)}\n" for p in paths), encoding="utf-8")
    np.save(inputs, np.ascontiguousarray(host_inputs, np.uint8))
    return listing, inputs


def describe(where: dict[str, Any]) -> str:
    """Where a device verdict was measured, in words: 'aarch64, emulated cortex-a72, ai-edge-litert 1.4.0'."""
    litert = (where.get("versions") or {}).get("ai-edge-litert")
    runtime = f", ai-edge-litert {litert}" if litert else ""
    if where.get("kind") == "emulated":
        return f"aarch64, emulated {where.get('cpu')}{runtime}"
    if where.get("kind") == "runtime":
        version = (where.get("versions") or {}).get("mediapipe", "?")
        machine = where.get("machine", "?")
        return f"MediaPipe {version} on this host ({machine}), region of interest: {where.get('region')}"
    return f"{where.get('board') or where.get('host')} ({where.get('machine', '?')}){runtime}"


def run_split(commands: list[list[str]], folder: Path, cwd: Path, env: dict[str, str] | None, images: int,
              where: str) -> list[dict[str, Any]]:  # fmt: skip
    """Run the score processes side by side; their JSON lines, or DeviceRunError naming how one failed."""
    procs, outputs = [], []
    timeout = 120 + SECONDS_PER_IMAGE * images / len(commands)
    try:
        for k, command in enumerate(commands):
            out, err = folder / f"out-{k}.jsonl", folder / f"err-{k}.txt"
            outputs.append((out, err))
            with open(out, "wb") as stdout, open(err, "wb") as stderr:
                procs.append(subprocess.Popen(command, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                              cwd=cwd, env=env, preexec_fn=die_with_parent()))  # fmt: skip
        deadline = time.monotonic() + timeout
        for proc in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except KeyboardInterrupt:
        raise Interrupted("interrupted during the on-target check; nothing was recorded") from None
    except subprocess.TimeoutExpired:
        raise DeviceRunError(f"the runtime {where} took over {timeout:.0f} s for {images} images; stopped") from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = []
    for proc, (out, err) in zip(procs, outputs, strict=True):
        if proc.returncode != 0:
            ended = how_it_ended(proc.returncode, err.read_text(errors="replace"))
            raise DeviceRunError(f"the bundle's runtime {ended} {where}",
                                 hint="see docs/targets.md (what runs where)")  # fmt: skip
        for line in out.read_text(errors="replace").splitlines():
            try:
                lines.append(json.loads(line))
            except ValueError:
                continue
    return lines


def how_it_ended(code: int, stderr: str) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"crashed ({name})"
    said = [line for line in stderr.splitlines() if line.strip() and "WARNING" not in line]
    return f"failed (exit {code}: {said[-1].strip()[:240] if said else 'no message'})"


def collect(lines: list[dict[str, Any]], count: int, where: dict[str, Any], seconds: float) -> DeviceScores:
    """Put the per-image lines back in list order; DeviceRunError when an image is missing."""
    rows: dict[int, dict[str, Any]] = {}
    for line in lines:
        if "device" in line:
            where = {**line["device"], **where, "versions": {**line["device"].get("versions", {}),
                                                            **where.get("versions", {})}}  # fmt: skip
        elif isinstance(line.get("i"), int):
            rows[line["i"]] = line
    missing = [i for i in range(count) if i not in rows]
    if missing:
        raise DeviceRunError(f"the runtime returned no result for {len(missing)} of {count} images")
    unreadable = [str(rows[i].get("error")) for i in range(count) if "scores" not in rows[i]]
    if unreadable:
        raise DeviceRunError(f"the device could not read {len(unreadable)} images: {unreadable[0]}")
    scores = np.asarray([rows[i]["scores"] for i in range(count)], np.float32)
    kernel = np.asarray([rows[i].get("host_input_scores", rows[i]["scores"]) for i in range(count)], np.float32)
    diff = np.asarray([rows[i].get("input_diff_max", 0) for i in range(count)], np.int64)
    measured = np.asarray([diff[i] == 0 or "host_input_scores" in rows[i] for i in range(count)])
    return DeviceScores(scores=scores, kernel_scores=kernel, input_diff_max=diff,
                        invoke_ms=[float(rows[i]["invoke_ms"]) for i in range(count)], where=where,
                        seconds=seconds, kernel_measured=measured)  # fmt: skip
