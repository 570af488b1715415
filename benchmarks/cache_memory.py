"""Peak anonymous memory of ``edgetl finetune`` against the dataset's size, and what the image cache saves.

For generated 500x375 photo-like JPEG datasets (``gpu_throughput._jpeg``; 10 classes, 20 % validation)
of ``--small`` and ``--large`` images, runs::

    edgetl finetune DATA --image-size 128 --width 0.35 --head-epochs 1 --finetune-epochs 0 --weights none

as a subprocess and samples RssAnon (/proc/PID/status: anonymous resident memory, what runs a machine out
of memory; a memory map's page cache is not in it) summed over the process and all its descendants every
50 ms. Per dataset: a first run on an empty cache, a second run reusing it, and ``--nproc 2`` (two DDP
processes on the CPU, on a fresh cache: one builds, the other waits and maps). With ``--before REF`` the
first run is also made with the code of git revision REF (a worktree), to show what the cache changed.
Decode and first-epoch seconds come from each run's metrics.json and history.csv.

Writes ``benchmarks/results/cache_memory.{json,md}``.

    python benchmarks/cache_memory.py --work /tmp/cache-bench [--small 2000] [--large 40000] [--before 13932d1]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = ["--image-size", "128", "--width", "0.35", "--head-epochs", "1", "--finetune-epochs", "0",
          "--weights", "none", "--device", "cpu"]  # fmt: skip


def rss_anon_tree(root_pid: int) -> int:
    """RssAnon in bytes summed over ``root_pid`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def measured_run(argv: list[str], env: dict[str, str]) -> dict:
    """Run ``argv``; its wall time, exit code and peak RssAnon of the process tree."""
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"bytes": 0}

    def sample() -> None:
        while proc.poll() is None:
            peak["bytes"] = max(peak["bytes"], rss_anon_tree(proc.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
    return {"wall_s": time.perf_counter() - started, "peak_rss_anon_mib": peak["bytes"] / 2**20, "log": err}


# Runs ``edgetl`` from the source tree in argv[1], bypassing the editable install's import hook (which would
# load this checkout's package whatever PYTHONPATH says).
FROM_TREE = ("import runpy, sys; tree = sys.argv.pop(1); "
             "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]; "
             "sys.path.insert(0, tree); sys.argv[0] = 'edgetl'; "
             "runpy.run_module('edgetl', run_name='__main__')")  # fmt: skip


def finetune(data: Path, out: Path, cache: Path, *, nproc: int = 1, code: Path = REPO) -> dict:
    # PyTorch's default threads (one per core) in a single process; --nproc gives each rank one.
    env = dict(os.environ, EDGETL_CACHE_DIR=str(cache))
    env.pop("OMP_NUM_THREADS", None)
    launcher = ["-m", "edgetl"] if code == REPO else ["-c", FROM_TREE, str(code)]
    argv = [sys.executable, *launcher, "finetune", str(data), "--out", str(out), *RECIPE, "--json"]
    if nproc > 1:
        argv += ["--nproc", str(nproc)]
    result = measured_run(argv, env)
    metrics = json.loads((out / "metrics.json").read_text())
    with open(out / "history.csv") as rows:
        history = list(csv.DictReader(rows))
    cache_record = metrics.get("data", {}).get("cache", {})
    # Code without the cache logs "decoded N <split> images in S s" per split instead.
    logged = [float(s) for s in re.findall(r"decoded \d+ \w+ images in ([\d.]+)s", result.pop("log"))]
    result.update(
        first_epoch_s=float(history[0]["seconds"]),
        decode_s=sum(item["seconds"] for item in cache_record.values()) if cache_record else sum(logged),
        reused=[name for name, item in cache_record.items() if item.get("reused")],
        val_top1=metrics["val"]["top1"],
    )
    return result


def dataset(work: Path, images: int) -> Path:
    from gpu_throughput import make_dataset

    root = work / f"jpeg500x375_{images}"
    done = root / ".complete"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        make_dataset(root, images, os.cpu_count() or 1)
        done.write_text(str(images))
    return root


def before_code(work: Path, ref: str) -> Path:
    tree = work / f"edgetl-{ref}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="Datasets, caches and runs go here.")
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--large", type=int, default=40000)
    parser.add_argument("--before", default=None, help="Also run the first run with this git revision's code.")
    args = parser.parse_args()
    rows = []
    for images in (args.small, args.large):
        data = dataset(args.work, images)
        runs = args.work / f"runs_{images}"
        shutil.rmtree(runs, ignore_errors=True)
        cache = runs / "cache"
        row = {"images": images, "first": finetune(data, runs / "first", cache)}
        row["second"] = finetune(data, runs / "second", cache)
        row["nproc2"] = finetune(data, runs / "nproc2", runs / "cache-nproc2", nproc=2)
        if args.before:
            old = before_code(args.work, args.before)
            row["before"] = finetune(data, runs / "before", runs / "cache-before", code=old)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"machine": machine(), "recipe": RECIPE, "before": args.before, "rows": rows}
    write_result("cache_memory", result, markdown(result))


def markdown(result: dict) -> str:
    small, large = result["rows"]
    lines = [
        "# Peak anonymous memory of `edgetl finetune` against dataset size",
        "",
        f"Command: `python benchmarks/cache_memory.py --work DIR --small {small['images']} --large {large['images']}"
        + (f" --before {result['before']}`" if result["before"] else "`"),
        f"Machine: {result['machine']['cpu']}, {result['machine']['cpus']} CPUs, no GPU; one run per cell.",
        "`edgetl finetune DATA " + " ".join(result["recipe"]) + "` on generated 500x375 JPEGs (10 classes, 20 % val).",
        "Peak RssAnon summed over the process tree, sampled every 50 ms.",
        "",
        "| run | images | peak RssAnon MiB | wall s | decode s | first epoch s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for kind, label in (("first", "first run (empty cache)"), ("second", "second run (cache reused)"),
                        ("nproc2", "--nproc 2 (empty cache)"), ("before", f"before ({result['before']})")):  # fmt: skip
        for row in (small, large):
            run = row.get(kind)
            if run:
                lines.append(f"| {label} | {row['images']:,} | {run['peak_rss_anon_mib']:,.0f} | {run['wall_s']:.1f} "
                             f"| {run['decode_s']:.1f} | {run['first_epoch_s']:.1f} |")  # fmt: skip
    lines.append("")
    for kind in ("first", "nproc2", "before"):
        if kind in small and kind in large:
            ratio = large[kind]["peak_rss_anon_mib"] / small[kind]["peak_rss_anon_mib"]
            lines.append(f"- {kind}: {large['images']:,} / {small['images']:,} images peak RssAnon ratio {ratio:.2f}x")
    for row in (small, large):
        first, second = row["first"], row["second"]
        lines.append(f"- second run on {row['images']:,} images: decode {second['decode_s']:.2f} s = "
                     f"{100 * second['decode_s'] / first['decode_s']:.1f} % of the first's {first['decode_s']:.1f} s; "
                     f"wall {second['wall_s']:.1f} s = {100 * second['wall_s'] / first['wall_s']:.0f} % of "
                     f"{first['wall_s']:.1f} s")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
