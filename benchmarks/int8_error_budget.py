"""Where the int8 model's logit error comes from: weights vs activations, and which activation tensors.

A PyTorch simulation (:class:`edgetl.quantize.qat.QuantSim`: BN folded, per-channel symmetric int8 weights,
per-tensor int8 activations calibrated min/max) of the graph the export quantises -- the run's model
after :func:`edgetl.quantize.equalize.equalize_for_int8` on the default recipe's calibration images -- compared
with the trained float model on the run's validation split (logit SQNR and top-1 agreement):

- weights int8 (with and without bias correction: each layer's mean weight-rounding error over 128
  calibration images, measured with float inputs, subtracted from its bias, as edgetl's converter does),
  activations float;
- activations int8, weights float;
- both, with bias correction (the closest to the exported model; the real one is in
  ``results/export_bench_*.md``);
- each activation tensor alone int8 (ranked, on every ``--stride``-th validation image).

Explains what is left after equalisation and bias correction. Needs only torch. Writes
``results/int8_error_budget_<tag>.{json,md}``.

    python benchmarks/int8_error_budget.py [--run /work/runs/sl_default]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, write_result  # noqa: E402


def simulation_class():
    import torch
    import torch.nn.functional as F

    from edgetl.quantize.qat import QuantSim, _fake_quant_weight
    from edgetl.train.layers import fold

    class BudgetSim(QuantSim):
        """QuantSim whose weight and activation quantisation can be switched on separately."""

        quantise_weights = True
        bias_correction = False
        activations: set[str] | None = None  # None: every tensor int8
        measuring = False  # accumulate each layer's mean weight-rounding error (float inputs)
        errors: dict[str, tuple[torch.Tensor, int]]

        def _act(self, name, x):
            if self.observing or self.activations is None or name in self.activations:
                return super()._act(name, x)
            return x

        def _conv(self, x, layer):
            conv, name = layer["conv"], layer["name"]
            weight, bias = fold(conv, layer["bn"])
            if self.quantise_weights and not self.observing:
                rounded = _fake_quant_weight(weight)
                if self.measuring:
                    error = F.conv2d(x, rounded - weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                    total, count = self.errors.get(name, (0, 0))
                    positions = error.shape[0] * error[0, 0].numel()
                    self.errors[name] = (total + error.double().sum((0, 2, 3)), count + positions)
                else:
                    if self.bias_correction:
                        total, count = self.errors[name]
                        bias = bias - (total / count).to(bias.dtype)
                    weight = rounded
            x = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            if layer["act"] == "relu6":
                x = F.relu6(x)
            elif layer["act"] == "relu":
                x = F.relu(x)
            return self._act(name, x)

    return BudgetSim


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/work/runs/sl_default")
    parser.add_argument("--tag", default="sign_language")
    parser.add_argument("--stride", type=int, default=3, help="rank tensors on every n-th validation image")
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    run = finished_run(args.run)
    if run is None:
        return 0
    m = _simulate(run, args.stride)
    result = {
        "run": str(run),
        "data": m["description"],
        "calibration": m["calibration"].description,
        "configurations": m["configurations"],
        "activation_tensors": len(m["alone"]),
        "one_tensor_int8": {name: {**m["alone"][name], "range": list(m["ranges"][name])} for name in m["ranked"]},
        "sum_of_one_tensor_noise_db": round(float(-10 * np.log10(m["noise"])), 2),
        "machine": machine(),
    }
    write_result(f"int8_error_budget_{args.tag}", result, "\n".join(_markdown(args, run, m, result)))
    return 0


def _simulate(run: Path, stride: int) -> dict:
    """The equalised int8 graph simulated (QuantSim), scored against the float model in each configuration,
    then with one activation tensor in int8 at a time."""
    import torch

    from edgetl.data.heldout import evaluation_set
    from edgetl.quantize.equalize import equalize_for_int8
    from edgetl.quantize.recipes import calibration_set, load_recipe
    from edgetl.rundir import read_manifest
    from edgetl.runtime.preprocess import PreprocessSpec
    from edgetl.train.checkpoint import load_checkpoint
    from edgetl.train.loop import predict_logits, torch_logits

    model, checkpoint = load_checkpoint(run)
    model.eval()
    val, description, _, splits = evaluation_set(run, read_manifest(run), None)
    spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    calibration = calibration_set(splits, spec, load_recipe("default"), None, guard_split=val)
    reference = torch_logits(model, val.images)
    int8_model, _, _ = equalize_for_int8(model, calibration.images)
    sim = simulation_class()(int8_model)
    sim.calibrate(calibration.images)
    cpu = torch.device("cpu")

    def score(images: np.ndarray, ref: np.ndarray, **switches) -> dict[str, float]:
        for key, value in switches.items():
            setattr(sim, key, value)
        return _sqnr_and_agreement(predict_logits(sim, images, cpu), ref)

    # each layer's mean weight-rounding error on 128 calibration images, activations float
    sim.errors = {}
    measured = calibration.images[:128]
    score(measured, torch_logits(int8_model, measured), activations=set(), measuring=True)
    sim.measuring = False
    configurations = {
        "int8 graph in float (ReLU6 equalisation clips above the calibration maximum)": _sqnr_and_agreement(
            torch_logits(int8_model, val.images), reference),
        "weights int8, no bias correction; activations float": score(
            val.images, reference, quantise_weights=True, bias_correction=False, activations=set()),
        "weights int8 + bias correction; activations float": score(
            val.images, reference, quantise_weights=True, bias_correction=True, activations=set()),
        "activations int8; weights float": score(val.images, reference, quantise_weights=False, activations=None),
        "weights int8 + bias correction and activations int8": score(
            val.images, reference, quantise_weights=True, bias_correction=True, activations=None),
    }  # fmt: skip
    subset, subset_reference = val.images[::stride], reference[::stride]
    alone = {name: score(subset, subset_reference, quantise_weights=False, activations={name})
             for name in sim.ranges}  # fmt: skip
    return {"description": description, "calibration": calibration, "configurations": configurations,
            "alone": alone, "ranked": sorted(alone, key=lambda name: alone[name]["sqnr_db"]), "ranges": sim.ranges,
            "noise": sum(10 ** (-alone[name]["sqnr_db"] / 10) for name in alone), "subset": len(subset)}  # fmt: skip


def _sqnr_and_agreement(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    sqnr = 10 * np.log10((ref**2).sum() / ((logits - ref) ** 2).sum())
    return {"sqnr_db": round(float(sqnr), 2), "agreement": float((logits.argmax(1) == ref.argmax(1)).mean())}


def _markdown(args: argparse.Namespace, run: Path, m: dict, result: dict) -> list[str]:
    description, alone, ranges = m["description"], m["alone"], m["ranges"]
    return [
        f"# int8 error budget, simulated ({args.tag})",
        "",
        f"Run `{run}`; reference: the trained float model on {description['count']} images "
        f"({description['source']}); calibration: the default recipe ({len(m['calibration'].paths)} images). "
        "Simulation: edgetl.quantize.qat.QuantSim on the equalised int8 graph (equalize_for_int8); one run, "
        "deterministic.",
        "",
        "| configuration | logit SQNR (dB) | agreement |",
        "|---|---|---|",
        *[f"| {k} | {v['sqnr_db']:.1f} | {100 * v['agreement']:.2f}% |" for k, v in m["configurations"].items()],
        "",
        f"One activation tensor int8 at a time (weights float; every {args.stride}rd validation image, "
        f"{m['subset']}): the {args.top} costliest of {len(alone)}. Their noise powers summed over all tensors "
        f"would give {result['sum_of_one_tensor_noise_db']:.1f} dB.",
        "",
        "| tensor | calibrated range | logit SQNR (dB) |",
        "|---|---|---|",
        *[f"| `{n}` | {ranges[n][0]:.2f} .. {ranges[n][1]:.2f} | {alone[n]['sqnr_db']:.1f} |"
          for n in m["ranked"][: args.top]],  # fmt: skip
        "",
    ]


if __name__ == "__main__":
    sys.exit(main())
