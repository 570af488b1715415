"""Which layer's int8 *weights* cost agreement with float? A PyTorch simulation on a fine-tuned run.

Each convolution is taken with its BatchNorm folded in (as the converter does), its weights rounded
to per-output-channel symmetric int8, and unfolded again; activations stay float. The script reports
top-1 agreement with the float model on the run's validation split when

- every layer's weights are int8,
- only one layer's weights are int8 (for each layer; the worst ones listed),
- every layer but the worst one is int8,

and the folded weight statistics of the worst layer (largest |w| against the median, the channel).
This is the diagnosis behind edgetl's bias correction and linear-bottleneck equalisation; it needs
only torch. Writes ``results/int8_layer_sensitivity_<tag>.{json,md}``.

    python benchmarks/int8_layer_sensitivity.py [--run /work/runs/sl_default]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, write_result  # noqa: E402


def folded_layers(net):
    """(name, conv, bn) for every convolution followed by a BatchNorm in MobileNetV2."""
    import torch.nn as nn

    modules = dict(net.named_modules())
    layers = []
    for name, module in modules.items():
        if isinstance(module, nn.Sequential) or type(module).__name__ == "Conv2dNormActivation":
            children = list(module.named_children())
            for (a_name, a), (_, b) in zip(children, children[1:], strict=False):
                if isinstance(a, nn.Conv2d) and isinstance(b, nn.BatchNorm2d):
                    layers.append((f"{name}.{a_name}", a, b))
    return layers


def quantised_weight(conv, bn):
    """The conv weight whose BN-folded version is rounded to per-channel symmetric int8."""
    import torch

    factor = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    folded = conv.weight.detach() * factor[:, None, None, None]
    scale = folded.abs().flatten(1).amax(1).clamp_min(1e-12) / 127
    rounded = torch.round(folded / scale[:, None, None, None]).clamp(-127, 127) * scale[:, None, None, None]
    return rounded / factor[:, None, None, None], folded


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/work/runs/sl_default")
    parser.add_argument("--tag", default="sign_language")
    parser.add_argument("--top", type=int, default=5)
    args = parser.parse_args()
    run = finished_run(args.run)
    if run is None:
        return 0
    m = _measure(run)
    names, alone, ranked, worst = m["names"], m["alone"], m["ranked"], m["worst"]
    result = {
        "run": str(run),
        "data": m["description"],
        "layers": len(names),
        "agreement_all_int8_weights": m["every"],
        "agreement_one_layer_int8": {name: alone[name] for name in ranked[: args.top]},
        "agreement_all_but_worst": m["all_but_worst"],
        "worst_layer": worst,
        "machine": machine(),
    }
    description = m["description"]
    lines = [
        f"# int8 weight sensitivity per layer ({args.tag})",
        "",
        f"Run `{run}`, {description['count']} images ({description['source']}). BN folded, per-channel "
        "symmetric int8 weights, float activations; top-1 agreement with the float model.",
        "",
        f"- every layer int8: {100 * m['every']:.2f}%",
        f"- every layer but `{worst['layer']}` int8: {100 * m['all_but_worst']:.2f}%",
        "- worst single layers (only that layer int8): "
        + ", ".join(f"`{n}` {100 * alone[n]:.2f}%" for n in ranked[: args.top]),
        f"- `{worst['layer']}` channel {worst['channel']}: folded |w| max {worst['max_abs_folded_weight']:.1f} "
        f"(median channel peak {worst['median_channel_peak']:.2f}), BN running_var {worst['running_var']:.2e}, "
        f"folded bias {worst['folded_bias']:.1f}",
        "",
    ]
    write_result(f"int8_layer_sensitivity_{args.tag}", result, "\n".join(lines))
    return 0


def _measure(run: Path) -> dict:
    """Agreement with every layer's weights int8, with each layer alone int8, and without the worst one."""
    import torch

    from edgetl.data.heldout import evaluation_set
    from edgetl.rundir import read_manifest
    from edgetl.train.checkpoint import load_checkpoint
    from edgetl.train.loop import torch_logits

    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, _ = load_checkpoint(run)
    model.eval()
    images, description, _, _ = evaluation_set(run, read_manifest(run), None)
    reference = torch_logits(model, images.images).argmax(1)
    layers = folded_layers(model.net)
    originals = {name: conv.weight.detach().clone() for name, conv, _ in layers}
    quantised = {name: quantised_weight(conv, bn)[0] for name, conv, bn in layers}

    def agreement(int8_layers: set[str]) -> float:
        with torch.no_grad():
            for name, conv, _ in layers:
                conv.weight.copy_(quantised[name] if name in int8_layers else originals[name])
        predicted = torch_logits(model, images.images).argmax(1)
        return float(np.mean(predicted == reference))

    names = [name for name, _, _ in layers]
    every = agreement(set(names))
    alone = {name: agreement({name}) for name in names}
    ranked = sorted(alone, key=alone.get)
    all_but_worst = agreement(set(names) - {ranked[0]})
    agreement(set())  # restore
    return {"description": description, "names": names, "every": every, "alone": alone, "ranked": ranked,
            "all_but_worst": all_but_worst, "worst": _worst_layer(layers, ranked[0])}  # fmt: skip


def _worst_layer(layers: list, worst: str) -> dict:
    """The worst layer's largest folded weight and the BatchNorm statistics behind it."""
    import torch

    conv, bn = next((c, b) for n, c, b in layers if n == worst)
    _, folded = quantised_weight(conv, bn)
    peak = folded.abs().flatten(1).amax(1)
    channel = int(peak.argmax())
    return {
        "layer": worst,
        "channel": channel,
        "max_abs_folded_weight": float(peak.max()),
        "median_channel_peak": float(peak.median()),
        "running_var": float(bn.running_var[channel]),
        "folded_bias": float((bn.bias[channel] - bn.weight[channel] * bn.running_mean[channel]
                              / torch.sqrt(bn.running_var[channel] + bn.eps)).detach()),  # fmt: skip
    }


if __name__ == "__main__":
    sys.exit(main())
