"""How much of the backbone phase 2 trains, and at which rates: the transfer-learning strategies.

* ``feature-extraction``: the backbone stays frozen; phase 2 keeps training the head (at the phase-2
  rate, with its warm-up and cosine decay). The right call for small datasets close to ImageNet.
* ``partial``: ``features[unfreeze_from:]`` (the last third by default) at ``backbone_lr_mult`` times
  the head's rate, as edgetl always did.
* ``full``: every block, each at ``layer_decay`` times the rate of the block above it (the head has
  the highest), thawed from the top down over the first ``unfreeze_epochs`` epochs of phase 2
  (progressive unfreezing): the upper blocks adapt before the lower ones move.
* ``auto``: at the start of phase 2 each of the three trains ``probe_epochs`` epoch(s) from the
  head-phase weights, at its own phase-2 rates held constant, and is scored on the validation split;
  the best validation top-1 wins, and a candidate within one image of it that is cheaper wins instead
  (feature extraction before partial before full). The evidence goes into the run's metrics.

BatchNorm is handled the same way by every strategy (``--bn``: frozen statistics by default) and
recorded with the configuration.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from typing import Any

import torch

from edgetl.config import FinetuneConfig
from edgetl.train import distributed
from edgetl.train.loop import evaluate, train_one_epoch
from edgetl.train.model import EdgeClassifier, default_unfreeze_from, set_train_mode, set_trainable
from edgetl.train.optim import param_groups

log = logging.getLogger(__name__)

CANDIDATES = ("feature-extraction", "partial", "full")  # cheapest first
PROBE_EPOCH_SEED = 20_000  # probes draw their batches apart from the run's epochs


def first_trainable(strategy: str, cfg: FinetuneConfig, model: EdgeClassifier, phase2_epoch: int) -> int:
    """The first ``features`` block with gradients in the given epoch of phase 2 (``len(features)``: none)."""
    blocks = len(model.features)
    if strategy == "feature-extraction":
        return blocks
    if strategy == "partial":
        return cfg.unfreeze_from if cfg.unfreeze_from is not None else default_unfreeze_from(model)
    thawed = min(1.0, (phase2_epoch + 1) / cfg.unfreeze_epochs)
    return blocks - math.ceil(blocks * thawed)


def probe(model: EdgeClassifier, trainer: Any) -> dict[str, Any]:
    """Train each candidate from ``model``'s (head-phase) weights for ``probe_epochs`` and choose.

    Returns the decision record: the chosen strategy, why, and every candidate's validation top-1 and
    loss, training loss and seconds. ``model`` is not changed.
    """
    cfg, val = trainer.cfg, trainer.val
    evidence = {}
    for index, name in enumerate(CANDIDATES):
        started = time.perf_counter()
        candidate = copy.deepcopy(model)
        first = 0 if name == "full" else first_trainable(name, cfg, candidate, 0)
        set_trainable(candidate, 2, first)
        forward = distributed.wrap(candidate, trainer.ctx, trainer.device)
        optimizer = torch.optim.AdamW(param_groups(candidate, cfg, name, cfg.phase2_head_lr, first),
                                      lr=cfg.phase2_head_lr, weight_decay=cfg.weight_decay)  # fmt: skip
        constant = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        for epoch in range(cfg.probe_epochs):
            set_train_mode(candidate, 2, first, cfg.bn)
            stats = train_one_epoch(forward, trainer.train_on_device, trainer.train.labels, cfg, optimizer, constant,
                                    trainer.device, PROBE_EPOCH_SEED + 100 * index + epoch,
                                    desc=f"probe {name}", ctx=trainer.ctx)  # fmt: skip
        metrics = evaluate(candidate, val.images, val.labels, trainer.classes, trainer.device)
        evidence[name] = {"val_acc": metrics["top1"], "val_loss": metrics["loss"], "train_loss": stats["train_loss"],
                          "seconds": round(time.perf_counter() - started, 2)}  # fmt: skip
        log.info("probe %s: val top-1 %.3f, val loss %.4f", name, metrics["top1"], metrics["loss"])
    chosen, reason = choose(evidence, len(val.labels))
    chosen = CANDIDATES[trainer.ctx.broadcast_index(CANDIDATES.index(chosen))]  # every rank follows rank 0
    return {"requested": "auto", "used": chosen, "reason": reason, "probe_epochs": cfg.probe_epochs,
            "candidates": evidence}  # fmt: skip


def choose(evidence: dict[str, dict[str, float]], images: int) -> tuple[str, str]:
    """The best validation top-1; a cheaper candidate within one validation image of it wins instead."""
    best = max(evidence[name]["val_acc"] for name in CANDIDATES)
    tolerance = 1.0 / max(images, 1) + 1e-9
    close = [name for name in CANDIDATES if evidence[name]["val_acc"] >= best - tolerance]
    chosen = close[0]
    scores = ", ".join(f"{name} {100 * evidence[name]['val_acc']:.1f} %" for name in CANDIDATES)
    why = "the best" if len(close) == 1 else "the cheapest within one validation image of the best"
    return chosen, f"val top-1 after the probe: {scores}; {chosen} is {why}"
