"""Freeze-then-unfreeze fine-tuning of MobileNetV2 into a run directory.

Phase 1 trains a new head on a frozen backbone (no gradients, BatchNorm in eval mode). Phase 2
unfreezes ``features[unfreeze_from:]`` and continues with a lower learning rate for the backbone, a
linear warm-up and a cosine decay, and early stopping on validation loss. The best epoch's weights are
what the run keeps.

The input pipeline decodes every image once into uint8 memory; random resized crops, flips and colour
jitter are done on whole batches with tensor ops on the training device.

After every epoch the complete training state is saved atomically to ``checkpoints/last.pt``; a run
stopped by Ctrl-C or a kill resumes from there with ``resume=True``.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetl import __version__
from edgetl.artifacts import atomic_path, atomic_write, read_manifest, run_lock, update_manifest, write_json
from edgetl.config import FinetuneConfig
from edgetl.data import DatasetSplits, LoadedSplit, discover, load_split
from edgetl.distributed import Context
from edgetl.errors import ConfigError, DataError, Interrupted, RunDirError, TrainingDiverged, first_line
from edgetl.hostmem import retained_heap
from edgetl.model import (
    EdgeClassifier,
    default_unfreeze_from,
    load_initial_weights,
    set_train_mode,
    set_trainable,
)
from edgetl.runtime.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgetl-checkpoint"
CHECKPOINT_VERSION = 1
STATE_PATH = "checkpoints/last.pt"
HISTORY_FIELDS = [
    "epoch",
    "phase",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr_head",
    "lr_backbone",
    "images_per_s",
    "seconds",
]
# Settings that may differ between the start of a run and its resumption.
RESUMABLE_OVERRIDES = frozenset({"device", "decode_workers", "compile"})


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced. Paths are inside ``run_dir``."""

    run_dir: Path
    classes: list[str]
    best_epoch: int
    best_val_loss: float
    best_val_acc: float
    phase1_val_acc: float | None  # best validation accuracy within phase 1
    phase2_val_acc: float | None  # best validation accuracy within phase 2
    test_acc: float | None
    epochs_run: int
    stopped_early: bool
    skipped_files: int
    device: str
    seconds: float
    files: list[str] = field(default_factory=list)
    processes: int = 1  # data-parallel processes that trained it

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["run_dir"] = str(self.run_dir)
        return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- augmentation


def augment(
    batch: torch.Tensor, out_size: int, cfg: FinetuneConfig, generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop, horizontal flip and colour jitter for a whole batch.

    Args:
        batch: uint8 ``[N, S, S, 3]`` square training images on the training device.
        out_size: side of the output crops.
        cfg: augmentation settings (``min_crop_scale``, ``flip``, ``color_jitter``).
        generator: random source on the same device, so runs are reproducible.

    Returns:
        float ``[N, 3, out_size, out_size]`` pixels in 0..255.
    """
    n = batch.shape[0]
    device = batch.device
    pixels = batch.permute(0, 3, 1, 2).float()

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) * (high - low) + low

    # One affine grid per image: crop area fraction, aspect ratio, position and flip.
    area = uniform(cfg.min_crop_scale, 1.0)
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
    shift_x = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - crop_w)
    shift_y = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - crop_h)
    sign = torch.ones(n, device=device)
    if cfg.flip:
        sign = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = crop_w * sign
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        shape = (n, 1, 1, 1)
        grey = (pixels * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(
            1, keepdim=True
        )
        saturation = uniform(1 - j, 1 + j).view(shape)
        pixels = grey + (pixels - grey) * saturation
        contrast = uniform(1 - j, 1 + j).view(shape)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        pixels = mean + (pixels - mean) * contrast
        brightness = uniform(1 - j, 1 + j).view(shape)
        pixels = pixels * brightness
    return pixels.clamp_(0, 255)


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in 0..255 (eval input, no augmentation)."""
    return batch.permute(0, 3, 1, 2).float()


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 64
) -> np.ndarray:
    """Float32 logits of ``model`` on eval-preprocessed uint8 NHWC images."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        with _autocast(device):
            outputs.append(model(_channels_last(to_model_input(batch), device)).float().cpu())
    if not outputs:
        return np.zeros((0, 0), np.float32)
    return torch.cat(outputs).numpy()


def classification_metrics(logits: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Top-1 (and top-5 with >= 5 classes), loss, per-class accuracy and confusion matrix."""
    num_classes = len(classes)
    if len(labels) == 0:
        return {"count": 0}
    preds = logits.argmax(1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, preds), 1)
    per_class = {}
    for i, name in enumerate(classes):
        total = int(confusion[i].sum())
        per_class[name] = float(confusion[i, i] / total) if total else None
    loss = F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)).item()
    metrics = {
        "count": int(len(labels)),
        "top1": float((preds == labels).mean()),
        "loss": float(loss),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes >= 5:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        metrics["top5"] = float((top5 == labels[:, None]).any(1).mean())
    return metrics


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _channels_last(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


# ----------------------------------------------------------------------------- optimisers


def build_optimizer(
    model: EdgeClassifier, cfg: FinetuneConfig, phase: int, unfreeze_from: int, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Phase 1: AdamW on the head at ``lr``, constant. Phase 2: head and backbone parameter groups,
    backbone LR = head LR x ``backbone_lr_mult``, linear warm-up then cosine decay (per step)."""
    if phase == 1:
        groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    head_lr = cfg.phase2_head_lr
    backbone = [p for block in model.features[unfreeze_from:] for p in block.parameters()]
    groups = [{"params": list(model.head.parameters()), "lr": head_lr, "name": "head"}]
    if backbone:
        groups.append({"params": backbone, "lr": head_lr * cfg.backbone_lr_mult, "name": "backbone"})
    optimizer = torch.optim.AdamW(groups, lr=head_lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.finetune_epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _group_lr(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return float(group["lr"])
    return None


# ----------------------------------------------------------------------------- training


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True,
        disable=None if enabled else True,
    )  # fmt: skip


def train_one_epoch(
    model: EdgeClassifier,
    train: LoadedSplit,
    train_on_device: torch.Tensor,
    cfg: FinetuneConfig,
    phase: int,
    unfreeze_from: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    desc: str,
    forward: nn.Module | None = None,
    ctx: Context = Context(),  # noqa: B008 - frozen
) -> dict[str, float]:
    """One pass over the training split. Returns loss, accuracy and images/s (all ranks together).

    ``forward`` is what the batches go through (the DDP wrapper, a compiled module); ``model`` by
    default. Under DDP each rank takes every ``world``-th image of each global batch. Loss and
    accuracy accumulate on the device: no host synchronisation per step.
    """
    forward = forward or model
    set_train_mode(model, phase, unfreeze_from, cfg.bn)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train.labels))
    epoch_seed = cfg.seed * 100_003 + epoch + 7_919 * ctx.rank
    torch.manual_seed(epoch_seed)  # dropout: a resumed run draws what the uninterrupted one would
    generator = torch.Generator(device=device).manual_seed(epoch_seed)
    labels_all = torch.from_numpy(train.labels).to(device)
    # Drop a last batch of one: BatchNorm in train mode cannot normalise a single sample.
    n_used = len(order) - 1 if len(order) % cfg.batch_size == 1 and len(order) > 1 else len(order)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    order_on_device = torch.from_numpy(order).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with _progress(n_used, desc, ctx.is_main) as bar:
        for begin in range(0, n_used, cfg.batch_size):
            index = order_on_device[begin : min(begin + cfg.batch_size, n_used)][ctx.rank :: ctx.world]
            pixels = augment(train_on_device[index], cfg.image_size, cfg, generator)
            labels = labels_all[index]
            with _autocast(device):
                logits = forward(_channels_last(pixels, device))
                loss = criterion(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            batch = len(index)
            loss_sum += loss.detach().double() * batch
            correct += (logits.argmax(1) == labels).sum()
            seen += batch
            if ctx.is_main:
                bar.update(batch * ctx.world)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    loss_total, correct_total, seen_total = ctx.sum(loss_sum.item(), float(correct.item()), float(seen))
    return {
        "train_loss": loss_total / max(seen_total, 1),
        "train_acc": correct_total / max(seen_total, 1),
        "images_per_s": seen_total / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _phase_of(epoch: int, cfg: FinetuneConfig) -> int:
    return 1 if epoch < cfg.head_epochs else 2


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_path`. torch reports a full disk as a RuntimeError from its
    zip writer ("unexpected pos ..."); it becomes the OSError it is, so the CLI says "no space left"."""
    import errno

    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            stats = os.statvfs(tmp.parent)
            if stats.f_bavail * stats.f_frsize < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise RunDirError(f"cannot write {path}: {first_line(exc)}") from None


def _save_state(run_dir: Path, state: dict[str, Any]) -> None:
    save_atomically(state, run_dir / STATE_PATH)


def _load_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_PATH
    if not path.is_file():
        raise RunDirError(
            f"nothing to resume: {path} does not exist",
            hint="start the run without --resume",
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise RunDirError(f"cannot read {path}: {first_line(exc)}") from None


def _check_resume_config(stored: dict[str, Any], given: dict[str, Any]) -> None:
    for key, value in given.items():
        if value is None or key in RESUMABLE_OVERRIDES:
            continue
        if key in stored and stored[key] != value:
            raise ConfigError(
                f"--resume continues with the run's stored settings, but {key}={value!r} was given "
                f"(the run has {stored[key]!r})",
                hint="drop the option, or start a new run with --out elsewhere",
            )


def finetune(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: FinetuneConfig,
    *,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
) -> FinetuneResult | None:
    """Fine-tune MobileNetV2 on an image folder into ``run_dir``, holding the run's lock (rank 0).

    See :func:`_finetune` for the arguments. Raises :class:`edgetl.errors.RunLocked` when another
    process writes the same run, and ConfigError when ``run_dir`` lies inside the dataset (the next
    run would train on its files).
    """
    run_dir = Path(run_dir).expanduser()
    data_root = Path(data).expanduser().resolve()
    if data_root.is_dir() and run_dir.resolve().is_relative_to(data_root):
        raise ConfigError(f"the run folder {run_dir} is inside the dataset {data}",
                          hint="choose an --out outside the dataset folder")  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes (edgetl.distributed)
        return _finetune(data, run_dir, cfg, resume, overrides)
    with run_lock(run_dir, "finetune"):
        return _finetune(data, run_dir, cfg, resume, overrides)


def _finetune(data: str | os.PathLike, run_dir: Path, cfg: FinetuneConfig, resume: bool,
              overrides: dict[str, Any] | None) -> FinetuneResult | None:  # fmt: skip
    """Fine-tune MobileNetV2 on an image folder and write the run directory.

    Args:
        data: dataset folder (see :mod:`edgetl.data`).
        run_dir: output folder; created if needed. Must not hold another run unless ``resume``.
        cfg: the resolved configuration.
        resume: continue the run in ``run_dir`` from its last completed epoch.
        overrides: the options the user gave explicitly; with ``resume`` they must agree with the
            stored configuration (except the device).

    Returns:
        A :class:`FinetuneResult`; None on the ranks other than 0 of a distributed run (see
        :mod:`edgetl.distributed`), which write nothing.

    Raises:
        DataError, WeightsError, ConfigError, RunDirError: bad input; nothing is overwritten.
        Interrupted: Ctrl-C; state up to the last completed epoch is saved.
    """
    started = time.perf_counter()
    run_dir = Path(run_dir).expanduser()
    state: dict[str, Any] | None = None
    if resume:
        state = _load_state(run_dir)
        _check_resume_config(state["config"], overrides or {})
        stored = dict(state["config"])
        for key in RESUMABLE_OVERRIDES:
            if (overrides or {}).get(key) is not None:
                stored[key] = overrides[key]
        cfg = FinetuneConfig.build(stored)
    elif (run_dir / STATE_PATH).exists() or (run_dir / "model.pt").exists():
        raise RunDirError(
            f"{run_dir} already holds a fine-tuning run",
            hint="add --resume to continue it, or choose another --out",
        )

    from edgetl import distributed

    device = resolve_device(cfg.device)
    ctx = distributed.context(device)
    device = ctx.device(device)
    if not ctx.is_main:
        logging.getLogger("edgetl").setLevel(logging.WARNING)
    elif ctx.enabled:
        log.info("data-parallel on %d processes (%s)", ctx.world, torch.distributed.get_backend())
    seed_everything(cfg.seed)
    splits = discover(data, cfg.val_fraction, cfg.seed)
    fingerprint = splits.fingerprint()
    if state is not None and state["data_fingerprint"] != fingerprint:
        raise DataError(
            f"the data in {splits.root} differs from the data this run started with",
            hint="resume with the same dataset, or start a new run",
        )
    log.info(
        "%d classes; %d train / %d val / %d test images (%s layout)",
        len(splits.classes),
        *splits.counts().values(),
        splits.layout,
    )

    spec = PreprocessSpec.for_size(cfg.image_size)
    model = EdgeClassifier(len(splits.classes), cfg.width, spec.mean, spec.std, cfg.dropout)
    unfreeze_from = cfg.unfreeze_from if cfg.unfreeze_from is not None else default_unfreeze_from(model)
    if unfreeze_from > len(model.features):
        raise ConfigError(
            f"--unfreeze-from {unfreeze_from} is past the last block ({len(model.features) - 1})"
        )
    if state is None:
        weights_source = load_initial_weights(model, cfg.weights, cfg.width)
        history: list[dict[str, Any]] = []
        best = {"val_loss": math.inf, "epoch": -1, "state": None}
        epochs_since_best, stopped_early, next_epoch = 0, False, 0
    else:
        weights_source = state["weights_source"]
        model.load_state_dict(state["model"])
        history = state["history"]
        best = state["best"]
        epochs_since_best = state["epochs_since_best"]
        stopped_early = state["stopped_early"]
        next_epoch = state["next_epoch"]
        log.info("resuming %s at epoch %d", run_dir, next_epoch + 1)
    # Decoding comes after the weights are resolved, so that bad weights fail fast.
    skipped: list[dict[str, str]] = []
    loaded = _load_data(splits, spec, cfg, skipped)
    overlap = held_out_overlap(loaded)
    train, val, test = loaded["train"], loaded["val"], loaded["test"]
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)

    train_on_device = torch.from_numpy(train.images).to(device)
    steps_per_epoch = max(1, math.ceil(len(train.labels) / cfg.batch_size))
    total_epochs = cfg.head_epochs + cfg.finetune_epochs
    optimizer = scheduler = None
    optimizer_phase = None
    config_dict = cfg.to_dict()

    epoch = saved_epochs = next_epoch
    with retained_heap(device.type == "cpu"):  # edgetl.hostmem: 1.3-3.8x faster epochs on the CPU
        try:
            while epoch < total_epochs and not stopped_early:
                phase = _phase_of(epoch, cfg)
                if optimizer_phase != phase:
                    set_trainable(model, phase, unfreeze_from)
                    forward = distributed.wrap(model, ctx, device)  # DDP hooks follow requires_grad
                    if cfg.compile and device.type == "cuda":
                        forward = torch.compile(forward)
                    optimizer, scheduler = build_optimizer(model, cfg, phase, unfreeze_from, steps_per_epoch)
                    optimizer_phase = phase
                    if state is not None and state["optimizer_phase"] == phase and state["optimizer"]:
                        optimizer.load_state_dict(state["optimizer"])
                        scheduler.load_state_dict(state["scheduler"])
                lr_head = _group_lr(optimizer, "head")
                lr_backbone = _group_lr(optimizer, "backbone")
                desc = f"epoch {epoch + 1}/{total_epochs} (phase {phase})"
                stats = train_one_epoch(
                    model, train, train_on_device, cfg, phase, unfreeze_from,
                    optimizer, scheduler, device, epoch, desc, forward, ctx,
                )  # fmt: skip
                val_logits = predict_logits(model, val.images, device)
                val_metrics = classification_metrics(val_logits, val.labels, splits.classes)
                _refuse_divergence(epoch, stats["train_loss"], val_metrics["loss"], saved_epochs, run_dir)
                row = {
                    "epoch": epoch + 1,
                    "phase": phase,
                    **stats,
                    "val_loss": val_metrics["loss"],
                    "val_acc": val_metrics["top1"],
                    "lr_head": lr_head,
                    "lr_backbone": lr_backbone,
                }
                history.append(row)
                log.info(
                    "%s: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f img/s",
                    desc, row["train_loss"], row["train_acc"], row["val_loss"], row["val_acc"],
                    row["images_per_s"],
                )  # fmt: skip
                if row["val_loss"] < best["val_loss"]:
                    best = {"val_loss": row["val_loss"], "epoch": epoch + 1, "state": _cpu_state(model)}
                    epochs_since_best = 0
                elif phase == 2:
                    epochs_since_best += 1
                if phase == 2 and cfg.patience and epochs_since_best >= cfg.patience:
                    log.info("early stop: no better validation loss for %d epochs", cfg.patience)
                    stopped_early = True
                stopped_early = ctx.broadcast_flag(stopped_early)  # every rank stops together
                epoch += 1
                if not ctx.is_main:
                    state = None
                    continue
                _save_state(
                    run_dir,
                    {
                        "format": CHECKPOINT_FORMAT + "-state",
                        "config": config_dict,
                        "data_fingerprint": fingerprint,
                        "weights_source": weights_source,
                        "model": _cpu_state(model),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "optimizer_phase": phase,
                        "history": history,
                        "best": best,
                        "epochs_since_best": epochs_since_best,
                        "stopped_early": stopped_early,
                        "next_epoch": epoch,
                    },
                )
                saved_epochs = epoch
                state = None  # optimizer state from a resumed checkpoint applies to its phase only once
        except KeyboardInterrupt:
            if not saved_epochs:
                raise Interrupted("interrupted before the first epoch ended; nothing was saved",
                                  hint=f"start again: edgetl finetune {data} --out {run_dir}") from None  # fmt: skip
            raise Interrupted(
                f"interrupted; {saved_epochs} of {total_epochs} epochs are saved in {run_dir / STATE_PATH}",
                hint=f"continue at epoch {saved_epochs + 1} with: edgetl finetune {data} --out {run_dir} --resume",
            ) from None

    ctx.close()  # no collectives after training: rank 0 finalises alone
    if not ctx.is_main:
        return None
    model.load_state_dict(best["state"])
    result = _finalize(
        run_dir, model, splits, spec, cfg, device, val, test, history, best, skipped,
        weights_source, unfreeze_from, fingerprint, stopped_early, overlap,
    )  # fmt: skip
    result.seconds = time.perf_counter() - started
    result.processes = ctx.world
    return result


def _refuse_divergence(epoch: int, train_loss: float, val_loss: float, saved_epochs: int, run_dir: Path) -> None:
    """Stop a run whose loss went non-finite, before its state overwrites the last good checkpoint."""
    if math.isfinite(train_loss) and math.isfinite(val_loss):
        return
    kept = (f"the last good state (epoch {saved_epochs}) is kept in {run_dir / STATE_PATH}" if saved_epochs
            else "no epoch had finished, nothing was saved")  # fmt: skip
    raise TrainingDiverged(
        f"training diverged in epoch {epoch + 1} (train loss {train_loss:.4g}, val loss {val_loss:.4g}); {kept}",
        hint="start a new run with a lower --lr / --finetune-lr",
    )


def _load_data(
    splits: DatasetSplits, spec: PreprocessSpec, cfg: FinetuneConfig, skipped: list[dict[str, str]]
) -> dict[str, LoadedSplit]:
    loaded = {}
    for name, eval_crop in (("train", False), ("val", True), ("test", True)):
        samples = getattr(splits, name)
        t0 = time.perf_counter()
        with _progress(len(samples), f"decoding {name}") as bar:
            loaded[name] = load_split(
                samples, spec.resize_size, spec, eval_crop=eval_crop,
                workers=cfg.decode_workers, skipped=skipped,
                progress=lambda done, bar=bar: bar.update(done - bar.n),
            )  # fmt: skip
        if samples:
            log.info("decoded %d %s images in %.1fs", len(samples), name, time.perf_counter() - t0)
    present = set(loaded["train"].labels.tolist())
    missing = [c for i, c in enumerate(splits.classes) if i not in present]
    if missing:
        raise DataError(f"no readable training images left for class(es): {', '.join(missing)}")
    return loaded


def held_out_overlap(loaded: dict[str, LoadedSplit]) -> dict[str, int]:
    """How many validation and test images are also training images (same decoded pixels).

    Every validation image in training is refused: the accuracy and early stopping would measure
    memory, not the model. Some is warned about loudly and recorded in metrics.json.

    Raises:
        DataError: the validation split is wholly contained in the training split.
    """
    seen = set(loaded["train"].digests)
    overlap = {name: sum(d in seen for d in loaded[name].digests) for name in ("val", "test")}
    val_count = len(loaded["val"].digests)
    if val_count and overlap["val"] == val_count:
        raise DataError(f"all {val_count} validation images are also training images (same pixels)",
                        hint="give val/ images that are not in train/, or drop val/ to split train/")  # fmt: skip
    for name, count in overlap.items():
        if count:
            log.warning("%d of %d %s images are ALSO TRAINING IMAGES (same pixels): their accuracy overstates "
                        "the model; remove them from one of the splits", count, len(loaded[name].digests), name)
    return overlap


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _history_csv(history: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(row.get(k)) for k in HISTORY_FIELDS})
    return out.getvalue()


def _best_in_phase(history: list[dict[str, Any]], phase: int) -> float | None:
    accs = [row["val_acc"] for row in history if row["phase"] == phase]
    return max(accs) if accs else None


def _finalize(
    run_dir: Path,
    model: EdgeClassifier,
    splits: DatasetSplits,
    spec: PreprocessSpec,
    cfg: FinetuneConfig,
    device: torch.device,
    val: LoadedSplit,
    test: LoadedSplit,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    skipped: list[dict[str, str]],
    weights_source: str,
    unfreeze_from: int,
    fingerprint: str,
    stopped_early: bool,
    overlap: dict[str, int],
) -> FinetuneResult:
    """Evaluate the best weights and write every artifact of the run."""
    from edgetl import report

    val_logits = predict_logits(model, val.images, device)
    val_metrics = classification_metrics(val_logits, val.labels, splits.classes)
    test_metrics = (
        classification_metrics(predict_logits(model, test.images, device), test.labels, splits.classes)
        if len(test.labels)
        else None
    )
    arch = {"name": "mobilenet_v2", "width": cfg.width, "num_classes": len(splits.classes)}
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "edgetl_version": __version__,
        "arch": arch,
        "state_dict": {k: v.cpu() for k, v in best["state"].items()},
        "labels": list(splits.classes),
        "preprocess": spec.to_dict(),
        "config": cfg.to_dict(),
        "best_epoch": best["epoch"],
    }
    save_atomically(checkpoint, run_dir / "model.pt")
    atomic_write(run_dir / "labels.txt", "".join(f"{c}\n" for c in splits.classes))
    atomic_write(run_dir / "history.csv", _history_csv(history))
    metrics = {
        "best_epoch": best["epoch"],
        "val": val_metrics,
        "test": test_metrics,
        "phase1_best_val_acc": _best_in_phase(history, 1),
        "phase2_best_val_acc": _best_in_phase(history, 2),
        "stopped_early": stopped_early,
        "epochs_run": len(history),
        "counts": {
            "train": len(splits.train),
            "val": len(splits.val),
            "test": len(splits.test),
            "skipped": len(skipped),
            "val_in_train": overlap["val"],
            "test_in_train": overlap["test"],
        },
        "skipped_files": skipped,
        "classes": splits.classes,
    }
    write_json(run_dir / "metrics.json", metrics)
    report.training_curves(history, cfg.head_epochs, run_dir / "training.png")
    report.confusion_matrix(val_metrics["confusion_matrix"], splits.classes, run_dir / "confusion.png")

    files = ["model.pt", "labels.txt", "history.csv", "metrics.json", "training.png", "confusion.png"]
    update_manifest(
        run_dir,
        "finetune",
        files,
        {
            "arch": arch,
            "labels": list(splits.classes),
            "preprocess": spec.to_dict(),
            "config": cfg.to_dict(),
            "unfreeze_from": unfreeze_from,
            "weights": weights_source,
            "data": {"root": str(splits.root), "layout": splits.layout, "fingerprint": fingerprint},
            # images decoded per split (unreadable ones skipped): package's minimum parity evidence
            "counts": {"val": len(val.labels), "test": len(test.labels)},
            "best_epoch": best["epoch"],
            "val_top1": val_metrics["top1"],
            "test_top1": test_metrics["top1"] if test_metrics else None,
            "device": str(device),
            "versions": {"torch": torch.__version__, "torchvision": _torchvision_version()},
        },
    )
    return FinetuneResult(
        run_dir=run_dir,
        classes=list(splits.classes),
        best_epoch=best["epoch"],
        best_val_loss=float(best["val_loss"]),
        best_val_acc=val_metrics["top1"],
        phase1_val_acc=_best_in_phase(history, 1),
        phase2_val_acc=_best_in_phase(history, 2),
        test_acc=test_metrics["top1"] if test_metrics else None,
        epochs_run=len(history),
        stopped_early=stopped_early,
        skipped_files=len(skipped),
        device=str(device),
        seconds=0.0,
        files=files,
    )


def _torchvision_version() -> str:
    import torchvision

    return torchvision.__version__


def load_checkpoint(run_dir: str | os.PathLike, name: str = "model.pt") -> tuple[EdgeClassifier, dict[str, Any]]:
    """Load a finished run's best model (in eval mode, on the CPU) and its checkpoint metadata.

    ``name``: another checkpoint of the same format in the run, e.g. a QAT run's ``model_qat.pt``.

    Raises:
        RunDirError: no finished fine-tuning in ``run_dir`` or an unreadable checkpoint.
    """
    run_dir = Path(run_dir)
    path = run_dir / name
    if not path.is_file():
        raise RunDirError(f"{run_dir} has no {name}", hint="run edgetl finetune first")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RunDirError(f"cannot read {path}: {first_line(exc)}") from None
    if checkpoint.get("format") != CHECKPOINT_FORMAT or checkpoint.get("version") != CHECKPOINT_VERSION:
        raise RunDirError(f"{path} is not an edgetl checkpoint of version {CHECKPOINT_VERSION}")
    spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    arch = checkpoint["arch"]
    model = EdgeClassifier(arch["num_classes"], arch["width"], spec.mean, spec.std)
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    read_manifest(run_dir)  # a run dir with an unreadable manifest is not trusted either
    return model, checkpoint
