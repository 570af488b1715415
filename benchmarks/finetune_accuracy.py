"""Validation accuracy after each phase, ImageNet-initialised vs from scratch, same budget.

Runs ``edgetl.train.finetune`` twice on the sign-language digits in ../shared (2,062 real photos,
10 classes, seeded stratified 80/20 split) with edgetl's default settings, once with
``--weights ../shared/weights/mobilenet_v2_imagenet_features.pth`` and once with ``--weights none``,
and writes ``results/finetune_accuracy_<tag>.{json,md}``.

    python benchmarks/finetune_accuracy.py [--image-size 224] [--head-epochs 5] [--finetune-epochs 10]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, machine, write_result  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data/sign_language_digits/Dataset"))
    parser.add_argument("--weights", default=str(SHARED / "weights/mobilenet_v2_imagenet_features.pth"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--tag", default="sign_language_cpu")
    parser.add_argument("--keep", default=None, help="keep the run directories under this folder")
    parser.add_argument("--only", choices=["imagenet", "scratch"], default=None, help="run one of the two")
    args = parser.parse_args()
    if not Path(args.data).is_dir() or not Path(args.weights).is_file():
        print(f"skipped: {args.data} or {args.weights} is missing", file=sys.stderr)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from edgetl.config import FinetuneConfig
    from edgetl.train import finetune

    runs = {}
    for name, weights in (("imagenet", args.weights), ("scratch", "none")):
        if args.only and name != args.only:
            continue
        cfg = FinetuneConfig.build(
            {
                "weights": weights,
                "image_size": args.image_size,
                "head_epochs": args.head_epochs,
                "finetune_epochs": args.finetune_epochs,
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            run_dir = Path(args.keep) / f"{args.tag}_{name}" if args.keep else Path(tmp) / "run"
            t0 = time.perf_counter()
            result = finetune(args.data, run_dir, cfg)
            history = (run_dir / "history.csv").read_text()
        runs[name] = {
            "weights": weights,
            "phase1_best_val_acc": result.phase1_val_acc,
            "phase2_best_val_acc": result.phase2_val_acc,
            "final_val_acc": result.best_val_acc,
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "stopped_early": result.stopped_early,
            "seconds": time.perf_counter() - t0,
            "history_csv": history,
            "config": cfg.to_dict(),
        }
        report(args, runs)  # after each run, so a long benchmark leaves results as it goes
    return 0


def report(args: argparse.Namespace, runs: dict) -> None:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    info = machine()
    lines = [
        "# Fine-tuning accuracy: sign-language digits",
        "",
        f"Data: {args.data} (2,062 photos, 10 classes; seeded stratified 80/20 train/val split).",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, torch {info.get('torch')}; one run per row.",
        f"Budget: {args.head_epochs} head epochs + up to {args.finetune_epochs} fine-tune epochs "
        f"(early stopping, patience 3), image size {args.image_size}, other settings edgetl defaults.",
        "",
        "| weights | val top-1 after phase 1 | after phase 2 | kept model (best val loss) | epochs | time |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        lines.append(
            f"| {name} | {pct(run['phase1_best_val_acc'])} | {pct(run['phase2_best_val_acc'])} | "
            f"{pct(run['final_val_acc'])} (epoch {run['best_epoch']}) | {run['epochs_run']} | "
            f"{run['seconds']:.0f}s |"
        )
    result = {"machine": info, "runs": runs}
    write_result(f"finetune_accuracy_{args.tag}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
