"""Microcontrollers and Ethos-U NPUs: TFLite Micro runs, arena sizing, Vela compiles, budgets and fallbacks.

Everything runs the real tools (tflite-micro's interpreter, ethos-u-vela) on the session's exported toy
model (MobileNetV2 width 1.0 at 64x64, int8).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgetl.cli import main
from edgetl.rundir import read_manifest
from edgetl.targets import load_target

pytest.importorskip("tflite_micro", reason="needs the mcu extra (tflite-micro)")
pytest.importorskip("ethosu.vela", reason="needs the mcu extra (ethos-u-vela)")

pytestmark = pytest.mark.slow


def _side(run_dir: Path) -> int:
    return read_manifest(run_dir)["stages"]["export"]["artifacts"]["model_int8.tflite"]["input"]["shape"][1]


def _target(run_dir: Path, name: str, folder: Path, **replace: str) -> Path:
    """A copy of target ``name`` at the toy model's input size, with text replacements."""
    text = open(load_target(name).source).read()
    for size in ("size = 96", "size = 224"):
        text = text.replace(size, f"size = {_side(run_dir)}")
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = folder / f"{name}.toml"
    path.write_text(text)
    return path


def _package(run_dir, target, out, *extra):
    args = ["-q", "package", str(run_dir), "--target", str(target), "--out", str(out), "--force", "--json", *extra]
    return CliRunner().invoke(main, args)


def _stderr(result) -> str:
    return result.stderr if hasattr(result, "stderr") else result.output


# ----------------------------------------------------------------------------- TFLite Micro


@pytest.fixture(scope="module")
def mcu_bundle(exported_run, tmp_path_factory):
    """The toy run packaged for mcu-tflm (budgets opened up): (run_dir, bundle_dir, result json)."""
    _, run_dir = exported_run
    folder = tmp_path_factory.mktemp("mcu")
    target = _target(run_dir, "mcu-tflm", folder, **{"max_model_bytes = 1_000_000": "max_model_bytes = 100_000_000",
                                                     "max_arena_bytes = 400_000": "max_arena_bytes = 50_000_000"})
    result = _package(run_dir, target, folder / "b")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return run_dir, Path(report["bundle_dir"]), report, target


def test_tflm_runs_every_op_and_measures_the_minimum_arena(mcu_bundle):
    run_dir, bundle, report, _ = mcu_bundle
    tflm = report["tflm"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["tflm"] == tflm
    val_images = read_manifest(run_dir)["stages"]["check"]["data"]["count"]
    assert tflm["images"] == min(val_images, 128) > 0
    # The arena is proven minimal: one inference ran at exactly this size and one failed 16 bytes below.
    assert tflm["arena_verified"] is True
    # It must at least hold the input and the largest activation of the model (64x64 input, 32-ch stem).
    assert tflm["arena_bytes"] > _side(run_dir) ** 2 * 3 + (_side(run_dir) // 2) ** 2 * 32
    # TFLM and LiteRT's reference kernels do the same int8 arithmetic: bit-exact outputs.
    reference = tflm["compared"]["litert_reference_kernels"]
    assert reference["max_abs_diff_steps"] == 0 and reference["agreement"] == 1.0
    assert reference["reference_top1"] == tflm["top1"]
    # XNNPACK (what the parity check ran) rounds differently; on this barely trained toy model the
    # outputs differ by up to ~15 steps (measured), and the top-1 still mostly agrees.
    default = tflm["compared"]["litert_default_kernels"]
    assert default["agreement"] >= 0.85 and default["max_abs_diff_steps"] < 64
    assert 0.5 <= tflm["top1"] <= 1.0  # the toy model learned its four classes
    readme = (bundle / "README.txt").read_text()
    assert f"tensor arena of {tflm['arena_bytes']:,} bytes" in readme and "edgetl_model_data.c" in readme


def test_tflm_arena_is_independently_reproducible(mcu_bundle):
    """Run the worker at the reported arena and 16 bytes below it, outside edgetl's own check."""
    from edgetl.package.tflm import _run

    run_dir, _, report, _ = mcu_bundle
    arena = report["tflm"]["arena_bytes"]
    pixels = np.zeros((1, _side(run_dir), _side(run_dir), 3), np.uint8)
    model = (run_dir / "model_int8.tflite").resolve()
    work = run_dir.parent / "arena-check"
    work.mkdir(exist_ok=True)
    assert _run(model, arena, pixels, work)[0]
    assert not _run(model, arena - 16, pixels, work)[0]


def test_arena_over_budget_is_exit_4_with_the_overshoot(mcu_bundle, tmp_path):
    run_dir, _, report, target = mcu_bundle
    arena = report["tflm"]["arena_bytes"]
    tight = tmp_path / "tight.toml"
    tight.write_text(target.read_text().replace("max_arena_bytes = 50_000_000", f"max_arena_bytes = {arena - 1000}"))
    result = _package(run_dir, tight, tmp_path / "b")
    assert result.exit_code == 4, result.output
    assert f"tensor arena is {arena:,} bytes, 1,000 over the target's {arena - 1000:,}" in _stderr(result)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())


def test_flash_over_budget_is_exit_4_with_the_overshoot(exported_run, tmp_path):
    _, run_dir = exported_run
    size = (run_dir / "model_int8.tflite").stat().st_size
    target = _target(run_dir, "mcu-tflm", tmp_path)  # 1,000,000 bytes of flash; the toy model is larger
    assert size > 1_000_000
    result = _package(run_dir, target, tmp_path / "b")
    assert result.exit_code == 4
    assert f"model_int8.tflite is {size:,} bytes, {size - 1_000_000:,} over the target's 1,000,000" in _stderr(result)


def test_tflm_names_an_op_it_has_no_kernel_for(exported_run, tmp_path):
    """A Vela-compiled model holds the ethos-u custom op, which plain TFLite Micro cannot run."""
    from edgetl.errors import ExitCode
    from edgetl.package import tflm, vela

    _, run_dir = exported_run
    compiled, *_ = vela.compile_model(run_dir / "model_int8.tflite", tmp_path, load_target("ethos-u55").compile.args)
    pixels = np.zeros((1, _side(run_dir), _side(run_dir), 3), np.uint8)
    with pytest.raises(tflm.TFLMUnsupported, match="no kernel for CUSTOM") as info:
        tflm.check_model(compiled, pixels)
    assert info.value.exit_code == ExitCode.CONSTRAINT_VIOLATED


# ----------------------------------------------------------------------------- Vela / Ethos-U


@pytest.mark.parametrize("name", ["ethos-u55", "ethos-u65-256"])
def test_vela_compiles_every_op_onto_the_npu(exported_run, tmp_path, name):
    _, run_dir = exported_run
    target = _target(run_dir, name, tmp_path)
    if name == "ethos-u55":  # the toy model is width 1.0; the U55 target's flash budget is for width 0.35
        target.write_text(target.read_text().replace("max_model_bytes = 2_000_000", "max_model_bytes = 9_000_000"))
    result = _package(run_dir, target, tmp_path / "b")
    assert result.exit_code == 0, result.output
    bundle = Path(json.loads(result.stdout)["bundle_dir"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    accel = manifest["accelerator"]
    expected = {"ethos-u55": "Ethos_U55_128", "ethos-u65-256": "Ethos_U65_256"}[name]
    assert accel["tool"] == "vela" and accel["compiled"] and accel["accelerator"] == expected
    assert accel["cpu_ops"] == 0 and accel["npu_ops"] > 20 and accel["npu_fraction"] == 1.0
    assert 0 < accel["inference_time_s"] < 1 and accel["cycles_total"] > accel["cycles_npu"] > 0
    assert accel["macs"] > 1e6 and accel["sram_bytes"] > 0
    compiled = (bundle / "model_int8_vela.tflite").read_bytes()
    assert accel["model_bytes"] == len(compiled) and compiled != (run_dir / "model_int8.tflite").read_bytes()
    assert {"vela.log", "vela_summary.csv", "edgetl_model_data.c", "edgetl_model_data.h"} <= set(manifest["files"])
    # The firmware's C array is the Vela model, not the plain int8 one.
    source = (bundle / "edgetl_model_data.c").read_text()
    assert f"edgetl_model_data_len = {len(compiled)}u;" in source
    assert "holds\nmodel_int8_vela.tflite" in (bundle / "README.txt").read_text()
    if name == "ethos-u65-256":  # the SRAM budget is Vela's 384 KiB cache
        assert accel["sram_bytes"] <= 384 * 1024 and accel["memory_mode"] == "Dedicated_Sram_384KB"


def test_ops_left_on_the_cortex_m_are_exit_7_unless_allowed(exported_run, tmp_path):
    """Vela's --ignore-ops sends every ADD to the CPU: a real fallback, refused, then accepted."""
    _, run_dir = exported_run
    replace = {'"Shared_Sram"]': '"Shared_Sram", "--ignore-ops", "ADD"]',
               "max_model_bytes = 2_000_000": "max_model_bytes = 9_000_000"}
    target = _target(run_dir, "ethos-u55", tmp_path, **replace)
    refused = _package(run_dir, target, tmp_path / "b")
    assert refused.exit_code == 7, refused.output
    assert "operations would run on the CPU, not the NPU" in _stderr(refused) and "features.3/add" in _stderr(refused)
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").iterdir())

    allowed = _package(run_dir, target, tmp_path / "b", "--allow-cpu-ops")
    assert allowed.exit_code == 0, allowed.output
    accel = json.loads(allowed.stdout)["accelerator"]
    assert accel["cpu_ops"] > 0 and accel["npu_fraction"] < 1
    assert all(op["tensor"].endswith("/add") for op in accel["cpu_operations"])
    assert len(accel["cpu_operations"]) == accel["cpu_ops"]

    # A target that allows that many fallbacks packages without the flag.
    lenient = tmp_path / "lenient.toml"
    lenient.write_text(target.read_text().replace("max_cpu_ops = 0", f"max_cpu_ops = {accel['cpu_ops']}"))
    assert _package(run_dir, lenient, tmp_path / "c").exit_code == 0


def test_vela_sram_over_budget_is_exit_4(exported_run, tmp_path):
    _, run_dir = exported_run
    target = _target(run_dir, "ethos-u55", tmp_path, **{"max_arena_bytes = 1_500_000": "max_arena_bytes = 1_000",
                                                        "max_model_bytes = 2_000_000": "max_model_bytes = 9_000_000"})
    result = _package(run_dir, target, tmp_path / "b")
    assert result.exit_code == 4
    message = _stderr(result)
    assert "Vela's SRAM use (Ethos_U55_128, Shared_Sram) is" in message and "over the target's 1,000" in message


def test_vela_fallback_reasons_are_parsed_from_a_model_with_unsupported_ops(tmp_path):
    """A tiny int8 model with CUMSUM (no NPU support; the converter leaves it in float)."""
    tf = pytest.importorskip("tensorflow")
    from edgetl.package import vela

    inp = tf.keras.Input((16, 16, 3), batch_size=1)
    x = tf.keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    out = tf.keras.layers.Lambda(lambda t: tf.math.cumsum(t, axis=1))(x)
    converter = tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inp, out))
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    rng = np.random.default_rng(0)
    converter.representative_dataset = lambda: ([rng.random((1, 16, 16, 3), np.float32)] for _ in range(8))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    model = tmp_path / "cumsum.tflite"
    model.write_bytes(converter.convert())

    _, _, _, report = vela.compile_model(model, tmp_path, ("--accelerator-config", "ethos-u55-128"))
    ops = {op["op"]: op for op in report.cpu_operations}
    assert "CUMSUM" in ops and ops["CUMSUM"]["reason"] == "Unsupported opType"
    assert report.cpu_ops == len(report.cpu_operations) and report.npu_ops >= 1
    assert report.npu_fraction == pytest.approx(report.npu_ops / (report.npu_ops + report.cpu_ops))


def test_missing_vela_is_exit_5_and_no_compile_ships_a_script(exported_run, tmp_path):
    _, run_dir = exported_run
    target = _target(run_dir, "ethos-u55", tmp_path, **{"max_model_bytes = 2_000_000": "max_model_bytes = 9_000_000"})
    hide = tmp_path / "hide" / "ethosu"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = {"PYTHONPATH": str(hide.parent)}
    args = ["-m", "edgetl", "-q", "package", str(run_dir), "--target", str(target), "--out", str(tmp_path / "b")]
    missing = subprocess.run([sys.executable, *args, "--force"], capture_output=True, text=True,
                             env={**os.environ, **env})  # fmt: skip
    assert missing.returncode == 5, missing.stderr
    assert "ethosu.vela is not installed" in missing.stderr and "edgetl[mcu]" in missing.stderr
    assert "Traceback" not in missing.stderr

    shipped = _package(run_dir, target, tmp_path / "b", "--no-compile")
    assert shipped.exit_code == 0, shipped.output
    bundle = Path(json.loads(shipped.stdout)["bundle_dir"])
    script = (bundle / "compile_vela.sh").read_text()
    assert "vela --config Arm/vela.ini --accelerator-config ethos-u55-128" in script
    assert "--output-dir . model_int8.tflite" in script
    assert json.loads((bundle / "manifest.json").read_text())["accelerator"]["compiled"] is False


def test_finetune_takes_width_and_input_size_from_the_mcu_target(toy_data, tmp_path):
    """`edgetl finetune --target mcu-tflm` trains at the target's width (0.35) and input size; flags win."""
    target = tmp_path / "mcu.toml"
    target.write_text(open(load_target("mcu-tflm").source).read().replace("size = 96", "size = 40"))
    base = ["-q", "finetune", str(toy_data), "--target", str(target), "--weights", "none", "--head-epochs", "1",
            "--finetune-epochs", "0", "--batch-size", "16", "--json"]  # fmt: skip
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "a")["stages"]["finetune"]
    assert manifest["arch"]["width"] == 0.35 and manifest["config"]["image_size"] == 40
    assert manifest["preprocess"]["image_size"] == 40
    result = CliRunner().invoke(main, [*base, "--out", str(tmp_path / "b"), "--width", "0.5"])
    assert result.exit_code == 0, result.output
    assert read_manifest(tmp_path / "b")["stages"]["finetune"]["arch"]["width"] == 0.5
