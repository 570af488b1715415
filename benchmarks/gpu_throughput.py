"""Fine-tuning throughput on a GPU: the model's ceiling, edgetl end to end, and the usual loops.

One run, one machine, MobileNetV2 1.0 at 224x224, 10 classes, batch 256 unless noted:

- ceiling: synthetic tensors already on the GPU, bf16 autocast + channels_last, eager and with
  torch.compile, for phase 1 (backbone frozen, in eval mode) and phase 2 (last third unfrozen);
- edgetl: ``edgetl.train.finetune.finetune`` on a folder of generated 500x375 JPEGs (decoded once into a uint8
  cache, augmentation on the GPU), per epoch; the figure that counts is the mean of each phase's
  epochs after its first (the first compiles);
- seed loop: torchvision ImageFolder + DataLoader (RandomResizedCrop, flip, ToTensor, Normalize),
  fp32, batch 8, as the tutorials write it; and the same DataLoader feeding batch 256 bf16 +
  channels_last ("natural"), to show where the input pipeline caps a GPU.

Writes ``<out>/gpu_throughput_<tag>.{json,md}`` (default out: benchmarks/results).

    python benchmarks/gpu_throughput.py [--images 6000] [--workers 16] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import RESULTS, machine  # noqa: E402

CLASSES = 10


def _jpeg(job: tuple) -> None:
    """A photo-like JPEG, ``(path, seed)`` at 500x375 or ``(path, seed, width, height)``: smooth gradient,
    sharp-edged shapes, sensor noise (decodes like a photo); a larger size draws the same kind of picture
    at that resolution, with detail down to the pixel."""
    import numpy as np
    from PIL import Image, ImageDraw

    path, seed, *size = job
    w, h = size or (500, 375)
    k = w / 500  # shapes scale with the picture
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = (
        rng.uniform(0, 255, 3) + rng.uniform(-120, 120, 3) * xx[..., None] + rng.uniform(-120, 120, 3) * yy[..., None]
    )
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(3, 9)):
        x0, y0 = rng.integers(0, w - int(60 * k)), rng.integers(0, h - int(60 * k))
        box = [int(x0), int(y0), int(x0 + rng.integers(int(40 * k), int(220 * k))),
               int(y0 + rng.integers(int(40 * k), int(180 * k)))]  # fmt: skip
        draw.ellipse(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, np.float32) + rng.normal(0, 8, (h, w, 3))
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_dataset(root: Path, images: int, workers: int) -> None:
    jobs = []
    for i in range(images):
        folder = root / f"c{i % CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        jobs.append((str(folder / f"{i:05d}.jpg"), i))
    with Pool(workers) as pool:
        pool.map(_jpeg, jobs, chunksize=64)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _phase_setup(phase: int, device):
    import torch

    from edgetl.config import FinetuneConfig
    from edgetl.train.model import EdgeClassifier, default_unfreeze_from, set_train_mode, set_trainable
    from edgetl.train.optim import build_optimizer

    model = EdgeClassifier(CLASSES).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    unfreeze = default_unfreeze_from(model)
    set_trainable(model, phase, unfreeze)
    set_train_mode(model, phase, unfreeze, "frozen")
    optimizer, _ = build_optimizer(model, FinetuneConfig(), phase, unfreeze, 100)
    return model, optimizer


def ceiling(phase: int, compiled: bool, batch: int, size: int, device, steps: int = 40, warmup: int = 10) -> float:
    """Images/s of the training step alone on synthetic tensors already on ``device``."""
    import torch
    import torch.nn.functional as F

    model, optimizer = _phase_setup(phase, device)
    forward = torch.compile(model) if compiled else model
    x = torch.randint(0, 256, (batch, 3, size, size), device=device).float()
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch,), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t0)


def dataloader_loop(
    data: Path, phase: int, batch: int, fast: bool, workers: int, size: int, device, seconds: float = 20.0
) -> float:
    """Images/s of the ImageFolder + DataLoader loop (fp32 when not ``fast``), after 5 warm-up steps."""
    import torch
    import torch.nn.functional as F
    from torchvision import datasets, transforms

    model, optimizer = _phase_setup(phase, device)
    fast = fast and device.type == "cuda"
    if not fast:
        model = model.to(memory_format=torch.contiguous_format)
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])  # fmt: skip
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(str(data), tf), batch_size=batch, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=False,
    )  # fmt: skip
    # EdgeClassifier takes 0..255 pixels and normalises inside; feed it the tutorial's tensors
    # scaled back, so the work per image is the tutorial's plus one multiply.
    seen, t0 = 0, None
    for i, (x, y) in enumerate(loader):
        x = x.to(device, non_blocking=True) * 255.0
        y = y.to(device, non_blocking=True)
        if fast:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=fast):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if i == 5:
            _sync(device)
            t0 = time.perf_counter()
        elif i > 5:
            seen += len(y)
            if time.perf_counter() - t0 > seconds:
                break
    _sync(device)
    return seen / (time.perf_counter() - t0)


def edgetl_end_to_end(data: Path, run: Path, batch: int, epochs: int, workers: int, size: int, device,
                      placement: str = "auto") -> dict:  # fmt: skip
    """``finetune`` with the training images ``placement`` ("device": on the GPU; "stream": streamed from
    the image cache's memory map through pinned memory); the image cache is the caller's $EDGETL_CACHE_DIR."""
    from edgetl.config import FinetuneConfig
    from edgetl.train.finetune import finetune

    cfg = FinetuneConfig(batch_size=batch, head_epochs=epochs, finetune_epochs=epochs, weights="none",
                         compile=device.type == "cuda", device=device.type, patience=0, decode_workers=workers,
                         image_size=size, strategy="partial", data_placement=placement)  # fmt: skip
    import csv

    t0 = time.perf_counter()
    finetune(data, run, cfg)
    wall = time.perf_counter() - t0
    with open(run / "history.csv") as fh:
        history = [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(fh)]
    metrics = json.loads((run / "metrics.json").read_text())
    return {"wall_s": wall, "epochs": history, "placement": metrics["data"]["training_images"],
            "cache": metrics["data"]["cache"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per phase in the end-to-end run")
    parser.add_argument("--tag", default="h100")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--skip", default="", help="comma list of sections to skip: ceiling,edgetl,seed")
    parser.add_argument("--size", type=int, default=224, help="input side")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: only to check the script")
    parser.add_argument("--placements", default="device,stream",
                        help="edgetl runs, one per training-image placement (device: on the GPU; stream: streamed)")
    args = parser.parse_args()
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("skipped: no CUDA device (--device cpu checks the script at toy scale)", file=sys.stderr)
        return 0
    device = torch.device(args.device)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"machine": machine(), "images": args.images, "batch": args.batch, "device": args.device,
                    "model": f"MobileNetV2 1.0, {args.size}"}  # fmt: skip

    def save() -> None:
        (out / f"gpu_throughput_{args.tag}.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        (out / f"gpu_throughput_{args.tag}.md").write_text(markdown(result))

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["EDGETL_CACHE_DIR"] = str(Path(tmp) / "cache")  # the first edgetl run builds, the next reuse
        data = Path(tmp) / "jpegs"
        t0 = time.perf_counter()
        make_dataset(data, args.images, args.workers)
        result["dataset_s"] = time.perf_counter() - t0
        _measure(args, skip, device, data, Path(tmp), result, save)
    save()
    print(markdown(result))
    return 0


def _measure(args: argparse.Namespace, skip: set, device, data: Path, tmp: Path, result: dict, save) -> None:
    """The three sections (model ceiling, edgetl end to end, the tutorial-style loops), saved as they finish."""
    if "ceiling" not in skip:
        result["ceiling"] = {}
        for phase in (1, 2):
            for compiled in (False, True) if args.device == "cuda" else (False,):
                key = f"phase{phase}_{'compiled' if compiled else 'eager'}"
                result["ceiling"][key] = ceiling(phase, compiled, args.batch, args.size, device)
                logging.info("ceiling %s: %.0f img/s", key, result["ceiling"][key])
                save()
    if "edgetl" not in skip:
        result["edgetl"] = {}
        for placement in args.placements.split(","):
            result["edgetl"][placement] = edgetl_end_to_end(data, tmp / f"run-{placement}", args.batch, args.epochs,
                                                            args.workers, args.size, device, placement)  # fmt: skip
            save()
    if "seed" not in skip:
        result["seed_loop"] = {}
        for phase in (1, 2):
            loop = {"workers": args.workers, "size": args.size, "device": device}
            result["seed_loop"][f"phase{phase}_fp32_b8"] = dataloader_loop(data, phase, 8, False, **loop)
            if args.device == "cuda":
                result["seed_loop"][f"phase{phase}_bf16_b{args.batch}"] = dataloader_loop(
                    data, phase, args.batch, True, **loop
                )
            logging.info("seed loops phase %d: %s", phase, result["seed_loop"])
            save()


def _phase_rate(epochs: list[dict], phase: int) -> float | None:
    rows = [e for e in epochs if int(e["phase"]) == phase]
    steady = rows[1:] or rows
    return sum(e["images_per_s"] for e in steady) / len(steady) if steady else None


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [
        f"# Fine-tuning throughput on {m.get('gpu') if r.get('device', 'cuda') == 'cuda' else 'CPU'} "
        f"({r['model']}, batch {r['batch']})",
        "",
        f"Host: {m['cpu']}, {m['cpus']} CPUs, torch {m['torch']}. Data: {r['images']} generated 500x375 JPEGs, "
        f"{CLASSES} classes (80 % train). One run. Produced by benchmarks/gpu_throughput.py.",
        "",
        "| | phase 1 (frozen) img/s | phase 2 (last third unfrozen) img/s |",
        "|---|---|---|",
    ]
    def row(label: str, one: float | None, two: float | None, fmt: str = ",.0f") -> None:
        cell = lambda v: "-" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {label} | {cell(one)} | {cell(two)} |")

    c, runs, s, b = r.get("ceiling", {}), r.get("edgetl") or {}, r.get("seed_loop", {}), r["batch"]
    if c:
        row("ceiling, eager (synthetic tensors on the device)", c.get("phase1_eager"), c.get("phase2_eager"))
        row("ceiling, torch.compile", c.get("phase1_compiled"), c.get("phase2_compiled"))
    for placement, e in runs.items():
        p1, p2 = _phase_rate(e["epochs"], 1), _phase_rate(e["epochs"], 2)
        row(f"**edgetl finetune**, images {e.get('placement', placement)}, epochs after each phase's first", p1, p2)
        best = "compiled" if "phase1_compiled" in c else "eager"
        if c and p1 and p2:
            row(f"ratio edgetl ({placement}) / {best} ceiling", p1 / c[f"phase1_{best}"], p2 / c[f"phase2_{best}"],
                ".2f")  # fmt: skip
    if s:
        row("seed loop: ImageFolder + DataLoader, fp32, batch 8", s.get("phase1_fp32_b8"), s.get("phase2_fp32_b8"))
        row(f"same DataLoader, bf16 + channels_last, batch {b}", s.get(f"phase1_bf16_b{b}"),
            s.get(f"phase2_bf16_b{b}"))  # fmt: skip
    for placement, e in runs.items():
        decode = "reused from the image cache" if e.get("cache", {}).get("train", {}).get("reused") else "decoded"
        wall = (f"edgetl end to end, images {e.get('placement', placement)} ({decode}), wall time (data, "
                f"{len(e['epochs'])} epochs, compile, validation, final evaluation and plots): {e['wall_s']:.1f} s.")
        lines += ["", wall, "", "| epoch | phase | img/s | train-loop s |", "|---|---|---|---|"]
        for ep in e["epochs"]:
            rate, secs = ep["images_per_s"], ep["seconds"]
            lines.append(f"| {int(ep['epoch'])} | {int(ep['phase'])} | {rate:,.0f} | {secs:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
