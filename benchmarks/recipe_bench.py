"""The transfer recipes on several real datasets, several seeds: is the default the best fixed recipe?

Issue #30. Each dataset x seed x recipe is one ``edgetl.train.finetune.finetune`` run (ImageNet weights, edgetl's
defaults otherwise) in its own process; up to ``--jobs`` run at once (one GPU shared, or one CPU thread each).
Recipes (settings on top of the defaults):

* ``feature-extraction``, ``partial``, ``full``, ``whole``: ``--strategy`` of that name (``whole``: every block at
  the head's rate, the same as ``--strategy partial --unfreeze-from 0 --backbone-lr-mult 1``);
* ``auto-fe-full``: the default before issue #30 (``auto`` racing feature extraction and full);
* ``auto-fe-whole``: ``auto`` racing feature extraction and whole: today's default, run explicitly;
* ``auto-fe-full-whole``: ``auto`` racing all three (the candidate that lost: it chose full once);
* ``auto``: the default, no flags.

Three commands:

    python benchmarks/recipe_bench.py prepare --out PACK [--clothing DIR] [--hymenoptera DIR]
    python benchmarks/recipe_bench.py run --pack PACK --work DIR [--sets ..] [--seeds 0 1 2] [--recipes ..]
    python benchmarks/recipe_bench.py report --work DIR [DIR ...] --tag TAG

``prepare`` builds the datasets the runs read (a folder outside the repository): the sign-language digits of
../shared split once into train/val/test (70/15/15 per class, by file name hash, the same for every seed), the
clothing set (github.com/alexeygrigorev/clothing-dataset-small, its own train/validation/test) and hymenoptera
(its train/val) re-encoded at 256x256 (the square the training crops come from: shorter side 256, centre; the
evaluation crop is its centre 224) so that a pack fits a transfer; ``--quality`` is the JPEG quality (WebP
when ``--webp``). ``run`` writes one JSON per run into WORK/results (a rerun skips finished ones) and a tarball
of them to ``--out-tar`` after each run. ``report`` writes ``results/recipe_bench_<tag>.{json,md}``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, SHARED, machine, write_result  # noqa: E402

RECIPES = {
    "feature-extraction": {"strategy": "feature-extraction"},
    "partial": {"strategy": "partial"},
    "full": {"strategy": "full"},
    "whole": {"strategy": "whole"},
    "auto-fe-full": {"strategy": "auto", "race": ["feature-extraction", "full"]},
    "auto-fe-whole": {"strategy": "auto", "race": ["feature-extraction", "whole"]},
    "auto-fe-full-whole": {"strategy": "auto", "race": ["feature-extraction", "full", "whole"]},
    "auto": {},
}
DEFAULT_SAME_AS = "auto-fe-whole"  # the default's configuration, run under its explicit name before it became it
FIXED = ("feature-extraction", "partial", "full", "whole")


def _bucket(name: str) -> float:
    return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 2**32


def _square(src: Path, dst: Path, quality: int, webp: bool) -> None:
    from PIL import Image, ImageOps

    with Image.open(src) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        w, h = image.size
        scale = 256 / min(w, h)
        image = image.resize((max(256, round(w * scale)), max(256, round(h * scale))), Image.Resampling.BOX)
        w, h = image.size
        left, top = (w - 256) // 2, (h - 256) // 2
        image = image.crop((left, top, left + 256, top + 256))
        dst.parent.mkdir(parents=True, exist_ok=True)
        image.save(dst.with_suffix(".webp" if webp else ".jpg"), "WEBP" if webp else "JPEG", quality=quality)


def prepare(args: argparse.Namespace) -> None:
    out = Path(args.out)
    sign = SHARED / "data/sign_language_digits/Dataset"
    for cls in sorted(p for p in sign.iterdir() if p.is_dir()):
        for image in sorted(cls.iterdir()):
            b = _bucket(image.name)
            split = "test" if b < 0.15 else "val" if b < 0.30 else "train"
            dst = out / "sign" / split / cls.name / image.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if image.stat().st_size > 200_000:  # the three 3024x3024 photos: the 256 square training uses
                _square(image, dst, 95, False)
            else:
                shutil.copyfile(image, dst)
    sets = {"clothing": args.clothing, "hymenoptera": args.hymenoptera}
    for name, root in sets.items():
        if not root:
            continue
        for image in sorted(Path(root).glob("*/*/*")):
            if image.suffix.lower() in (".jpg", ".jpeg", ".png"):
                split, cls = image.parts[-3], image.parts[-2]
                _square(image, out / name / split / cls / image.stem, args.quality, args.webp)
    weights = out / "weights.pth"
    shutil.copyfile(SHARED / "weights/mobilenet_v2_imagenet_features.pth", weights)
    sizes = {p.name: sum(f.stat().st_size for f in [p, *p.rglob("*")] if f.is_file()) for p in out.iterdir()}
    total = sum(sizes.values()) / 2**20
    print(json.dumps({k: round(v / 2**20, 1) for k, v in sizes.items()}), f"total {total:.1f} MiB")


def job(spec_path: str) -> None:
    """One run, in this process: the spec's settings on top of the defaults; its record as JSON."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    if torch.cuda.is_available():  # the auto run's winner lane should equal that strategy's own run
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    from edgetl.config import FinetuneConfig
    from edgetl.train.finetune import finetune

    cfg = FinetuneConfig.build({"weights": spec["weights"], "seed": spec["seed"], "device": spec["device"],
                                **spec.get("settings", {}), **RECIPES[spec["recipe"]]})  # fmt: skip
    run_dir = Path(spec["run_dir"])
    shutil.rmtree(run_dir, ignore_errors=True)
    started = time.perf_counter()
    result = finetune(spec["data"], run_dir, cfg)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record = {**{k: spec[k] for k in ("set", "recipe", "seed")}, "torch": torch.__version__,
              "val_top1": result.best_val_acc, "test_top1": result.test_acc, "best_val_loss": result.best_val_loss,
              "best_epoch": result.best_epoch,
              "epochs": result.epochs_run, "seconds": round(time.perf_counter() - started, 1),
              "counts": metrics["counts"], "strategy": result.strategy, "history": _history(run_dir),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}  # fmt: skip
    out = Path(spec["result"])
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out)
    shutil.rmtree(run_dir, ignore_errors=True)


def _history(run_dir: Path) -> list[dict]:
    import csv

    rows = list(csv.DictReader((run_dir / "history.csv").open()))
    return [{"epoch": int(r["epoch"]), "phase": int(r["phase"]), "train_loss": float(r["train_loss"]),
             "val_loss": float(r["val_loss"]), "val_acc": float(r["val_acc"]),
             "images_per_s": float(r.get("images_per_s") or 0)} for r in rows]  # fmt: skip


def warm(pack: Path, sets: list[str], size: int) -> None:
    """Decode every set once into the image cache, so that the runs of a set do not all decode it."""
    from edgetl.data.folders import discover
    from edgetl.data.splits import load_splits
    from edgetl.runtime.preprocess import PreprocessSpec

    for name in sets:
        began = time.perf_counter()
        load_splits(discover(pack / name), PreprocessSpec.for_size(size), None, [], show_progress=False)
        print(f"warm {name}: {time.perf_counter() - began:.1f} s", flush=True)


def run(args: argparse.Namespace) -> None:
    pack, work = Path(args.pack).resolve(), Path(args.work).resolve()
    (work / "results").mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EDGETL_CACHE_DIR", str(work / "cache"))
    started = time.monotonic()
    warm(pack, args.sets, json.loads(args.settings).get("image_size", 224))
    todo = [(s, name, seed) for seed in args.seeds for s in args.sets for name in args.recipes]
    todo = [t for t in todo if not (work / "results" / f"{t[0]}__{t[1]}__s{t[2]}.json").exists()]
    running: list[tuple[subprocess.Popen, tuple, float]] = []
    while todo or running:
        elapsed = time.monotonic() - started
        while todo and len(running) < args.jobs and elapsed < args.launch_until:
            key = todo.pop(0)
            spec = {"set": key[0], "recipe": key[1], "seed": key[2], "data": str(pack / key[0]),
                    "weights": str(pack / "weights.pth"), "device": args.device, "threads": args.threads,
                    "run_dir": str(work / "runs" / "__".join(map(str, key))),
                    "result": str(work / "results" / f"{key[0]}__{key[1]}__s{key[2]}.json"),
                    "settings": json.loads(args.settings)}  # fmt: skip
            spec_path = work / "runs" / ("__".join(map(str, key)) + ".spec.json")
            spec_path.parent.mkdir(parents=True, exist_ok=True)
            spec_path.write_text(json.dumps(spec))
            log = open(work / "runs" / ("__".join(map(str, key)) + ".log"), "w")  # noqa: SIM115
            proc = subprocess.Popen([sys.executable, __file__, "job", str(spec_path)], stdout=log, stderr=log)
            running.append((proc, key, time.monotonic()))
        if not todo and not running:
            break
        if elapsed > args.hard_limit:
            for proc, key, _ in running:
                proc.kill()
                print(f"killed {key} at the hard limit", flush=True)
            break
        if elapsed >= args.launch_until and not running:
            break
        time.sleep(1)
        for entry in list(running):
            proc, key, began = entry
            if proc.poll() is not None:
                running.remove(entry)
                print(f"{'done' if proc.returncode == 0 else f'FAILED ({proc.returncode})'} {key} "
                      f"in {time.monotonic() - began:.0f} s", flush=True)  # fmt: skip
                _bundle(work, args.out_tar)
    _bundle(work, args.out_tar)
    print(f"left: {len(todo)} runs not started; {time.monotonic() - started:.0f} s", flush=True)


def _bundle(work: Path, out_tar: str | None) -> None:
    if not out_tar:
        return
    tmp = Path(out_tar + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted((work / "results").glob("*.json")):
            tar.add(path, arcname=path.name)
        for path in sorted((work / "runs").glob("*.log")):
            tar.add(path, arcname="logs/" + path.name)
    tmp.replace(out_tar)


def _load(works: list[Path]) -> dict[tuple[str, str], dict[int, dict]]:
    """The runs' records: WORK/results/*.json of ``run``, or the ``recipe_bench_<tag>_runs.json`` of ``report``."""
    records: list[dict] = []
    for work in works:
        if work.is_file():
            records += json.loads(work.read_text())
        for path in sorted(work.glob("results/*.json")) if work.is_dir() else []:
            records.append(json.loads(path.read_text()))
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for record in records:
        history = record["history"]
        if history and isinstance(history[0], list):
            record["history"] = [dict(zip(("epoch", "phase", "val_loss", "val_acc"), h, strict=True)) for h in history]
        runs.setdefault((record["set"], record["recipe"]), {})[record["seed"]] = record
    return runs


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(records: dict[int, dict], seeds: list[int], key: str) -> dict:
    values = [100 * records[s][key] for s in seeds if s in records and records[s][key] is not None]
    return {"per_seed": values, "mean": _mean(values) if len(values) == len(seeds) else None}


def report(works: list[Path], tag: str) -> None:
    """Per set: each recipe's validation (and test) top-1 per seed and mean, time, what auto chose; the
    default's distance to the best fixed column."""
    runs = _load(works)
    sets = sorted({key[0] for key in runs}, key=["sign", "clothing", "hymenoptera"].index)
    order = [*FIXED, "auto-fe-full", "auto-fe-full-whole", DEFAULT_SAME_AS, "auto"]
    ran_on = sorted({r.get("gpu") or "CPU" for by_seed in runs.values() for r in by_seed.values()})
    out = {"sets": {}, "ran_on": ran_on, "report_written_on": machine()}
    lines = [f"# recipe_bench: {tag}", "",
             f"Ran on: {', '.join(ran_on)}. ImageNet weights from ../shared; edgetl's defaults (5 head epochs, up to "
             "10 fine-tune epochs, patience 3, batch 32, 224 px) plus each recipe's settings. Top-1 of the run's best "
             "epoch (lowest validation loss). 'epochs' counts the run's own epochs, not a race's losing lanes; "
             "'s per run' is the wall time of the fine-tune (on the GPU: up to 14 runs shared it at once).", ""]
    for name in sets:
        recipes = [r for r in order if (name, r) in runs]
        # the seeds every recipe ran (the default, if it ran on fewer, is compared on those it has)
        seeds = sorted(set.intersection(*(set(runs[(name, r)]) for r in recipes if r != "auto" or len(recipes) == 1)))
        table = {recipe: _row(runs[(name, recipe)], seeds) for recipe in recipes}
        verdict = _verdict(table)
        counts = runs[(name, recipes[0])][seeds[0]].get("counts") or {}
        out["sets"][name] = {"seeds": seeds, "recipes": table, "verdict": verdict, "counts": counts}
        lines += _set_markdown(name, counts, seeds, table, verdict)
    write_result(f"recipe_bench_{tag}", out, "\n".join(lines) + "\n")
    raw = [{**r, "history": [[h["epoch"], h["phase"], round(h["val_loss"], 5), round(h["val_acc"], 5)]
                             for h in r["history"]]}
           for key in sorted(runs) for _, r in sorted(runs[key].items())]  # fmt: skip
    (RESULTS / f"recipe_bench_{tag}_runs.json").write_text(json.dumps(raw, separators=(",", ":")) + "\n")


def _row(records: dict[int, dict], seeds: list[int]) -> dict:
    """One recipe on one set: top-1 per split over the first 3 seeds and all, seconds, epochs, choices."""
    row: dict = {split: {"3": _cell(records, seeds[:3], f"{split}_top1"), "all": _cell(records, seeds, f"{split}_top1")}
                 for split in ("val", "test")}  # fmt: skip
    ran = [s for s in seeds if s in records]
    row["seconds"] = _mean([records[s]["seconds"] for s in ran])
    row["epochs"] = _mean([records[s]["epochs"] for s in ran])
    row["used"] = [(records[s].get("strategy") or {}).get("used") for s in ran]
    return row


def _verdict(table: dict[str, dict]) -> dict[str, dict]:
    """The default (``auto``, else the same configuration run by name) against the best fixed recipe."""
    verdict = {}
    for split in ("val", "test"):
        for n in ("3", "all"):
            means = [(table[r][split][n]["mean"], r) for r in FIXED
                     if r in table and table[r][split][n]["mean"] is not None]  # fmt: skip
            have = [r for r in ("auto", DEFAULT_SAME_AS) if r in table and table[r][split][n]["mean"] is not None]
            if means and have:
                (best, which), mine = max(means), table[have[0]][split][n]["mean"]
                verdict[f"{split}_{n}"] = {"best": which, "best_mean": best, "default": have[0],
                                           "default_mean": mine, "default_minus_best_pp": mine - best}  # fmt: skip
    return verdict


def _set_markdown(name: str, counts: dict, seeds: list[int], table: dict[str, dict],
                  verdict: dict[str, dict]) -> list[str]:  # fmt: skip
    lines = [f"## {name} (train {counts.get('train')}, val {counts.get('val')}, test {counts.get('test')}; "
             f"seeds {seeds})", "",
             "| recipe | val top-1 per seed | val mean (3 / all) | test top-1 per seed | test mean (3 / all) | "
             "epochs | s per run | chose |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for recipe, row in table.items():
        def fmt(split: str, row: dict = row) -> tuple[str, str]:
            per = " / ".join(f"{v:.2f}" for v in row[split]["all"]["per_seed"]) or "–"
            means = [row[split][n]["mean"] for n in ("3", "all")]
            return per, " / ".join("–" if m is None else f"{m:.2f}" for m in means)

        chose = ", ".join(sorted({u for u in row["used"] if u and u != recipe})) or ""
        lines.append(f"| {recipe} | {' | '.join(fmt('val'))} | {' | '.join(fmt('test'))} | {row['epochs']:.1f} | "
                     f"{row['seconds']:.0f} | {chose} |")  # fmt: skip
    lines.append("")
    for key, v in verdict.items():
        lines.append(f"- {key}: default ({v['default']}) {v['default_mean']:.2f} vs best fixed ({v['best']}) "
                     f"{v['best_mean']:.2f}: {v['default_minus_best_pp']:+.2f} pp")  # fmt: skip
    return [*lines, ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--clothing", default=None)
    p.add_argument("--hymenoptera", default=None)
    p.add_argument("--quality", type=int, default=75)
    p.add_argument("--webp", action="store_true")
    p = sub.add_parser("run")
    p.add_argument("--pack", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--sets", nargs="+", default=["sign", "clothing", "hymenoptera"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--launch-until", type=float, default=1e9, help="start no run after this many seconds")
    p.add_argument("--hard-limit", type=float, default=1e9, help="kill what still runs after this many seconds")
    p.add_argument("--out-tar", default=None)
    p.add_argument("--settings", default="{}", help="JSON: finetune settings for every run (a toy check)")
    p = sub.add_parser("job")
    p.add_argument("spec")
    p = sub.add_parser("report")
    p.add_argument("--work", nargs="+", required=True)
    p.add_argument("--tag", required=True)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args)
    elif args.command == "run":
        run(args)
    elif args.command == "job":
        job(args.spec)
    else:
        report([Path(w) for w in args.work], args.tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
