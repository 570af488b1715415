"""How long the on-target check takes and what it finds: ``edgetl check RUN --on-target TARGET`` on a
run's validation split, first with an empty emulation cache (debootstrap + wheels + run) and then with
the cache kept (run only), on this machine's cores.

Reports per run: images, seconds (cold: setup + run; warm: run), the emulated CPU and the wheels the
board's pip resolved, top-1 / Δ / agreement with the float model on the emulated board, agreement with
the host's int8, the largest output difference from the host's int8 on the host's exact input crops
(in the output's quantisation steps), how many images differ by more than one step, and how many input
crops the board's own decoding and resizing made differently. Writes ``results/on_target_<tag>.{json,md}``.

    python benchmarks/on_target.py RUN [--target rpi4-cpu] [--tag sign_language] [--no-cold]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, write_result  # noqa: E402

EDGETL = [sys.executable, "-m", "edgetl"]


def on_target(run: Path, target: str, emulation_dir: Path) -> tuple[dict, float]:
    env = {**os.environ, "EDGETL_EMULATION_DIR": str(emulation_dir)}
    started = time.perf_counter()
    done = subprocess.run([*EDGETL, "-q", "check", str(run), "--on-target", target, "--json"], env=env,
                          capture_output=True, text=True)  # fmt: skip
    wall = time.perf_counter() - started
    if done.returncode not in (0, 3):
        sys.exit(f"edgetl check --on-target failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout), wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run")
    p.add_argument("--target", default="rpi4-cpu")
    p.add_argument("--tag", default="run")
    p.add_argument("--no-cold", action="store_true", help="skip the run with an empty emulation cache")
    args = p.parse_args()
    run = finished_run(args.run)
    if run is None:
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgetl-emulation-") as tmp:
        phases = ["warm"] if args.no_cold else ["cold", "warm"]
        for phase in phases:
            record, wall = on_target(run, args.target, Path(tmp))
            rows.append({"phase": phase, "wall_seconds": round(wall, 1), "record": record})
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"machine": machine(), "run": str(run), "target": args.target, "rows": rows}
    write_result(f"on_target_{args.tag}", result, markdown(result))


def markdown(result: dict) -> str:
    first = result["rows"][-1]["record"]
    where = first["where"]
    versions = ", ".join(f"{k} {v}" for k, v in sorted(where.get("versions", {}).items()))
    lines = [
        f"# On-target check: `edgetl check {result['run']} --on-target {result['target']}`",
        "",
        f"Host: {result['machine']['cpu']}, {result['machine']['cpus']} cores (commit "
        f"{result['machine'].get('git_commit', '?')}). Emulated: {where.get('emulator')} -cpu {where.get('cpu')}, "
        f"{where.get('userland')}, Python {where.get('python')}; wheels: {versions}.",
        "",
        "| phase | images | wall s | top-1 | Δ vs float | agreement float | agreement host int8 | "
        "kernels: max output diff (steps), images > 1 step | own pipeline: max steps, images > 1 step | "
        "input crops made differently (max levels) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        r = row["record"]
        lines.append(
            f"| {row['phase']} | {r['count']} | {row['wall_seconds']} | {100 * r['top1']:.2f} % | "
            f"{r['delta_top1_pp']:+.2f} pp | {100 * r['agreement']:.2f} % | {100 * r['agreement_with_host']:.2f} % | "
            f"{r['max_output_diff']:.4f} ({r['max_output_diff_steps']}), {r['images_over_one_step']} "
            f"(on {r.get('kernel_images', r['count'])} images) | "
            f"{r.get('pipeline_max_output_diff_steps', '-')}, {r.get('pipeline_images_over_one_step', '-')} | "
            f"{r['inputs_differing']} ({r['input_diff_max']}) | {'PASS' if r['passed'] else 'FAIL'} |"
        )
    lines += ["", "Kernels: the board's interpreter on the host's exact input crops against the host's int8 "
              "(what the ARM kernels change). Own pipeline: the board's decoding and resizing too (what the board "
              "answers for the photo). Output steps: the int8 model's output quantisation step.",
              "", "Cold: an empty emulation cache (debootstrap's first stage, the aarch64 wheels, then the run). "
              "Warm: the cache kept. One run each; the images are split between the host's cores "
              "(one emulated interpreter per process)."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
