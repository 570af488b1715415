"""Quantisation-aware fine-tuning (QAT) of a finished run, for int8 models that fail parity.

Post-training quantisation rounds every weight and activation of the float model once. A fine-tuned
MobileNetV2 can be ill-conditioned for that: a frozen ImageNet BatchNorm with a tiny running variance
folds into weights a hundred times larger than their neighbours', and the int8 rounding of that
layer's input becomes noise that flips low-margin predictions (see
``benchmarks/int8_layer_sensitivity.py``). QAT fine-tunes the float weights for a few epochs while
the forward pass *simulates the int8 model the export will build*, so training learns to live with
the rounding:

* the weights as the export equalises them for the int8 model (:func:`edgetl.quantize.equalize.equalize_for_int8`);
  the export then uses the trained weights as they are;
* the same graph as the TFLite conversion (:func:`edgetl.export.tf_graph.walk`): BatchNorms folded into
  their convolutions (frozen statistics), then per-output-channel symmetric int8 weights
  (scale = max|w| / 127), as TFLiteConverter quantises convolutions and the classifier;
* every tensor TFLite stores in int8 — the normalised input, each convolution's output (after its
  ReLU6), each residual sum, the pooled features, the logits — fake-quantised per tensor with an
  asymmetric 8-bit range measured as TFLite calibrates: min/max of the float model over the
  calibration recipe's images, re-measured before every epoch;
* the gradient passes the rounding unchanged (straight-through estimator, ``torch.fake_quantize_*``);
* the loss is the labels' cross-entropy of the simulated int8 logits plus ``distill`` x the KL
  divergence of those predictions from the *original* model's (knowledge distillation, temperature 2,
  on the same augmented images): the parity gate measures agreement with that model. On the
  sign-language run (``benchmarks/results/qat_bench_sign_language.md``, defaults) QAT no longer beats
  the post-training export (agreement 97.32 % against 98.05 %, logit SQNR 18.0 against 25.1 dB) now
  that the export equalises ranges (:mod:`edgetl.quantize.equalize`; QAT starts from those weights too): the
  post-training model is also bias-corrected, which the simulation is not, and the QAT weights drift
  from the original. Before equalisation QAT took agreement from 98.05 % to 98.54 %; it remains the
  step for a model whose post-training int8 fails the gate. ``consistency`` > 0 adds the KL divergence
  from the QAT weights' own float predictions instead; it did worse
  (``benchmarks/results/qat_bench_sign_language_consistency1.md``), hence off by default.

The result is a new run directory (the original is not touched): ``model.pt`` is the original float
model, unchanged — the model the user validated, exported as float and the reference every parity
check compares with — and ``model_qat.pt`` holds the quantisation-aware weights, from which
``edgetl export`` builds the int8 model only (without bias correction: QAT trained the biases against
the rounding it simulated). ``qat.json`` records, per epoch, the top-1 of the QAT weights run in float
and the simulated int8 top-1 and agreement with the original model.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgetl.config import QATConfig
from edgetl.errors import ConfigError
from edgetl.train.cpu_heap import retained_heap

log = logging.getLogger(__name__)



def _fake_quant_weight(weight: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 (-127..127) weights per output channel, as TFLiteConverter quantises convolutions
    and (TF 2.19) fully connected layers."""
    dims = tuple(range(1, weight.dim()))
    scale = (weight.detach().abs().amax(dim=dims).clamp(min=1e-12) / 127).float()
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, -127, 127)


class QuantSim(nn.Module):
    """The int8 TFLite model of an :class:`~edgetl.train.model.EdgeClassifier`, simulated in float.

    Input: float pixels 0..255, NCHW (the model's own input). ``calibrate`` measures the activation
    ranges; until then, and while it runs, the forward pass is the plain float model (folded).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from edgetl.train.layers import walk

        self.model = model
        self.layers = walk(model)
        self.ranges: dict[str, tuple[float, float]] = {}
        self.observing = True

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._run(pixels, self.layers)

    def calibrate(self, images: np.ndarray) -> None:
        """min/max of every int8 tensor over ``images`` (uint8 NHWC) through the float model.

        Run it like any model: ``edgetl.train.finetune.predict_logits(sim, images, device)``.
        """
        from edgetl.train.loop import predict_logits

        self.ranges, self.observing = {}, True
        try:
            predict_logits(self, images, torch.device("cpu"))
        finally:
            self.observing = False

    def _act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            low, high = float(x.min()), float(x.max())
            if name in self.ranges:
                low, high = min(low, self.ranges[name][0]), max(high, self.ranges[name][1])
            self.ranges[name] = (low, high)
            return x
        low, high = self.ranges[name]
        low, high = min(low, 0.0), max(high, 0.0)  # zero is always exactly representable
        scale = max((high - low) / 255.0, 1e-8)
        zero_point = int(min(127, max(-128, round(-128 - low / scale))))
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, -128, 127)

    def _conv(self, x: torch.Tensor, layer: dict[str, Any]) -> torch.Tensor:
        from edgetl.train.layers import fold

        conv = layer["conv"]
        weight, bias = fold(conv, layer["bn"])
        if not self.observing:
            weight = _fake_quant_weight(weight)
        x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        if layer["act"] == "relu6":
            x = F.relu6(x)
        elif layer["act"] == "relu":
            x = F.relu(x)
        return self._act(layer["name"], x)

    def _run(self, x: torch.Tensor, layers: list[dict[str, Any]]) -> torch.Tensor:
        model = self.model
        for layer in layers:
            op, name = layer["op"], layer["name"]
            if op == "normalize":  # as in the TF graph: a 1x1 depthwise convolution, one int8 tensor (its
                x = self._act(name, x * (1.0 / model.std) - model.mean / model.std)  # weights are exact in int8)
            elif op == "conv":
                x = self._conv(x, layer)
            elif op == "block":
                y = self._run(x, layer["layers"])
                x = self._act(f"{name}/add", x + y) if layer["residual"] else y
            elif op == "mean":
                x = self._act(name, x.mean(dim=(2, 3)))
            elif op == "dense":
                linear = layer["linear"]
                weight = linear.weight if self.observing else _fake_quant_weight(linear.weight)
                x = self._act(name, F.linear(x, weight, linear.bias))
        return x


DISTILL_TEMPERATURE = 2.0


def _kl_from(reference: nn.Module, pixels: torch.Tensor, logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL divergence of the simulated int8 ``logits`` from ``reference``'s predictions at temperature
    ``t`` (no gradient through the reference), times t^2 so its gradients keep their scale (Hinton)."""
    with torch.no_grad():
        target = F.softmax(reference(pixels) / t, dim=1)
    return t * t * F.kl_div(F.log_softmax(logits / t, dim=1), target, reduction="batchmean")


# QAT's epochs draw their batch order and augmentation from seeds apart from the fine-tuning's.
QAT_EPOCH_SEED = 10_000


def _train_epoch(model: nn.Module, sim: QuantSim, images: torch.Tensor, labels: np.ndarray, train_cfg: Any,
                 optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int, cfg: QATConfig,
                 teacher: nn.Module | None = None) -> dict[str, float]:
    """One epoch of the shared training loop (:func:`edgetl.train.loop.train_one_epoch`, the run's own
    augmentation) through the int8 simulation.

    Loss: cross-entropy of the simulated int8 logits, plus ``cfg.consistency`` x KL divergence from the
    same weights' float predictions and ``cfg.distill`` x KL divergence from ``teacher``'s (the original
    model; None when distill is 0): the parity gate asks the int8 model to agree with the original float
    model, so disagreement is penalised directly. The model stays in eval mode:
    frozen BatchNorm statistics (folded by the simulation), no dropout.
    """
    from edgetl.train.loop import train_one_epoch

    def loss_fn(pixels: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, targets, label_smoothing=train_cfg.label_smoothing)
        if cfg.consistency > 0:
            loss = loss + cfg.consistency * _kl_from(model, pixels, logits, 1.0)
        if teacher is not None:
            loss = loss + cfg.distill * _kl_from(teacher, pixels, logits, DISTILL_TEMPERATURE)
        return loss

    model.eval()
    return train_one_epoch(sim, images, labels, train_cfg, optimizer, scheduler, torch.device("cpu"),
                           QAT_EPOCH_SEED + epoch, desc=f"qat epoch {epoch + 1}", loss_fn=loss_fn,
                           drop_single=False)  # fmt: skip


def _metrics(logits: np.ndarray, labels: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    from edgetl.train.loop import agreement, top1

    return {"top1": top1(logits, labels), "agreement": agreement(logits, reference)}


def quantization_aware_finetune(run_dir: str | Path, out_dir: str | Path,
                                cfg: QATConfig = QATConfig()) -> dict:  # noqa: B008 - frozen
    """Fine-tune ``run_dir``'s model with simulated int8 into a new run ``out_dir``; return the record.

    Raises:
        ConfigError: bad settings, or ``out_dir`` already exists.
        RunDirError, DataError: as :func:`edgetl.export.artifacts.export` (no run, changed data, leakage).
    """
    from edgetl.config import FinetuneConfig
    from edgetl.data.cache import load_split
    from edgetl.data.heldout import evaluation_set
    from edgetl.quantize.recipes import calibration_set, load_recipe
    from edgetl.rundir import read_manifest
    from edgetl.runtime.preprocess import PreprocessSpec
    from edgetl.train.checkpoint import load_checkpoint

    cfg.validate()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists():
        raise ConfigError(f"{out_dir} already exists", hint="choose a new --out folder for the QAT run")
    started = time.perf_counter()
    model, checkpoint = load_checkpoint(run_dir)
    manifest = read_manifest(run_dir)
    spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    train_cfg = FinetuneConfig.build(checkpoint["config"])  # batch size, augmentation, label smoothing, seed
    val, _, _, splits = evaluation_set(run_dir, manifest, None)
    calibration = calibration_set(splits, spec, load_recipe(cfg.calib), guard_samples=splits.test, guard_split=val)
    train = load_split(splits.train, spec.resize_size, spec, eval_crop=False, workers=train_cfg.decode_workers)
    model, record = _train(model, train, val, calibration, train_cfg, cfg)
    record = {"source_run": str(run_dir.resolve()), "config": dataclasses.asdict(cfg),
              "calibration": calibration.description, **record}  # fmt: skip
    record["seconds"] = time.perf_counter() - started
    _write_run(run_dir, out_dir, manifest, checkpoint, model, record)
    return record


def _train(model: nn.Module, train: Any, val: Any, calibration: Any, train_cfg: Any,
           cfg: QATConfig) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """The QAT epochs, from the weights as the export equalises them; returns the trained model and
    the record's equalisation and per-epoch history."""
    from edgetl.quantize.equalize import equalize_for_int8
    from edgetl.train.loop import predict_logits

    cpu = torch.device("cpu")
    original = predict_logits(model, val.images, cpu)
    teacher = copy.deepcopy(model).requires_grad_(False) if cfg.distill > 0 else None
    # The int8 model's weights as the export equalises them (edgetl.quantize.equalize); QAT trains them from
    # there and the export uses them as trained.
    model, equalization, relu_equalization = equalize_for_int8(model, calibration.images)
    sim = QuantSim(model)
    history: list[dict[str, Any]] = []

    def evaluate(epoch: int, train_stats: dict[str, float] | None) -> None:
        # Ranges of the weights as they are now, as the export would measure them; the next epoch trains with them.
        sim.calibrate(calibration.images)
        row = {"epoch": epoch, "float": _metrics(predict_logits(model, val.images, cpu), val.labels, original),
               "simulated_int8": _metrics(predict_logits(sim, val.images, cpu), val.labels, original)}  # fmt: skip
        if train_stats:
            row["train_loss"], row["seconds"] = train_stats["train_loss"], train_stats["seconds"]
        history.append(row)
        log.info("qat epoch %d: float top-1 %.2f%% | simulated int8 top-1 %.2f%%, agreement with the original "
                 "float model %.2f%%", epoch, 100 * row["float"]["top1"], 100 * row["simulated_int8"]["top1"],
                 100 * row["simulated_int8"]["agreement"])  # fmt: skip

    evaluate(0, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=train_cfg.weight_decay)
    steps = cfg.epochs * math.ceil(len(train.labels) / train_cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    images = torch.from_numpy(train.images)
    with retained_heap():  # CPU training: see edgetl.train.cpu_heap
        for epoch in range(cfg.epochs):
            stats = _train_epoch(model, sim, images, train.labels, train_cfg, optimizer, scheduler, epoch, cfg, teacher)
            evaluate(epoch + 1, stats)
    return model, {"equalization": equalization, "relu_equalization": relu_equalization, "history": history,
                   "before": history[0], "after": history[-1]}  # fmt: skip


def _write_run(run_dir: Path, out_dir: Path, manifest: dict[str, Any], checkpoint: dict[str, Any],
               model: nn.Module, record: dict[str, Any]) -> None:  # fmt: skip
    """The new run: the fine-tuning record of the original, this model, and the QAT record, moved
    into place whole."""
    from edgetl.rundir import QAT_WEIGHTS, update_manifest, write_json
    from edgetl.train.checkpoint import save_atomically

    tmp_dir = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    kept = [name for name, entry in manifest["files"].items() if entry.get("stage") == "finetune"]
    for name in kept:  # model.pt included: the original float model stays the run's reference
        shutil.copy2(run_dir / name, tmp_dir / name)
    manifest["files"] = {name: manifest["files"][name] for name in kept}
    manifest["stages"] = {"finetune": manifest["stages"]["finetune"]}
    write_json(tmp_dir / "manifest.json", manifest)
    save_atomically({**checkpoint, "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}},
                    tmp_dir / QAT_WEIGHTS)  # fmt: skip
    write_json(tmp_dir / "qat.json", record)
    update_manifest(tmp_dir, "qat", [QAT_WEIGHTS, "qat.json"], record)
    tmp_dir.rename(out_dir)
