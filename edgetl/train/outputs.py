"""The files a finished fine-tuning run leaves: the best model evaluated on val (and test), ``model.pt``,
``labels.txt``, ``history.csv``, ``metrics.json``, the charts, and the manifest's ``finetune`` record."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from edgetl import charts
from edgetl.data.decode import LoadedSplit
from edgetl.data.folders import DatasetSplits
from edgetl.data.splits import cache_record
from edgetl.rundir import MODEL, atomic_write, update_manifest, write_json
from edgetl.runtime.preprocess import PreprocessSpec
from edgetl.train.checkpoint import ModelCard, TrainingState, save_model
from edgetl.train.loop import classification_metrics, predict_logits
from edgetl.train.model import EdgeClassifier

HISTORY_FIELDS = ["epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr_head", "lr_backbone",
                  "images_per_s", "seconds"]  # fmt: skip
RUN_FILES = [MODEL, "labels.txt", "history.csv", "metrics.json", "training.png", "confusion.png"]


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
    strategy: dict[str, Any] = field(default_factory=dict)  # requested, used, and for "auto" why (strategy_record)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out["run_dir"] = str(self.run_dir)
        return out


@dataclass
class Finished:
    """A run whose epochs are done, with its best weights loaded: what :func:`finalize` writes out."""

    run_dir: Path
    model: EdgeClassifier
    splits: DatasetSplits
    spec: PreprocessSpec
    cfg: Any  # FinetuneConfig
    device: torch.device
    loaded: dict[str, LoadedSplit]
    state: TrainingState
    skipped: list[dict[str, str]]
    unfreeze_from: int
    overlap: dict[str, int]
    placement: str = ""  # where the training images were while it trained (edgetl.train.batches)

    @property
    def card(self) -> ModelCard:
        return ModelCard(len(self.splits.classes), self.cfg.width, list(self.splits.classes), self.spec.to_dict())


def finalize(run: Finished) -> FinetuneResult:
    """Evaluate the best weights and write every artifact of the run."""
    classes = run.splits.classes
    val, test = run.loaded["val"], run.loaded["test"]
    val_metrics = _evaluated(run, val, run.state.best.get("val_logits"))
    test_metrics = _evaluated(run, test) if len(test.labels) else None
    best, history = run.state.best, run.state.history
    save_model(run.run_dir, run.card, best["state"], run.cfg.to_dict(), best["epoch"])
    atomic_write(run.run_dir / "labels.txt", "".join(f"{c}\n" for c in classes))
    atomic_write(run.run_dir / "history.csv", history_csv(history))
    write_json(run.run_dir / "metrics.json", _metrics(run, val_metrics, test_metrics))
    charts.training_curves(history, run.cfg.head_epochs, run.run_dir / "training.png")
    charts.confusion_matrix(val_metrics["confusion_matrix"], classes, run.run_dir / "confusion.png")
    update_manifest(run.run_dir, "finetune", RUN_FILES, _manifest_record(run, val_metrics, test_metrics))
    return FinetuneResult(
        run_dir=run.run_dir,
        classes=list(classes),
        best_epoch=best["epoch"],
        best_val_loss=float(best["val_loss"]),
        best_val_acc=val_metrics["top1"],
        phase1_val_acc=best_in_phase(history, 1),
        phase2_val_acc=best_in_phase(history, 2),
        test_acc=test_metrics["top1"] if test_metrics else None,
        epochs_run=len(history),
        stopped_early=run.state.stopped_early,
        skipped_files=len(run.skipped),
        device=str(run.device),
        seconds=0.0,
        files=list(RUN_FILES),
        strategy=strategy_record(run),
    )


LISTED_MISTAKES = 48  # misclassified images listed per split in metrics.json (the report's gallery)


def _evaluated(run: Finished, split: LoadedSplit, logits: torch.Tensor | None = None) -> dict[str, Any]:
    """Classification metrics of the kept model on a split (``logits``: its outputs there, when the
    training loop kept them), with its misclassified images: the surest mistakes first, named relative to
    the dataset root."""
    import numpy as np

    logits = logits.numpy() if logits is not None else predict_logits(run.model, split.images, run.device)
    metrics = classification_metrics(logits, split.labels, run.splits.classes)
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    confidence = (shifted / shifted.sum(1, keepdims=True)).max(1)
    predicted = logits.argmax(1)
    wrong = np.flatnonzero(predicted != split.labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:LISTED_MISTAKES]
    classes, root = run.splits.classes, Path(run.splits.root)
    metrics["misclassified"] = [
        {"image": _relative(split.paths[i], root), "label": classes[split.labels[i]],
         "predicted": classes[predicted[i]], "confidence": round(float(confidence[i]), 4)}
        for i in wrong
    ]  # fmt: skip
    return metrics


def _relative(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return str(path)


def strategy_record(run: Finished) -> dict[str, Any]:
    """Which transfer strategy the run asked for and used; for "auto", the probes' evidence and the reason."""
    if run.state.strategy_decision:
        return dict(run.state.strategy_decision)
    requested = run.cfg.strategy
    used = None if requested == "auto" else requested  # "auto" without a phase 2 never chose
    return {"requested": requested, "used": used,
            "reason": "no phase 2 to choose for" if used is None else "as configured"}  # fmt: skip


def _metrics(run: Finished, val_metrics: dict[str, Any], test_metrics: dict[str, Any] | None) -> dict[str, Any]:
    """metrics.json."""
    history, splits = run.state.history, run.splits
    return {
        "best_epoch": run.state.best["epoch"],
        "val": val_metrics,
        "test": test_metrics,
        "phase1_best_val_acc": best_in_phase(history, 1),
        "phase2_best_val_acc": best_in_phase(history, 2),
        "stopped_early": run.state.stopped_early,
        "epochs_run": len(history),
        "counts": {
            "train": len(splits.train),
            "val": len(splits.val),
            "test": len(splits.test),
            "skipped": len(run.skipped),
            "val_in_train": run.overlap["val"],
            "test_in_train": run.overlap["test"],
        },
        "skipped_files": run.skipped,
        "classes": splits.classes,
        "strategy": strategy_record(run),
        "data": {"cache": cache_record(run.loaded), "training_images": run.placement},
    }


def _manifest_record(run: Finished, val_metrics: dict[str, Any], test_metrics: dict[str, Any] | None) -> dict:
    """The manifest's ``finetune`` stage: the model card, how it was trained, on what, how well."""
    import torchvision

    card, splits = run.card, run.splits
    return {
        "arch": card.arch,
        "labels": list(card.labels),
        "preprocess": card.preprocess,
        "config": run.cfg.to_dict(),
        "unfreeze_from": run.unfreeze_from,
        "strategy": strategy_record(run),
        "weights": run.state.weights_source,
        "data": {"root": str(splits.root), "layout": splits.layout, "fingerprint": run.state.data_fingerprint},
        # images decoded per split (unreadable ones skipped): package's minimum parity evidence
        "counts": {"val": len(run.loaded["val"].labels), "test": len(run.loaded["test"].labels)},
        "best_epoch": run.state.best["epoch"],
        "val_top1": val_metrics["top1"],
        "test_top1": test_metrics["top1"] if test_metrics else None,
        "device": str(run.device),
        "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__},
    }


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def history_csv(history: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=HISTORY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: _csv_value(row.get(k)) for k in HISTORY_FIELDS})
    return out.getvalue()


def best_in_phase(history: list[dict[str, Any]], phase: int) -> float | None:
    accs = [row["val_acc"] for row in history if row["phase"] == phase]
    return max(accs) if accs else None
