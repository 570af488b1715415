"""How much of the backbone phase 2 trains, and at which rates: the transfer-learning strategies.

* ``feature-extraction``: the backbone stays frozen; phase 2 keeps training the head (at the phase-2
  rate, with its warm-up and cosine decay). The right call for small datasets close to ImageNet.
* ``partial``: ``features[unfreeze_from:]`` (the last third by default) at ``backbone_lr_mult`` times
  the head's rate (edgetl's default before the strategies existed).
* ``full``: every block, each at ``layer_decay`` times the rate of the block above it (the head has
  the highest), thawed from the top down over the first ``unfreeze_epochs`` epochs of phase 2
  (progressive unfreezing): the upper blocks adapt before the lower ones move.
* ``whole``: every block from the first phase-2 epoch, all at the head's rate. On data far from
  ImageNet the lower blocks have to move too, and ``full``'s decayed rates (0.9^19 = 0.14x at the
  stem) hold them back.
* ``auto`` (the default): a race. From the head-phase weights, each strategy of ``race`` (feature
  extraction and whole by default) runs the first ``probe_epochs`` epochs of phase 2 exactly as its
  own run would (same schedule, thawing and random draws), scored by validation loss. The best
  continues from where its lane stopped, so the winner's epochs are not repeated and the run equals
  that strategy's run with the same seed; the race costs only the losers' epochs. Feature extraction
  wins when its loss is within 2 % of the best (it is cheaper and keeps the ImageNet features intact);
  among the others the lowest loss wins.

Why these two (benchmarks/README.md, issues #20 and #30; three real sets, 4 seeds): ``whole``
matched or beat ``full`` on the sign-language digits (99.30 % against 98.99 % validation top-1, mean
of seeds 0-2) and beat it by 2 points on clothing photos (91.40 % against 89.44 %), where a race that also ran ``full``
chose it once after two epochs and lost 3.2 points on that seed; ``partial`` lost to both every time;
on ants/bees, close to ImageNet, feature extraction won the race and was the best column.

BatchNorm is handled the same way by every strategy (``--bn``: frozen statistics by default) and
recorded with the configuration.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Protocol

from edgetl.config import FinetuneConfig
from edgetl.train.model import EdgeClassifier, default_unfreeze_from

log = logging.getLogger(__name__)

CHEAP = "feature-extraction"  # wins the race within LOSS_TOLERANCE of the best
LOSS_TOLERANCE = 0.02


class Racer(Protocol):
    """What the race needs of a trainer (:class:`edgetl.train.finetune.Trainer`)."""

    cfg: FinetuneConfig
    strategy: str
    ctx: Any
    state: Any

    def snapshot(self) -> dict[str, Any]: ...
    def restore(self, snapshot: dict[str, Any], strategy: str) -> None: ...
    def train_epoch(self, epoch: int) -> dict[str, Any]: ...
    def validation_size(self) -> int: ...


def first_trainable(strategy: str, cfg: FinetuneConfig, model: EdgeClassifier, phase2_epoch: int) -> int:
    """The first ``features`` block with gradients in the given epoch of phase 2 (``len(features)``: none)."""
    blocks = len(model.features)
    if strategy == "feature-extraction":
        return blocks
    if strategy == "whole":
        return 0
    if strategy == "partial":
        return cfg.unfreeze_from if cfg.unfreeze_from is not None else default_unfreeze_from(model)
    thawed = min(1.0, (phase2_epoch + 1) / cfg.unfreeze_epochs)
    return blocks - math.ceil(blocks * thawed)


def race(trainer: Racer, epoch: int) -> dict[str, Any]:
    """Run the first epochs of phase 2 (from ``epoch``) once per candidate and keep the winner's lane.

    Returns the decision record: the chosen strategy, why, and every candidate's validation top-1 and
    loss, training loss and seconds. The trainer is left at the end of the winner's lane.
    """
    start = trainer.snapshot()
    epochs = min(trainer.cfg.probe_epochs, trainer.cfg.finetune_epochs)
    lanes, evidence = {}, {}
    for name in trainer.cfg.race:
        trainer.restore(start, name)
        began = time.perf_counter()
        rows = []
        for lane_epoch in range(epoch, epoch + epochs):
            rows.append(trainer.train_epoch(lane_epoch))
            if trainer.state.stopped_early:
                break
        evidence[name] = {"val_acc": rows[-1]["val_acc"], "val_loss": rows[-1]["val_loss"],
                          "train_loss": rows[-1]["train_loss"], "epochs": len(rows),
                          "seconds": round(time.perf_counter() - began, 2)}  # fmt: skip
        log.info("race: %s after %d epoch(s): val top-1 %.3f, val loss %.4f", name, epochs,
                 rows[-1]["val_acc"], rows[-1]["val_loss"])  # fmt: skip
        lanes[name] = trainer.snapshot()
    chosen, reason = choose(evidence, trainer.validation_size())
    lanes_in_order = list(trainer.cfg.race)
    chosen = lanes_in_order[trainer.ctx.broadcast_index(lanes_in_order.index(chosen))]  # every rank follows rank 0
    trainer.restore(lanes[chosen], chosen)
    return {"requested": "auto", "used": chosen, "reason": reason, "probe_epochs": epochs, "candidates": evidence}


def choose(evidence: dict[str, dict[str, float]], images: int) -> tuple[str, str]:
    """The lowest validation loss wins; feature extraction wins instead when its loss is within
    ``LOSS_TOLERANCE`` of the best (it is the cheapest and keeps ImageNet's features). ``images`` is the
    validation split's size (for the reason).

    The loss, not top-1: it is what the run itself keeps its best epoch by, and after two epochs of a
    progressive schedule it separates the lanes where top-1 may not yet (96 px, seed 1: top-1 87.1 %
    against 87.6 %, two images apart; loss 0.465 against 0.380).
    """
    names = list(evidence)
    best = min(names, key=lambda name: evidence[name]["val_loss"])
    chosen, why = best, "the best"
    cheap = evidence.get(CHEAP)
    limit = evidence[best]["val_loss"] * (1 + LOSS_TOLERANCE) + 1e-12
    if best != CHEAP and cheap is not None and cheap["val_loss"] <= limit:
        chosen, why = CHEAP, f"within {100 * LOSS_TOLERANCE:.0f} % of the best ({best}) and the cheapest"
    epochs = next(iter(evidence.values())).get("epochs", 1)
    scores = ", ".join(f"{name} {evidence[name]['val_loss']:.3f} ({100 * evidence[name]['val_acc']:.1f} %)"
                       for name in names)  # fmt: skip
    return chosen, (f"val loss (top-1) after {epochs} phase-2 epoch(s) each on {images} images: {scores}; "
                    f"{chosen} is {why}")
