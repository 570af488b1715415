"""The one training loop and the one evaluation, shared by fine-tuning and quantisation-aware training.

:func:`train_one_epoch` passes a split once through whatever module it is given (the model, its DDP
wrapper, a compiled module, QAT's int8 simulation) with the batched augmentation and a loss
(cross-entropy by default; QAT adds its distillation terms). :func:`predict_logits` and
:func:`classification_metrics` evaluate; :func:`top1` and :func:`agreement` are the two numbers every
stage reports.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetl.config import FinetuneConfig
from edgetl.train.augment import augment, to_model_input
from edgetl.train.batches import Resident, Source, Streamed
from edgetl.train.distributed import Context

# (augmented pixels, logits, labels) -> the batch's loss
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def channels_last(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x


def progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    return tqdm(
        total=total, desc=desc, unit="img", file=sys.stderr, leave=False, dynamic_ncols=True,
        disable=None if enabled else True,
    )  # fmt: skip


def train_one_epoch(
    forward: nn.Module,
    images: torch.Tensor | Source,
    labels: np.ndarray,
    cfg: FinetuneConfig,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    device: torch.device,
    epoch: int,
    *,
    desc: str = "",
    ctx: Context = Context(),  # noqa: B008 - frozen
    loss_fn: LossFn | None = None,
    drop_single: bool = True,
) -> dict[str, float]:
    """One pass over a split. Returns loss, accuracy, images/s and seconds (all ranks together).

    ``forward``: what the batches go through (the caller sets its train/eval modes); ``images``: uint8
    ``[N, S, S, 3]`` on ``device``, or a :mod:`edgetl.train.batches` placement of them; ``cfg``: batch
    size, output size, augmentation, label smoothing, seed; ``epoch`` seeds the order and augmentation
    (:func:`_epoch_plan`); under DDP (``ctx``) each rank takes every ``world``-th image of each global
    batch; ``loss_fn``: default cross-entropy with label smoothing; ``drop_single``: drop a last batch of
    one (train-mode BatchNorm cannot normalise it).
    Loss and accuracy accumulate on the device: no host synchronisation per step.
    """
    if loss_fn is None:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        loss_fn = lambda pixels, logits, targets: criterion(logits.float(), targets)  # noqa: E731
    plan, n_used, generator = _epoch_plan(len(labels), cfg, epoch, ctx, device, drop_single)
    source = images if isinstance(images, Resident | Streamed) else Resident(images, str(images.device))
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    seen = 0
    _synchronize(device)
    start = time.perf_counter()
    with progress(n_used, desc, ctx.is_main) as bar:
        for index, (batch, targets) in zip(plan, source.batches(plan, labels), strict=True):
            pixels = augment(batch, cfg.image_size, cfg, generator)
            with autocast(device):
                logits = forward(channels_last(pixels, device))
                loss = loss_fn(pixels, logits, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach().double() * len(index)
            correct += (logits.argmax(1) == targets).sum()
            seen += len(index)
            if ctx.is_main:
                bar.update(len(index) * ctx.world)
    _synchronize(device)
    seconds = time.perf_counter() - start
    loss_total, correct_total, seen_total = ctx.sum(loss_sum.item(), float(correct.item()), float(seen))
    return {
        "train_loss": loss_total / max(seen_total, 1),
        "train_acc": correct_total / max(seen_total, 1),
        "images_per_s": seen_total / max(seconds, 1e-9),
        "seconds": seconds,
    }


def _epoch_plan(count: int, cfg: FinetuneConfig, epoch: int, ctx: Context, device: torch.device,
                drop_single: bool) -> tuple[list[np.ndarray], int, torch.Generator]:  # fmt: skip
    """The epoch's batches (this rank's indices of each global batch), how many images it uses and the
    augmentation's random source, all drawn from (seed, epoch): a resumed run draws what the
    uninterrupted one would."""
    order = np.random.default_rng([cfg.seed, epoch]).permutation(count)
    epoch_seed = cfg.seed * 100_003 + epoch + 7_919 * ctx.rank
    torch.manual_seed(epoch_seed)  # dropout
    generator = torch.Generator(device=device).manual_seed(epoch_seed)
    n_used = count - 1 if drop_single and count % cfg.batch_size == 1 and count > 1 else count
    plan = [order[begin : min(begin + cfg.batch_size, n_used)][ctx.rank :: ctx.world]
            for begin in range(0, n_used, cfg.batch_size)]  # fmt: skip
    return plan, n_used, generator


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, device: torch.device, batch_size: int = 32
) -> np.ndarray:
    """Float32 logits of ``model`` on eval-preprocessed uint8 NHWC images, ``batch_size`` at a time (the
    training default, so evaluating needs no more activation memory than a training step: at 64 the
    first evaluation after an epoch grew a CPU run's heap by ~110 MiB, benchmarks/cache_memory.py)."""
    model.eval()
    outputs = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start : start + batch_size]).to(device)
        with autocast(device):
            outputs.append(model(channels_last(to_model_input(batch), device)).float().cpu())
    if not outputs:
        return np.zeros((0, 0), np.float32)
    return torch.cat(outputs).numpy()


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Share of images whose highest logit is their label."""
    return float((logits.argmax(1) == labels).mean())


def agreement(logits: np.ndarray, reference: np.ndarray) -> float:
    """Share of images on which two models' top-1 predictions agree."""
    return float((logits.argmax(1) == reference.argmax(1)).mean())


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
        "top1": top1(logits, labels),
        "loss": float(loss),
        "per_class_accuracy": per_class,
        "confusion_matrix": confusion.tolist(),
    }
    if num_classes >= 5:
        top5 = np.argsort(-logits, axis=1)[:, :5]
        metrics["top5"] = float((top5 == labels[:, None]).any(1).mean())
    return metrics


def inference_copy(model: Any) -> Any:
    """A copy of ``model`` made for CPU inference: every BatchNorm folded into its convolution (in eval
    mode that is the same function, to float rounding; the BatchNorm becomes an Identity, so every module
    keeps its name and output) in the channels-last layout oneDNN runs fastest on x86. The caller's
    model is not changed."""
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fast = copy.deepcopy(model).eval()
    for parent in fast.modules():
        if isinstance(parent, torch.nn.Sequential):
            for i in range(len(parent) - 1):
                if isinstance(parent[i], torch.nn.Conv2d) and isinstance(parent[i + 1], torch.nn.BatchNorm2d):
                    parent[i], parent[i + 1] = fuse_conv_bn_eval(parent[i], parent[i + 1]), torch.nn.Identity()
    return fast.to(memory_format=torch.channels_last)


def torch_logits(model: Any, images: np.ndarray) -> np.ndarray:
    """The float reference on the CPU, computed by :func:`inference_copy` — 3.7 s instead of 5.4-8 s
    for 411 images at 224x224 on a 2-core machine."""
    return predict_logits(inference_copy(model), images, torch.device("cpu"))
