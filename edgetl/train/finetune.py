"""Freeze-then-unfreeze fine-tuning of MobileNetV2 into a run directory.

Phase 1 trains a new head on a frozen backbone (no gradients, BatchNorm in eval mode). Phase 2
unfreezes ``features[unfreeze_from:]`` and continues with a lower learning rate for the backbone, a
linear warm-up and a cosine decay, and early stopping on validation loss. The best epoch's weights are
what the run keeps.

Every image is decoded once into the on-disk image cache (:mod:`edgetl.data.cache`) and trained from
its memory map, on the GPU or streamed to it (:mod:`edgetl.train.batches`); random resized crops, flips
and colour jitter are done on whole batches with tensor ops on the training device
(:mod:`edgetl.train.augment`).

After every epoch the complete training state is saved atomically to ``checkpoints/last.pt``; a run
stopped by Ctrl-C or a kill resumes from there with ``resume=True``.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgetl.config import FinetuneConfig
from edgetl.data.decode import LoadedSplit
from edgetl.data.folders import DatasetSplits, discover
from edgetl.data.splits import held_out_overlap, load_splits
from edgetl.errors import ConfigError, DataError, Interrupted, RunDirError, TrainingDiverged
from edgetl.rundir import MODEL, run_lock
from edgetl.runtime.preprocess import PreprocessSpec
from edgetl.train import distributed
from edgetl.train.batches import place
from edgetl.train.checkpoint import (
    RESUMABLE_OVERRIDES,
    STATE_PATH,
    TrainingState,
    check_resume_config,
    cpu_state,
    load_state,
    save_state,
)
from edgetl.train.cpu_heap import retained_heap
from edgetl.train.loop import classification_metrics, predict_logits, train_one_epoch
from edgetl.train.model import (
    EdgeClassifier,
    load_initial_weights,
    set_train_mode,
    set_trainable,
)
from edgetl.train.optim import build_optimizer, group_lr, top_backbone_lr
from edgetl.train.outputs import FinetuneResult, Finished, finalize
from edgetl.train.strategy import first_trainable, race

log = logging.getLogger(__name__)

EpochHook = Callable[[dict[str, Any]], bool]  # an epoch's history row -> stop here?

DIVERGED = 20  # a loss above this many times max(ln(classes), 1) (or non-finite) stops the run

__all__ = ["FinetuneResult", "finetune", "resolve_device", "seed_everything"]


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


def finetune(
    data: str | os.PathLike,
    run_dir: str | os.PathLike,
    cfg: FinetuneConfig,
    *,
    resume: bool = False,
    overrides: dict[str, Any] | None = None,
    on_epoch: EpochHook | None = None,
) -> FinetuneResult | None:
    """Fine-tune MobileNetV2 on an image folder and write the run directory, holding its lock.

    Args:
        data: dataset folder (see :mod:`edgetl.data.folders`).
        run_dir: output folder; created if needed. Must not hold another run unless ``resume``.
        cfg: the resolved configuration.
        resume: continue the run in ``run_dir`` from its last completed epoch.
        overrides: the options the user gave explicitly; with ``resume`` they must agree with the
            stored configuration (except the device).
        on_epoch: called after every epoch (the race of ``auto``: after it) with the epoch's history row;
            True stops training there and keeps the best epoch so far, as early stopping does; an exception
            it raises (a search's pruning) ends the run unfinished, its state saved up to the epoch before.

    Returns:
        A :class:`FinetuneResult`; None on the ranks other than 0 of a distributed run (see
        :mod:`edgetl.train.distributed`), which write nothing.

    Raises:
        DataError, WeightsError, ConfigError, RunDirError: bad input; nothing is overwritten.
        ConfigError: ``run_dir`` lies inside the dataset (the next run would train on its files).
        RunLocked: another process writes the same run.
        TrainingDiverged: the loss went non-finite; the last good state is kept.
        Interrupted: Ctrl-C; state up to the last completed epoch is saved.
    """
    run_dir = Path(run_dir).expanduser()
    data_root = Path(data).expanduser().resolve()
    if data_root.is_dir() and run_dir.resolve().is_relative_to(data_root):
        raise ConfigError(f"the run folder {run_dir} is inside the dataset {data}",
                          hint="choose an --out outside the dataset folder")  # fmt: skip
    if int(os.environ.get("RANK", "0")) != 0:  # only rank 0 writes (edgetl.train.distributed)
        return _finetune(data, run_dir, cfg, resume, overrides, on_epoch)
    with run_lock(run_dir, "finetune"):
        return _finetune(data, run_dir, cfg, resume, overrides, on_epoch)


def _finetune(data: str | os.PathLike, run_dir: Path, cfg: FinetuneConfig, resume: bool,
              overrides: dict[str, Any] | None, on_epoch: EpochHook | None = None,
              ) -> FinetuneResult | None:  # fmt: skip
    started = time.perf_counter()
    resumed, cfg = _resumed_state(run_dir, cfg, resume, overrides or {})
    device = resolve_device(cfg.device)
    ctx = distributed.context(device)
    device = ctx.device(device)
    if not ctx.is_main:
        logging.getLogger("edgetl").setLevel(logging.WARNING)
    elif ctx.enabled:
        log.info("data-parallel on %d processes (%s)", ctx.world, torch.distributed.get_backend())
    seed_everything(cfg.seed)
    splits = _splits(data, cfg, resumed)
    spec = PreprocessSpec.for_size(cfg.image_size)
    model = EdgeClassifier(len(splits.classes), cfg.width, spec.mean, spec.std, cfg.dropout)
    unfreeze_from = first_trainable("partial", cfg, model, 0)
    if unfreeze_from > len(model.features):
        raise ConfigError(f"--unfreeze-from {unfreeze_from} is past the last block ({len(model.features) - 1})")
    state = _starting_state(model, cfg, splits, resumed, run_dir)
    # Decoding comes after the weights are resolved, so that bad weights fail fast.
    skipped: list[dict[str, str]] = []
    loaded = load_splits(splits, spec, cfg.decode_workers, skipped, ctx.is_main)
    overlap = held_out_overlap(loaded)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    trainer = Trainer(model, cfg, device, ctx, unfreeze_from, run_dir, state, loaded, splits.classes, resumed)
    trainer.on_epoch = on_epoch
    trainer.run(data)
    ctx.close()  # no collectives after training: rank 0 finalises alone
    if not ctx.is_main:
        return None
    model.load_state_dict(state.best["state"])
    final_first = trainer.first if trainer.first is not None else unfreeze_from
    finished = Finished(run_dir, model, splits, spec, cfg, device, loaded, state, skipped, final_first, overlap,
                        trainer.train_source.where)
    result = finalize(finished)
    result.seconds = time.perf_counter() - started
    result.processes = ctx.world
    return result


def _resumed_state(run_dir: Path, cfg: FinetuneConfig, resume: bool,
                   overrides: dict[str, Any]) -> tuple[TrainingState | None, FinetuneConfig]:  # fmt: skip
    """The interrupted run's state and stored configuration with ``resume``; refuse to overwrite a run
    without it."""
    if not resume:
        if (run_dir / STATE_PATH).exists() or (run_dir / MODEL).exists():
            raise RunDirError(f"{run_dir} already holds a fine-tuning run",
                              hint="add --resume to continue it, or choose another --out")  # fmt: skip
        return None, cfg
    state = load_state(run_dir)
    check_resume_config(state.config, overrides)
    stored = dict(state.config)
    for key in RESUMABLE_OVERRIDES:
        if overrides.get(key) is not None:
            stored[key] = overrides[key]
    return state, FinetuneConfig.build(stored)


def _splits(data: str | os.PathLike, cfg: FinetuneConfig, resumed: TrainingState | None) -> DatasetSplits:
    splits = discover(data, cfg.val_fraction, cfg.seed)
    if resumed is not None and resumed.data_fingerprint != splits.fingerprint():
        raise DataError(f"the data in {splits.root} differs from the data this run started with",
                        hint="resume with the same dataset, or start a new run")  # fmt: skip
    log.info("%d classes; %d train / %d val / %d test images (%s layout)", len(splits.classes),
             *splits.counts().values(), splits.layout)  # fmt: skip
    return splits


def _starting_state(model: EdgeClassifier, cfg: FinetuneConfig, splits: DatasetSplits,
                    resumed: TrainingState | None, run_dir: Path) -> TrainingState:  # fmt: skip
    """A fresh state with the initial weights loaded into ``model``, or the resumed one with its weights."""
    if resumed is None:
        weights_source = load_initial_weights(model, cfg.weights, cfg.width)
        return TrainingState(config=cfg.to_dict(), data_fingerprint=splits.fingerprint(),
                             weights_source=weights_source)  # fmt: skip
    model.load_state_dict(resumed.model)
    log.info("resuming %s at epoch %d", run_dir, resumed.next_epoch + 1)
    return TrainingState(
        config=cfg.to_dict(), data_fingerprint=resumed.data_fingerprint, weights_source=resumed.weights_source,
        history=resumed.history, best=resumed.best, epochs_since_best=resumed.epochs_since_best,
        stopped_early=resumed.stopped_early, next_epoch=resumed.next_epoch,
        strategy_decision=resumed.strategy_decision,
    )  # fmt: skip


class Trainer:
    """The epochs of one run: phases, optimisers, the divergence and early-stopping rules, the
    checkpoint after every epoch. Its :class:`TrainingState` is the only state that carries over."""

    def __init__(self, model: EdgeClassifier, cfg: FinetuneConfig, device: torch.device, ctx: Any,
                 unfreeze_from: int, run_dir: Path, state: TrainingState, loaded: dict[str, LoadedSplit],
                 classes: list[str], resumed: TrainingState | None):  # fmt: skip
        self.model, self.cfg, self.device, self.ctx = model, cfg, device, ctx
        self.unfreeze_from, self.run_dir, self.state, self.classes = unfreeze_from, run_dir, state, classes
        self.train, self.val = loaded["train"], loaded["val"]
        self.train_source = place(self.train.images, device, cfg.data_placement)
        log.info("training images (%.2f GiB): %s", self.train.images.nbytes / 2**30, self.train_source.where)
        self.steps_per_epoch = max(1, math.ceil(len(self.train.labels) / cfg.batch_size))
        self.total_epochs = cfg.head_epochs + cfg.finetune_epochs
        self.resumed = resumed  # its optimizer state applies once, to the phase it was saved in
        self.saved_epochs = state.next_epoch
        self.phase: int | None = None
        self.first: int | None = None  # the first features block with gradients now
        self.optimizer = self.scheduler = self.forward = None
        self.on_epoch: EpochHook | None = None  # see finetune()
        decision = state.strategy_decision
        self.strategy = decision["used"] if decision else cfg.strategy

    def run(self, data: str | os.PathLike) -> None:
        """Train until the last epoch or early stopping; Ctrl-C says what is saved and how to go on."""
        with retained_heap(self.device.type == "cpu"):  # edgetl.train.cpu_heap: 1.3-3.8x faster on the CPU
            try:
                while self.state.next_epoch < self.total_epochs and not self.state.stopped_early:
                    self.epoch(self.state.next_epoch)
            except KeyboardInterrupt:
                raise self._interrupted(data) from None

    def epoch(self, epoch: int) -> None:
        """Train (and for "auto" race, :func:`edgetl.train.strategy.race`) and save the state."""
        if epoch >= self.cfg.head_epochs and self.strategy == "auto":
            self.state.strategy_decision = race(self, epoch)
            log.info("strategy: %s (%s)", self.strategy, self.state.strategy_decision["reason"])
        else:
            self.train_epoch(epoch)
        if not self.ctx.is_main:
            self.resumed = None
            return
        if self.on_epoch is not None and not self.state.stopped_early and self.on_epoch(self.state.history[-1]):
            log.info("stopping after epoch %d, as the caller asked; the best epoch is kept", self.state.next_epoch)
            self.state.stopped_early = True
        self.state.model = cpu_state(self.model)
        self.state.optimizer, self.state.scheduler = self.optimizer.state_dict(), self.scheduler.state_dict()
        self.state.optimizer_phase = self.phase
        save_state(self.run_dir, self.state)
        self.saved_epochs = self.state.next_epoch
        self.resumed = None

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch of training and validation; the state advances, nothing is saved. Returns its row."""
        phase = 1 if epoch < self.cfg.head_epochs else 2
        first = len(self.model.features)
        if phase == 2:
            first = first_trainable(self.strategy, self.cfg, self.model, epoch - self.cfg.head_epochs)
        if self.phase != phase:
            self._start_phase(phase)
        if self.first != first:
            self._thaw(phase, first)
        lr_head, lr_backbone = group_lr(self.optimizer, "head"), top_backbone_lr(self.optimizer)
        desc = f"epoch {epoch + 1}/{self.total_epochs} (phase {phase})"
        set_train_mode(self.model, phase, first, self.cfg.bn)
        stats = train_one_epoch(self.forward, self.train_source, self.train.labels, self.cfg, self.optimizer,
                                self.scheduler, self.device, epoch, desc=desc, ctx=self.ctx)  # fmt: skip
        logits = predict_logits(self.model, self.val.images, self.device)
        val = classification_metrics(logits, self.val.labels, self.classes)
        self._refuse_divergence(epoch, stats["train_loss"], val["loss"])
        row = {"epoch": epoch + 1, "phase": phase, **stats, "val_loss": val["loss"], "val_acc": val["top1"],
               "lr_head": lr_head, "lr_backbone": lr_backbone}  # fmt: skip
        log.info("%s: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f img/s", desc, row["train_loss"],
                 row["train_acc"], row["val_loss"], row["val_acc"], row["images_per_s"])  # fmt: skip
        self._keep_best(row, phase, logits)
        self.state.next_epoch = epoch + 1
        return row

    def snapshot(self) -> dict[str, Any]:
        """Everything an epoch changes: weights, optimiser, schedule, history and early-stopping state."""
        state = self.state
        return {"model": cpu_state(self.model), "optimizer": self.optimizer, "scheduler": self.scheduler,
                "phase": self.phase, "strategy": self.strategy, "history": list(state.history), "best": state.best,
                "epochs_since_best": state.epochs_since_best, "stopped_early": state.stopped_early,
                "next_epoch": state.next_epoch}  # fmt: skip

    def restore(self, snapshot: dict[str, Any], strategy: str) -> None:
        """Go back to a :meth:`snapshot` and continue it as ``strategy`` (the race's lanes)."""
        self.model.load_state_dict(snapshot["model"])
        self.model.zero_grad(set_to_none=True)  # no gradients left over from another lane
        self.optimizer, self.scheduler, self.phase = snapshot["optimizer"], snapshot["scheduler"], snapshot["phase"]
        state = self.state
        state.history, state.best = list(snapshot["history"]), snapshot["best"]
        state.epochs_since_best, state.stopped_early = snapshot["epochs_since_best"], snapshot["stopped_early"]
        state.next_epoch = snapshot["next_epoch"]
        if strategy != snapshot["strategy"]:
            self.phase = None  # the next epoch builds the strategy's own phase-2 optimiser
        self.strategy, self.first = strategy, None  # the next epoch sets the gradients and wraps again

    def validation_size(self) -> int:
        return len(self.val.labels)

    def _start_phase(self, phase: int) -> None:
        """The phase's optimizer and schedule (a resumed run's state restored into them once)."""
        self.optimizer, self.scheduler = build_optimizer(self.model, self.cfg, phase, self.unfreeze_from,
                                                         self.steps_per_epoch, self.strategy)  # fmt: skip
        self.phase = phase
        resumed = self.resumed
        if resumed is not None and resumed.optimizer_phase == phase and resumed.optimizer:
            self.optimizer.load_state_dict(resumed.optimizer)
            self.scheduler.load_state_dict(resumed.scheduler)

    def _thaw(self, phase: int, first: int) -> None:
        """Gradients for ``features[first:]`` and the head; DDP (and torch.compile) rebuilt around them."""
        set_trainable(self.model, phase, first)
        self.forward = distributed.wrap(self.model, self.ctx, self.device)  # DDP hooks follow requires_grad
        if self.cfg.compile and self.device.type == "cuda":
            self.forward = torch.compile(self.forward)
        self.first = first

    def _keep_best(self, row: dict[str, Any], phase: int, val_logits: np.ndarray) -> None:
        """Keep the epoch's weights (and its validation logits, so the final evaluation need not run the
        validation split again) when its validation loss is the lowest yet; the early-stopping count."""
        state = self.state
        state.history.append(row)
        if row["val_loss"] < state.best["val_loss"]:
            state.best = {"val_loss": row["val_loss"], "epoch": row["epoch"], "state": cpu_state(self.model),
                          "val_logits": torch.from_numpy(val_logits)}  # fmt: skip
            state.epochs_since_best = 0
        elif phase == 2:
            state.epochs_since_best += 1
        if phase == 2 and self.cfg.patience and state.epochs_since_best >= self.cfg.patience:
            log.info("early stop: no better validation loss for %d epochs", self.cfg.patience)
            state.stopped_early = True
        state.stopped_early = self.ctx.broadcast_flag(state.stopped_early)  # every rank stops together

    def _refuse_divergence(self, epoch: int, train_loss: float, val_loss: float) -> None:
        """Stop a run whose loss went non-finite or far above where training starts (the loss of a model
        that guesses, ln(classes): a fresh head starts there), before its state overwrites the last good
        checkpoint. ``DIVERGED`` times that is a mean loss no learning run reaches, even overfitting."""
        start = math.log(len(self.classes))
        limit = DIVERGED * max(start, 1.0)
        if all(math.isfinite(loss) and loss <= limit for loss in (train_loss, val_loss)):
            return
        kept = (f"the last good state (epoch {self.saved_epochs}) is kept in {self.run_dir / STATE_PATH}"
                if self.saved_epochs else "no epoch had finished, nothing was saved")  # fmt: skip
        raise TrainingDiverged(
            f"training diverged in epoch {epoch + 1} (train loss {train_loss:.4g}, val loss {val_loss:.4g}; a "
            f"model that guesses scores {start:.3g}, the limit is {limit:.3g}); {kept}",
            hint="start a new run with a lower --lr / --finetune-lr",
        )

    def _interrupted(self, data: str | os.PathLike) -> Interrupted:
        saved, run_dir = self.saved_epochs, self.run_dir
        if not saved:
            return Interrupted("interrupted before the first epoch ended; nothing was saved",
                               hint=f"start again: edgetl finetune {data} --out {run_dir}")  # fmt: skip
        return Interrupted(
            f"interrupted; {saved} of {self.total_epochs} epochs are saved in {run_dir / STATE_PATH}",
            hint=f"continue at epoch {saved + 1} with: edgetl finetune {data} --out {run_dir} --resume",
        )
