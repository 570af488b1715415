"""Microcontroller-size figures: TFLite Micro arena and flash, int8 parity, Vela estimates per Ethos-U target.

Takes a fine-tuned run at the MCU size (MobileNetV2 width 0.35, 96x96; there are no ImageNet weights
at that width, so it is trained from scratch), exports it for ``mcu-tflm`` if it has no int8 model
yet, then:

- parity of the int8 model against the float PyTorch model on the validation split (``edgetl check``);
- TFLite Micro on every validation image: minimum tensor arena (proven at size and size-16), top-1,
  bit-exactness against LiteRT's reference kernels, agreement with LiteRT's default (XNNPACK) kernels;
- flash: the int8 model's bytes (what the C array holds);
- Vela for each Ethos-U target file: NPU op fraction, SRAM and flash use, estimated inference time.

Writes ``results/mcu_bench_<tag>.{json,md}``. To reproduce the run it measures (~15 min on 2 cores):

    edgetl finetune ../shared/data/sign_language_digits/Dataset --out /work/bench-runs/sl_mcu_scratch \\
        --target mcu-tflm --weights none --head-epochs 0 --finetune-epochs 40 --unfreeze-from 0 \\
        --finetune-lr 3e-3 --backbone-lr-mult 1 --bn train --patience 8
    python benchmarks/mcu_bench.py --run /work/bench-runs/sl_mcu_scratch
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import finished_run, machine, write_result  # noqa: E402

VELA_TARGETS = ("ethos-u55", "ethos-u55-256", "ethos-u65-256", "ethos-u85-256")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="/work/bench-runs/sl_mcu_scratch")
    parser.add_argument("--tag", default="sign_language")
    args = parser.parse_args()
    run = finished_run(args.run)
    if run is None:
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from edgetl.data.heldout import evaluation_set
    from edgetl.package import tflm

    manifest = _exported(run)
    finetune, export_stage, check = (manifest["stages"][k] for k in ("finetune", "export", "check"))
    model = run / "model_int8.tflite"
    spec = export_stage["artifacts"]["model_int8.tflite"]
    images, description, _, _ = evaluation_set(run, manifest, None)
    start = time.perf_counter()
    report = tflm.check_model(model, images.images, {k: spec[k] for k in ("input", "output")}, images.labels)
    tflm_seconds = time.perf_counter() - start
    compiled = _vela(model)
    parity = check["artifacts"]["model_int8.tflite"]
    float_top1 = json.loads((run / "parity.json").read_text())["float"]["top1"]
    result = {
        "run": str(run),
        "data": description,
        "training": {"config": finetune["config"], "val_top1": finetune["val_top1"], "arch": finetune["arch"]},
        "int8": {
            "bytes": model.stat().st_size,
            "float32_bytes": (run / "model_float32.tflite").stat().st_size,
            "parity": {k: parity[k] for k in ("top1", "delta_top1_pp", "agreement", "passed")},
            "float_top1": float_top1,
            "bias_correction": export_stage.get("bias_correction"),
        },
        "tflm": {**report.to_dict(), "seconds": tflm_seconds},
        "vela": compiled,
        "machine": machine(),
    }
    write_result(f"mcu_bench_{args.tag}", result, "\n".join(_markdown(args.tag, run, result, report)))
    return 0


def _exported(run: Path) -> dict:
    """The run's manifest, after exporting it with the mcu-tflm target's thresholds if it was not yet."""
    from edgetl.config import export_config
    from edgetl.pipeline import export_and_check
    from edgetl.rundir import read_manifest
    from edgetl.targets import load_target

    manifest = read_manifest(run)
    if "model_int8.tflite" not in manifest["files"]:
        target = load_target("mcu-tflm")
        export_and_check(run, export_config(None, int8=True, max_drop=target.parity.max_drop,
                                            min_agreement=target.parity.min_agreement))  # fmt: skip
        manifest = read_manifest(run)
    return manifest


def _vela(model: Path) -> dict:
    from edgetl.package import vela
    from edgetl.targets import load_target

    compiled = {}
    for name in VELA_TARGETS:
        target = load_target(name)
        with tempfile.TemporaryDirectory() as tmp:
            out, _, _, vela_report = vela.compile_model(model, Path(tmp), target.compile.args)
            compiled[name] = {**vela_report.to_dict(), "model_bytes": out.stat().st_size,
                              "args": list(target.compile.args)}  # fmt: skip
    return compiled


def _markdown(tag: str, run: Path, result: dict, report) -> list[str]:
    finetune, description, compiled = result["training"], result["data"], result["vela"]
    parity, float_top1 = result["int8"]["parity"], result["int8"]["float_top1"]
    ref, default = report.compared["litert_reference_kernels"], report.compared["litert_default_kernels"]
    size = finetune["config"]["image_size"]
    lines = [
        f"# MCU-size model: TFLite Micro and Vela ({tag})",
        "",
        f"Run `{run}`: MobileNetV2 width {finetune['arch']['width']} at {size}x{size}, weights "
        f"{finetune['config']['weights']}, val top-1 (PyTorch) {100 * finetune['val_top1']:.2f}%. Data: "
        f"{description['source']} of `{description['root']}`, {description['count']} images. Machine: "
        f"{result['machine']['cpu']} ({result['machine']['cpus']} CPUs).",
        "",
        "| int8 model | value |",
        "|---|---|",
        f"| flash (model bytes = C array) | {result['int8']['bytes']:,} B (float32: "
        f"{result['int8']['float32_bytes']:,} B) |",
        f"| top-1 float / int8 (LiteRT) | {100 * float_top1:.2f}% / {100 * parity['top1']:.2f}% |",
        f"| Δtop-1, agreement vs float | {parity['delta_top1_pp']:+.2f} pp, {100 * parity['agreement']:.2f}% |",
        f"| TFLM minimum arena | {report.arena_bytes:,} B (verified at size and size-16: {report.arena_verified}) |",
        f"| TFLM top-1 | {100 * report.top1:.2f}% on {report.images} images |",
        f"| TFLM vs LiteRT reference kernels | max diff {ref['max_abs_diff_steps']} steps, agreement "
        f"{100 * ref['agreement']:.2f}% |",
        f"| TFLM vs LiteRT XNNPACK | max diff {default['max_abs_diff_steps']} steps, mean "
        f"{default['mean_abs_diff_steps']:.2f}, agreement {100 * default['agreement']:.2f}% |",
        "",
        "| Vela target | accelerator | system / memory mode | NPU ops | SRAM | flash/DRAM | est. time | model |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in compiled.items():
        storage = v["flash_bytes"] or v["dram_bytes"]
        lines.append(
            f"| {name} | {v['accelerator']} | {v['system_config']} / {v['memory_mode']} | {v['npu_ops']}/"
            f"{v['npu_ops'] + v['cpu_ops']} ({100 * v['npu_fraction']:.0f}%) | {v['sram_bytes']:,} B | "
            f"{storage:,} B | {1000 * v['inference_time_s']:.2f} ms | {v['model_bytes']:,} B |"
        )
    versions = f"Vela {next(iter(compiled.values()))['vela_version']}, tflite-micro {report.version}"
    return lines + ["", f"{versions}. Vela's time is its performance model's estimate for the named system config, "
                    "not a measurement.", ""]  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
