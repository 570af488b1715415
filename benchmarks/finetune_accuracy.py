"""Validation accuracy after each phase for each transfer strategy, same budget.

Runs ``edgetl.train.finetune.finetune`` on the sign-language digits in ../shared (2,062 real photos, 10 classes,
seeded stratified 80/20 split) and writes ``results/finetune_accuracy_<tag>.{json,md}``. Variants (ImageNet
weights from ../shared unless said otherwise; edgetl's defaults otherwise):

* ``feature-extraction``: phase 2 trains the head only (``--strategy feature-extraction``);
* ``partial``: the last third of the backbone at a tenth of the head's rate (``--strategy partial``, the
  default before issue #20);
* ``whole-at-head-rate``: the whole backbone at the head's rate (``--strategy partial --unfreeze-from 0
  --backbone-lr-mult 1``), the best fixed recipe measured before;
* ``full``: every block, layer-wise rates, thawed top-down (``--strategy full``);
* ``auto``: probes of the three strategies decide (``--strategy auto``);
* ``scratch``: ``--weights none`` (the defaults otherwise).

``--only`` runs some of them; rows already in the result file from earlier invocations with the same
budget are kept (each row says which training seed it used). ``--image-size 96`` is the second dataset
of issue #20: the same photos at 96 px (``--tag sign_language_96``).

    python benchmarks/finetune_accuracy.py [--only full auto] [--seeds 0 1 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SHARED, machine, write_result  # noqa: E402

# variant -> settings on top of edgetl's defaults ("weights": "imagenet" means the shared backbone file)
VARIANTS = {
    "feature-extraction": {"weights": "imagenet", "strategy": "feature-extraction"},
    "partial": {"weights": "imagenet", "strategy": "partial"},
    "whole-at-head-rate": {"weights": "imagenet", "strategy": "partial", "unfreeze_from": 0, "backbone_lr_mult": 1.0},
    "full": {"weights": "imagenet", "strategy": "full"},
    "auto": {"weights": "imagenet", "strategy": "auto"},
    "scratch": {"weights": "none"},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "data/sign_language_digits/Dataset"))
    parser.add_argument("--weights", default=str(SHARED / "weights/mobilenet_v2_imagenet_features.pth"))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--head-epochs", type=int, default=5)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--tag", default="sign_language_strategies")
    parser.add_argument("--keep", default=None, help="keep the run directories under this folder")
    parser.add_argument("--only", choices=list(VARIANTS), nargs="+", default=None, help="run only these variants")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds, one run each")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the result file")
    args = parser.parse_args()
    if not Path(args.data).is_dir() or not Path(args.weights).is_file():
        print(f"skipped: {args.data} or {args.weights} is missing", file=sys.stderr)
        return 0

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    runs = previous_runs(args)
    if args.report_only:
        report(args, runs, previous=True)
        return 0
    for name, settings in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        for seed in args.seeds:
            row = name if seed == 0 else f"{name} (seed {seed})"
            runs[row] = train_variant(args, name, settings, seed)
            report(args, runs)  # after each run, so a long benchmark leaves results as it goes
    return 0


def train_variant(args: argparse.Namespace, name: str, settings: dict, seed: int) -> dict:
    """One fine-tuning run of a variant; its accuracy after each phase, time and history."""
    from edgetl.config import FinetuneConfig
    from edgetl.train.finetune import finetune

    weights = args.weights if settings["weights"] == "imagenet" else settings["weights"]
    cfg = FinetuneConfig.build({**settings, "weights": weights, "image_size": args.image_size,
                                "head_epochs": args.head_epochs, "finetune_epochs": args.finetune_epochs,
                                "seed": seed})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep) / f"{args.tag}_{name}_s{seed}" if args.keep else Path(tmp) / "run"
        t0 = time.perf_counter()
        result = finetune(args.data, run_dir, cfg)
        history = (run_dir / "history.csv").read_text()
    return {
        "weights": weights,
        "seed": seed,
        "phase1_best_val_acc": result.phase1_val_acc,
        "phase2_best_val_acc": result.phase2_val_acc,
        "final_val_acc": result.best_val_acc,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "seconds": time.perf_counter() - t0,
        "history_csv": history,
        "config": cfg.to_dict(),
        "strategy": result.strategy,
    }


def previous_runs(args: argparse.Namespace) -> dict:
    """Rows of an earlier result file measured with the same data and budget (kept by ``--only``)."""
    path = RESULTS / f"finetune_accuracy_{args.tag}.json"
    if not path.is_file():
        return {}
    old = json.loads(path.read_text())
    same = ("image_size", "head_epochs", "finetune_epochs")
    return {name: run for name, run in old.get("runs", {}).items()
            if all(run["config"].get(k) == getattr(args, k) for k in same)}  # fmt: skip


def images_per_second(history_csv: str) -> str:
    """The slowest and fastest epoch's training throughput: a wide range means the machine was shared."""
    rows = list(csv.DictReader(io.StringIO(history_csv)))
    rates = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    return f"{min(rates):.0f}–{max(rates):.0f}" if rates else "-"


def report(args: argparse.Namespace, runs: dict, previous: bool = False) -> None:
    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"

    info = (
        json.loads((RESULTS / f"finetune_accuracy_{args.tag}.json").read_text())["machine"] if previous else machine()
    )
    lines = [
        f"# Fine-tuning accuracy per transfer strategy: sign-language digits at {args.image_size} px",
        "",
        f"Data: {args.data} (2,062 photos, 10 classes; seeded stratified 80/20 train/val split).",
        f"Machine: {info['cpu']}, {info['cpus']} CPUs, torch {info.get('torch')}; one run per row.",
        f"Budget: {args.head_epochs} head epochs + up to {args.finetune_epochs} fine-tune epochs "
        f"(early stopping, patience 3), image size {args.image_size}; variants in the script's docstring; other "
        "settings edgetl defaults.",
        "",
        "Time: wall clock of the run; images/s: its slowest and fastest epoch (phase 1 trains the head only, so"
        " it runs faster; a range wider than that means other jobs shared the machine and the time is inflated).",
        "",
        "| variant | val top-1 after phase 1 | after phase 2 | kept model (best val loss) | epochs | time | images/s "
        "| strategy used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        used = (run.get("strategy") or {}).get("used", "-")
        lines.append(
            f"| {name} | {pct(run['phase1_best_val_acc'])} | {pct(run['phase2_best_val_acc'])} | "
            f"{pct(run['final_val_acc'])} (epoch {run['best_epoch']}) | {run['epochs_run']} | "
            f"{run['seconds']:.0f}s | {images_per_second(run['history_csv'])} | {used} |"
        )
    lines += ["", "Mean over training seeds:", "", "| variant | seeds | kept model val top-1 (mean, min–max) "
              "| time (mean) |", "|---|---|---|---|"]  # fmt: skip
    for variant in VARIANTS:
        rows = [run for name, run in runs.items() if name.split(" (seed")[0] == variant]
        if rows:
            accs = [run["final_val_acc"] for run in rows]
            lines.append(f"| {variant} | {len(rows)} | {100 * sum(accs) / len(accs):.2f}% ({100 * min(accs):.2f}–"
                         f"{100 * max(accs):.2f}) | {sum(r['seconds'] for r in rows) / len(rows):.0f}s |")  # fmt: skip
    result = {"machine": info, "runs": runs}
    write_result(f"finetune_accuracy_{args.tag}", result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
