"""What verifying a decoded-image cache entry costs, against an epoch of training on it.

Every time an entry is opened (:mod:`edgetl.data.cache_meta`) its meta.json is checked and every stored
image is hashed (SHA-256, in threads). This times, for a ``--images``-image training split at 224 px
(stored at the 256-px resize side, the default recipe's):

- opening the entry with and without the verification (``--repeats`` times each, the file in the page
  cache; and once after dropping the page cache, when this process may: root on Linux);
- a training epoch on the same images, estimated from ``--steps`` timed steps of batch 32 after one
  warm-up step, for phase 1 (the head on a frozen backbone, the cheapest epoch) and phase 2 (every block),
  MobileNetV2 width 1.0, torch on all of this machine's CPUs (on a GPU an epoch is far shorter: see the
  note in the output).

Images are generated 500x375 photo-like JPEGs (``gpu_throughput._jpeg``). Writes
``benchmarks/results/cache_verify.{json,md}``.

    python benchmarks/cache_verify.py --work /tmp/cache-verify [--images 3000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from multiprocessing import Pool
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import machine, write_result  # noqa: E402
from gpu_throughput import _jpeg  # noqa: E402


def make_data(root: Path, images: int, classes: int = 10) -> Path:
    jobs = [(root / f"c{i % classes:02d}" / f"{i:05d}.jpg", i) for i in range(images)]
    todo = [job for job in jobs if not job[0].is_file()]
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    with Pool() as pool:
        pool.map(_jpeg, todo)
    return root


def drop_page_cache() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        return True
    except OSError:
        return False


def time_open(samples, spec, root: Path, repeats: int) -> dict:
    from edgetl.data.cache import _open, entry_key

    key = entry_key(samples, spec.resize_size, spec, False)
    entry = root / key
    result = {}
    for verify in (False, True):
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            opened = _open(entry, key, samples, verify=verify)
            assert isinstance(opened, tuple), opened
            if not verify:
                for start in range(0, len(opened[0]), 256):  # read every page, as hashing and training do
                    int(opened[0][start : start + 256].max())
            seconds.append(time.perf_counter() - started)
        result["verified" if verify else "unverified_read_all"] = seconds
    if drop_page_cache():
        started = time.perf_counter()
        _open(entry, key, samples, verify=True)
        result["verified_cold"] = [time.perf_counter() - started]
    return result


def time_epoch(images, labels, steps: int) -> dict:
    import torch

    from edgetl.train.model import EdgeClassifier, set_trainable

    model = EdgeClassifier(len(set(labels.tolist())), 1.0)
    loss_fn = torch.nn.CrossEntropyLoss()
    out = {}
    for phase in (1, 2):
        set_trainable(model, phase, 0 if phase == 2 else len(model.features))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        model.train()
        times = []
        for step in range(steps + 1):
            batch = torch.from_numpy(images[step * 32 : (step + 1) * 32, 16:240, 16:240]).permute(0, 3, 1, 2)
            x = batch.float()  # the model normalises its 0..255 input itself
            y = torch.from_numpy(labels[step * 32 : (step + 1) * 32])
            started = time.perf_counter()
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
            if step:
                times.append(time.perf_counter() - started)
        out[f"phase{phase}_step_s"] = times
        out[f"phase{phase}_epoch_s_estimate"] = statistics.median(times) * len(images) / 32
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    from edgetl.data.cache import load_split
    from edgetl.data.folders import discover
    from edgetl.runtime.preprocess import PreprocessSpec

    data = make_data(args.work / "data", args.images)
    spec = PreprocessSpec.for_size(224)
    samples = sorted(discover(data, val_fraction=0.01).train + discover(data, val_fraction=0.01).val,
                     key=lambda s: str(s.path))  # fmt: skip
    root = args.work / "cache"
    started = time.perf_counter()
    built = load_split(samples, spec.resize_size, spec, eval_crop=False, root=root)
    build_s = time.perf_counter() - started
    opened = time_open(samples, spec, root, args.repeats)
    epoch = time_epoch(built.images, built.labels, args.steps)
    result = {"machine": machine(), "images": len(samples), "stored_side": spec.resize_size,
              "entry_bytes": int(built.images.nbytes), "build_s": build_s, "open": opened, "epoch": epoch}  # fmt: skip
    verify = statistics.median(opened["verified"]) - statistics.median(opened["unverified_read_all"])
    rows = [f"| open, verified (warm page cache) | {statistics.median(opened['verified']):.3f} s |",
            f"| open + read every page, unverified (warm) | {statistics.median(opened['unverified_read_all']):.3f} s |",
            f"| hashing's own cost (the difference) | {verify:.3f} s |"]  # fmt: skip
    if "verified_cold" in opened:
        rows.append(f"| open, verified, page cache dropped first | {opened['verified_cold'][0]:.3f} s |")
    for phase in (1, 2):
        estimate = epoch[f"phase{phase}_epoch_s_estimate"]
        rows.append(f"| phase-{phase} epoch, estimated | {estimate:.0f} s "
                    f"(verified open = {100 * statistics.median(opened['verified']) / estimate:.2f} %) |")  # fmt: skip
    m = result["machine"]
    markdown = f"""# Cache verification cost

`python benchmarks/cache_verify.py --work DIR --images {args.images}` on {m['cpu']} ({m['cpus']} CPUs), torch
{m.get('torch')}, commit {m.get('git_commit')}. {len(samples)} generated 500x375 JPEGs stored at
{spec.resize_size} px ({result['entry_bytes'] / 2**20:,.0f} MiB entry, built in {build_s:.1f} s); opens timed
{args.repeats} times each (median shown); epochs estimated from the median of {args.steps} timed steps of
batch 32 (MobileNetV2 width 1.0, 224 px, random init, after one warm-up step).

| what | seconds |
|---|---|
{chr(10).join(rows)}

The verification runs once per process that opens the entry (a run, a resume, each DDP rank), not per
epoch. It reads every page of the entry, which the first epoch reads anyway; the difference row is what
hashing adds. On a GPU an epoch of {len(samples)} images takes seconds, not minutes, so the same
verification is a larger share of one epoch there (not measured here: no GPU on this machine).
"""
    write_result("cache_verify", result, markdown)


if __name__ == "__main__":
    main()
