"""Optimisers and learning-rate schedules of the two fine-tuning phases."""

from __future__ import annotations

import math
from typing import Any

import torch

from edgetl.config import FinetuneConfig
from edgetl.train.model import EdgeClassifier


def build_optimizer(
    model: EdgeClassifier, cfg: FinetuneConfig, phase: int, unfreeze_from: int, steps_per_epoch: int,
    strategy: str = "partial",
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Phase 1: AdamW on the head at ``lr``, constant. Phase 2: the strategy's parameter groups
    (:func:`param_groups`), linear warm-up then cosine decay (per step)."""
    if phase == 1:
        groups = [{"params": list(model.head.parameters()), "lr": cfg.lr, "name": "head"}]
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    head_lr = cfg.phase2_head_lr
    groups = param_groups(model, cfg, strategy, head_lr, unfreeze_from)
    optimizer = torch.optim.AdamW(groups, lr=head_lr, weight_decay=cfg.weight_decay)
    total = max(1, cfg.finetune_epochs * steps_per_epoch)
    warmup = min(total - 1, round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(model: EdgeClassifier, cfg: FinetuneConfig, strategy: str, head_lr: float,
                 unfreeze_from: int) -> list[dict[str, Any]]:  # fmt: skip
    """Phase 2's parameter groups and learning rates (:mod:`edgetl.train.strategy`): the head at
    ``head_lr``; for "partial" one group of ``features[unfreeze_from:]`` at ``head_lr x backbone_lr_mult``;
    for "full" one group per block, block ``i`` of ``n`` at ``head_lr x layer_decay ** (n - i)``; for
    "whole" one group of every block at ``head_lr``; "feature-extraction" the head alone."""
    groups = [{"params": list(model.head.parameters()), "lr": head_lr, "name": "head"}]
    if strategy == "partial":
        backbone = [p for block in model.features[unfreeze_from:] for p in block.parameters()]
        if backbone:
            groups.append({"params": backbone, "lr": head_lr * cfg.backbone_lr_mult, "name": "backbone"})
    elif strategy == "whole":
        backbone = [p for p in model.features.parameters()]
        groups.append({"params": backbone, "lr": head_lr, "name": "backbone"})
    elif strategy == "full":
        blocks = len(model.features)
        for index, block in enumerate(model.features):
            rate = head_lr * cfg.layer_decay ** (blocks - index)
            groups.append({"params": list(block.parameters()), "lr": rate, "name": f"features.{index}"})
    return groups


def top_backbone_lr(optimizer: torch.optim.Optimizer) -> float | None:
    """The learning rate of the highest backbone group (what history.csv reports as lr_backbone)."""
    rates = [(g["name"], float(g["lr"])) for g in optimizer.param_groups if g.get("name", "") != "head"]
    if not rates:
        return None
    named = dict(rates)
    if "backbone" in named:
        return named["backbone"]
    return max(rates, key=lambda item: int(item[0].split(".")[-1]))[1]


def group_lr(optimizer: torch.optim.Optimizer, name: str) -> float | None:
    """The current learning rate of the parameter group called ``name`` (None: no such group)."""
    for group in optimizer.param_groups:
        if group.get("name") == name:
            return float(group["lr"])
    return None
