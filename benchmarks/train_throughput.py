"""Training throughput (images/s) of edgetl's own training step, per phase.

Feeds generated uint8 images through ``edgetl.train.finetune.train_one_epoch`` — the same augmentation,
freeze logic and optimiser as ``edgetl finetune`` — and times whole epochs after one warm-up epoch.
Writes ``results/train_throughput_<device>.{json,md}``.

    python benchmarks/train_throughput.py [--image-size 224] [--width 1.0] [--images 256] [--epochs 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per phase")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--heap",
        choices=["both", "retained", "glibc"],
        default="both",
        help="CPU: glibc's malloc defaults, the heap kept as edgetl finetune keeps it, or both "
        "(the defaults then run in a separate process: a process's heap is not reset by mallopt)",
    )
    parser.add_argument("--json-out", default=None, help=argparse.SUPPRESS)  # the --heap glibc child's result
    return parser.parse_args()


def main() -> int:
    args = _args()
    device, phases = _measure(args)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(phases))
        return 0
    _report(args, device, phases)
    return 0


def _measure(args: argparse.Namespace) -> tuple[object, dict]:
    """images/s of each phase setup (and, with --heap both on the CPU, glibc's defaults in a child)."""
    import numpy as np
    import torch

    from edgetl.config import FinetuneConfig
    from edgetl.data.decode import LoadedSplit
    from edgetl.runtime.preprocess import PreprocessSpec
    from edgetl.train.cpu_heap import glibc, retained_heap
    from edgetl.train.finetune import resolve_device
    from edgetl.train.loop import train_one_epoch
    from edgetl.train.model import EdgeClassifier, default_unfreeze_from, set_train_mode, set_trainable
    from edgetl.train.optim import build_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    cfg = FinetuneConfig(width=args.width, image_size=args.image_size, batch_size=args.batch_size)
    spec = PreprocessSpec.for_size(args.image_size)
    rng = np.random.default_rng(0)
    side = spec.resize_size
    images = rng.integers(0, 256, (args.images, side, side, 3), dtype=np.uint8)
    split = LoadedSplit(images=images, labels=rng.integers(0, 10, args.images), paths=[""] * args.images)
    on_device = torch.from_numpy(images).to(device)
    model = EdgeClassifier(10, args.width).to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    cut = default_unfreeze_from(model)
    steps = -(-args.images // args.batch_size)

    # (name, phase, first trained block): the defaults' two phases, and phase 2 over the whole backbone
    setups = [("phase1", 1, cut), ("phase2", 2, cut), ("phase2_all", 2, 0)]
    phases = _glibc_defaults(args) if device.type == "cpu" and glibc() is not None and args.heap == "both" else {}
    with retained_heap(args.heap != "glibc"):
        for name, phase, first in setups:
            set_trainable(model, phase, first)
            optimizer, scheduler = build_optimizer(model, cfg, phase, first, steps)
            rates = []
            for epoch in range(args.epochs + 1):  # the first epoch warms up and is not counted
                set_train_mode(model, phase, first, cfg.bn)
                stats = train_one_epoch(model, on_device, split.labels, cfg, optimizer, scheduler, device, epoch,
                                        desc=name)  # fmt: skip
                if epoch:
                    rates.append(stats["images_per_s"])
            phases[name] = {"images_per_s_median": statistics.median(rates), "runs": rates}
    phases["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return device, phases


def _glibc_defaults(args: argparse.Namespace) -> dict:
    """The same measurement with glibc's malloc defaults, in a separate process (mallopt is not undone)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "glibc.json"
        argv = [a for a in sys.argv[1:] if not a.startswith("--heap")]
        subprocess.run([sys.executable, __file__, *argv, "--heap", "glibc", "--json-out", str(out)], check=True)
        return {f"{k}_glibc_defaults": v for k, v in json.loads(out.read_text()).items()}


def _report(args: argparse.Namespace, device: object, phases: dict) -> None:
    info = machine()
    info["device"] = str(device)
    result = {"machine": info, "settings": vars(args), "phases": phases}
    lines = [
        f"# Training throughput ({device})",
        "",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, torch {info['torch']} with "
        f"{info['torch_threads']} threads{', GPU ' + info['gpu'] if 'gpu' in info else ''}.",
        f"MobileNetV2 width {args.width}, {args.image_size}x{args.image_size}, batch {args.batch_size}, "
        f"{args.images} generated images per epoch; median of {args.epochs} epochs after a warm-up epoch.",
        "",
        "Heap: kept for reuse, as `edgetl finetune` trains on the CPU (edgetl.train.cpu_heap), or glibc's defaults",
        "(measured in a separate process).",
        "",
        "| phase | images/s | glibc defaults |",
        "|---|---|---|",
    ]
    titles = {"phase1": "1: head only, backbone frozen", "phase2": "2: last third unfrozen (default)",
              "phase2_all": "2: whole backbone (--unfreeze-from 0)"}  # fmt: skip
    for name, title in titles.items():
        default = phases.get(f"{name}_glibc_defaults")
        lines.append(f"| {title} | {phases[name]['images_per_s_median']:.1f} | "
                     f"{'-' if default is None else format(default['images_per_s_median'], '.1f')} |")  # fmt: skip
    default_rss = phases.get("peak_rss_mib_glibc_defaults")
    lines += ["", f"Peak resident memory of the process: {phases['peak_rss_mib']:.0f} MiB"
              + (f" ({default_rss:.0f} MiB with glibc's defaults)." if default_rss else ".")]  # fmt: skip
    write_result(f"train_throughput_{device.type}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
