"""What training leaves on disk: the model card, the finished model (``model.pt``) and the resumable
training state (``checkpoints/last.pt``), written atomically and read back with one-line errors.

The model card — architecture, width, classes, labels, preprocessing — is written once, here, into the
checkpoint and the run manifest; export, package and the device runtime read it from there.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgetl import __version__
from edgetl.errors import ConfigError, RunDirError, first_line
from edgetl.rundir import MODEL, atomic_path, read_manifest
from edgetl.runtime.preprocess import PreprocessSpec
from edgetl.train.model import EdgeClassifier

CHECKPOINT_FORMAT = "edgetl-checkpoint"
CHECKPOINT_VERSION = 1
STATE_PATH = "checkpoints/last.pt"
# Settings that may differ between the start of a run and its resumption.
RESUMABLE_OVERRIDES = frozenset({"device", "decode_workers", "compile", "data_placement"})


@dataclass(frozen=True)
class ModelCard:
    """What describes the model: written once into ``model.pt`` and the manifest, read by every later stage."""

    num_classes: int
    width: float
    labels: list[str]
    preprocess: dict[str, Any]
    name: str = "mobilenet_v2"

    @property
    def arch(self) -> dict[str, Any]:
        return {"name": self.name, "width": self.width, "num_classes": self.num_classes}

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> ModelCard:
        stage = manifest["stages"]["finetune"]
        arch = stage["arch"]
        return cls(arch["num_classes"], arch["width"], list(stage["labels"]), stage["preprocess"], arch["name"])


@dataclass
class TrainingState:
    """Everything that carries over from one epoch to the next; ``checkpoints/last.pt`` holds it."""

    config: dict[str, Any]
    data_fingerprint: str
    weights_source: str
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    optimizer_phase: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_loss": float("inf"), "epoch": -1, "state": None})
    epochs_since_best: int = 0
    stopped_early: bool = False
    next_epoch: int = 0
    strategy_decision: dict[str, Any] | None = None  # strategy "auto": what the probes chose, and why

    def to_dict(self) -> dict[str, Any]:
        # not dataclasses.asdict: it would deep-copy every tensor of the model and optimizer state
        return {"format": CHECKPOINT_FORMAT + "-state", **{f.name: getattr(self, f.name) for f in fields(self)}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        return cls(**{key: value for key, value in data.items() if key != "format"})


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_atomically(obj: Any, path: Path) -> None:
    """``torch.save`` through :func:`atomic_path`. torch reports a full disk as a RuntimeError from its
    zip writer ("unexpected pos ..."); it becomes the OSError it is, so the CLI says "no space left"."""
    with atomic_path(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:
            stats = os.statvfs(tmp.parent)
            if stats.f_bavail * stats.f_frsize < (1 << 20):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
            raise RunDirError(f"cannot write {path}: {first_line(exc)}") from None


def save_state(run_dir: Path, state: TrainingState) -> None:
    save_atomically(state.to_dict(), run_dir / STATE_PATH)


def load_state(run_dir: Path) -> TrainingState:
    """The state of an interrupted run.

    Raises:
        RunDirError: there is none, or it cannot be read.
    """
    path = run_dir / STATE_PATH
    if not path.is_file():
        raise RunDirError(f"nothing to resume: {path} does not exist", hint="start the run without --resume")
    try:
        return TrainingState.from_dict(torch.load(path, map_location="cpu", weights_only=False))
    except Exception as exc:
        raise RunDirError(f"cannot read {path}: {first_line(exc)}") from None


def check_resume_config(stored: dict[str, Any], given: dict[str, Any]) -> None:
    """Options given with ``--resume`` must agree with the run's stored configuration.

    Raises:
        ConfigError: one differs (except the device, decoding threads and compilation).
    """
    for key, value in given.items():
        if value is None or key in RESUMABLE_OVERRIDES:
            continue
        if key in stored and stored[key] != value:
            raise ConfigError(
                f"--resume continues with the run's stored settings, but {key}={value!r} was given "
                f"(the run has {stored[key]!r})",
                hint="drop the option, or start a new run with --out elsewhere",
            )


def save_model(run_dir: Path, card: ModelCard, state_dict: dict[str, torch.Tensor], config: dict[str, Any],
               best_epoch: int) -> None:  # fmt: skip
    """``model.pt``: the weights, the model card and the configuration that produced them."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "edgetl_version": __version__,
        "arch": card.arch,
        "state_dict": {k: v.cpu() for k, v in state_dict.items()},
        "labels": list(card.labels),
        "preprocess": card.preprocess,
        "config": config,
        "best_epoch": best_epoch,
    }
    save_atomically(checkpoint, run_dir / MODEL)


def load_checkpoint(run_dir: str | os.PathLike, name: str = MODEL) -> tuple[EdgeClassifier, dict[str, Any]]:
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
