"""Export: ONNX and TFLite artifacts, the int8 model's structure, calibration, parity and its gate."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import copy_run

from edgetl.check.runners import runner_for
from edgetl.cli import main
from edgetl.config import data_dir
from edgetl.data.folders import discover
from edgetl.errors import ConfigError, DataError
from edgetl.quantize.recipes import CalibRecipe, calibration_set, load_recipe
from edgetl.quantize.tflite_facts import inspect_tflite, size_breakdown
from edgetl.rundir import read_manifest, verify_files
from edgetl.runtime.preprocess import PreprocessSpec
from edgetl.targets import load_target
from edgetl.train.checkpoint import load_checkpoint
from edgetl.train.loop import predict_logits

pytestmark = pytest.mark.slow


def test_int8_model_is_full_integer_with_raw_pixel_input(exported_run):
    _, run_dir = exported_run
    facts = inspect_tflite(str(run_dir / "model_int8.tflite"))
    assert facts.input.dtype == "uint8"
    assert facts.input.shape == (1, 64, 64, 3)  # batch 1, NHWC, static
    assert (facts.input.scale, facts.input.zero_point) == (1.0, 0)  # raw pixels, norm in the graph
    assert facts.output.dtype == "uint8" and facts.output.scale > 0  # int8 logits + one QUANTIZE (tool_metadata)
    assert facts.float_tensors == []
    # MobileNetV2's 52 convolutions and the normalisation, a 1x1 depthwise convolution (edgetl.export.tf_graph)
    assert facts.conv_weights == 53 and facts.per_tensor_conv_weights == []
    assert set(facts.tensor_dtypes) <= {"int8", "uint8", "int32"}
    assert facts.full_integer_problems() == []


def test_size_breakdown_accounts_for_per_channel_parameters(exported_run):
    _, run_dir = exported_run
    int8 = size_breakdown(str(run_dir / "model_int8.tflite"))
    float32 = size_breakdown(str(run_dir / "model_float32.tflite"))
    assert int8["file"] == (run_dir / "model_int8.tflite").stat().st_size
    assert int8["weights"] * 4 == float32["weights"] > 0  # same weights, one byte each instead of four
    assert int8["biases"] == float32["biases"] > 0  # int32 and float32 biases
    # every conv/FC output channel has a weight and a bias scale (float32), stored per tensor; their
    # int64 zero points (all 0) are stored once per length (edgetl.export.tflite_dedup): 24 bytes per channel
    # as the converter writes them, 8 here
    channels = int8["biases"] // 4
    assert 8 * channels <= int8["quantization_parameters"] < 12 * channels
    assert float32["quantization_parameters"] == 0
    assert 0 <= int8["other"] < int8["file"] // 2


def test_int8_model_is_built_from_the_relu_equalised_graph(exported_run):
    """Block 1's depthwise weights: per-channel int8 scales are the folded float weights' max / 127,
    divided by the channel's ReLU6 equalisation factor (>= 1, > 1 where the stem's channel was narrow)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from edgetl.train.layers import fold

    _, run_dir = exported_run
    model, _ = load_checkpoint(run_dir)
    block = model.net.features[1].conv[0]
    weight, _ = fold(block[0], block[1], torch.float64)
    expected = weight.detach().abs().amax((1, 2, 3)).numpy() / 127
    interpreter = Interpreter(model_path=str(run_dir / "model_int8.tflite"),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    tensors = {t["index"]: t for t in interpreter.get_tensor_details()}
    ops = interpreter._get_ops_details()
    # The raw pixels go through one 1x1 depthwise convolution (the normalisation), not a broadcast MUL + ADD.
    assert [op["op_name"] for op in ops[:3]] == ["QUANTIZE", "DEPTHWISE_CONV_2D", "PAD"]
    assert tensors[ops[1]["inputs"][1]]["shape"].tolist() == [1, 1, 1, 3]
    depthwise = next(op for op in ops if op["op_name"] == "DEPTHWISE_CONV_2D" and "features.1" in
                     tensors[op["outputs"][0]]["name"])  # fmt: skip
    details = tensors[depthwise["inputs"][1]]
    ratio = details["quantization_parameters"]["scales"] / expected
    assert len(ratio) == len(expected)
    assert (ratio <= 1 + 1e-4).all() and ratio.min() < 0.9, ratio


def test_float_model_is_not_mistaken_for_int8(exported_run):
    _, run_dir = exported_run
    problems = inspect_tflite(str(run_dir / "model_float32.tflite")).full_integer_problems()
    assert any("float" in p for p in problems)


def test_float_exports_match_pytorch_within_1e_4(exported_run):
    _, run_dir = exported_run
    model, checkpoint = load_checkpoint(run_dir)
    spec = PreprocessSpec.from_dict(checkpoint["preprocess"])
    from edgetl.data.cache import load_split

    root = read_manifest(run_dir)["stages"]["finetune"]["data"]["root"]
    val = load_split(discover(root).val, spec.resize_size, spec, eval_crop=True)
    reference = predict_logits(model, val.images, torch.device("cpu"))
    for name in ("model.onnx", "model_float32.tflite"):
        assert np.abs(runner_for(run_dir / name)(val.images) - reference).max() <= 1e-4, name


def test_manifest_records_artifacts_io_calibration_versions(exported_run):
    result, run_dir = exported_run
    manifest = read_manifest(run_dir)
    assert verify_files(run_dir, manifest) == []
    for name in ("model.onnx", "model_float32.tflite", "model_int8.tflite", "parity.json"):
        assert name in manifest["files"]
    stage = manifest["stages"]["export"]
    int8 = stage["artifacts"]["model_int8.tflite"]
    assert int8["output"]["dtype"] == "uint8" and int8["output"]["scale"] > 0  # edgetl.export.tool_metadata
    assert stage["calibration"]["recipe"]["name"] == "default"
    assert len(stage["calibration"]["sha256"]) == 64 and stage["calibration"]["count"] > 0
    assert {"torch", "tensorflow", "ai-edge-litert"} <= set(stage["versions"])
    assert stage["converter"] == "direct" and "onnx2tf_s" not in stage["timings"]
    assert stage["timings"]["tflite_float_s"] > 0 and stage["parity_passed"] == result.parity.passed
    assert not (run_dir / ".export-work").exists()
    weighted = sum(n for op, n in inspect_tflite(str(run_dir / "model_int8.tflite")).ops.items()
                   if op in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"))  # fmt: skip
    assert stage["bias_correction"]["layers"] == weighted > 0
    assert stage["bias_correction"]["images"] > 0
    activations = stage["bias_correction"]["activations"]  # what rounding the activations left
    assert activations["sequential"]["layers"] == weighted and activations["sequential"]["images"] > 0
    assert activations["output_layer"]["op"] == "FULLY_CONNECTED" and activations["held_out_images"] > 0
    scores = activations["held_out_sqnr_db"]
    assert set(scores) == {"uncorrected", "output_layer", "sequential"}
    assert scores[activations["kept"]] == max(scores.values())
    split = stage["int8_calibration_split"]  # half of the images calibrated by a second process (2+ cores)
    expected_helper = split["images"] - split["images"] // 2 if len(os.sched_getaffinity(0)) > 1 else 0
    assert split["images"] > 1 and split["helper_images"] == expected_helper and "helper_failed" not in split
    # The int8 model's own graph had every stage's linear stream range-equalised ...
    assert [r["tensor"] for r in stage["equalization"]][:2] == ["features.1", "features.2+3"]
    assert len(stage["equalization"]) == 7 and all(r["scale_max"] >= 1.0 for r in stage["equalization"])
    # ... and every ReLU6 that feeds a depthwise convolution.
    assert [r["tensor"] for r in stage["relu_equalization"]] == ["features.0"] + [
        f"features.{i}.conv.0" for i in range(2, 18)]  # fmt: skip
    assert int8.get("max_abs_logit_diff_vs_torch") is None
    assert stage["artifacts"]["model_float32.tflite"]["max_abs_logit_diff_vs_torch"] <= 1e-4


def test_parity_report_has_every_metric(exported_run):
    _, run_dir = exported_run
    report = json.loads((run_dir / "parity.json").read_text())
    assert set(report["artifacts"]) == {"model.onnx", "model_float32.tflite", "model_int8.tflite"}
    for name, metrics in report["artifacts"].items():
        for key in ("top1", "delta_top1_pp", "agreement", "cosine_mean", "per_class", "worst_classes", "passed"):
            assert key in metrics, (name, key)
    assert report["artifacts"]["model.onnx"]["agreement"] == 1.0
    assert report["artifacts"]["model.onnx"]["passed"] is True
    assert "| model_int8.tflite | int8 |" in (run_dir / "parity.md").read_text()
    assert (run_dir / "parity.png").read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(run_dir)["stages"]["check"]["artifacts"]["model.onnx"]["passed"] is True


def test_export_never_reached_the_network(exported_run, netguard_log):
    assert not netguard_log.exists() or netguard_log.read_text() == ""


def test_check_command_json_and_exit_code(exported_run, tmp_path):
    result, shared_run = exported_run
    run_dir = copy_run(shared_run, tmp_path / "run")  # check rewrites the verdicts: keep the fixture's
    thresholds = ["--max-drop", "10", "--min-agreement", "0.85"]  # the fixture's (see conftest)
    cli = CliRunner().invoke(main, ["-q", "check", str(run_dir), *thresholds, "--json"])
    payload = json.loads(cli.stdout)
    assert cli.exit_code == (0 if payload["passed"] else 3)
    assert payload["passed"] == result.parity.passed
    assert payload["artifacts"]["model_int8.tflite"]["top1"] == result.parity.artifacts["model_int8.tflite"]["top1"]
    # An impossible requirement fails the gate with the documented exit code.
    strict = CliRunner().invoke(main, ["-q", "check", str(run_dir), "--max-drop", "0", "--min-agreement", "1"])
    report = json.loads((run_dir / "parity.json").read_text())
    expected = 0 if all(a["agreement"] == 1.0 and a["delta_top1_pp"] >= 0 for a in report["artifacts"].values()) else 3
    assert strict.exit_code == expected
    assert read_manifest(run_dir)["stages"]["check"]["passed"] is (expected == 0)


def test_blank_calibration_fails_parity_with_exit_3_and_a_diagnosis(learned_run, tmp_path, netguard_log, monkeypatch):
    """Calibrating on blank white images (without bias correction, which measured on them too rescues
    this easy 4-class model) makes a useless int8 model: the gate must catch it. (Black images no longer
    do since the direct converter: they flipped no prediction of this model; grey and white do.)"""
    from PIL import Image

    copy_run(learned_run[1], tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    run_dir = Path("run")  # a relative run directory, as users type it
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (255, 255, 255)).save(blank / f"{i}.png")
    cli = CliRunner().invoke(main, ["-q", "export", str(run_dir), "--calib-dir", str(blank), "--no-bias-correction",
                                    "--json"])  # fmt: skip
    assert cli.exit_code == 3, cli.output
    payload = json.loads(cli.stdout)
    assert payload["parity_passed"] is False
    assert payload["parity"]["model_int8.tflite"]["passed"] is False
    assert payload["parity"]["model.onnx"]["passed"] is True
    remedies = {r["remedy"]: r for r in payload["remedies"]}
    assert remedies["diagnosis"].get("worst_layers"), remedies["diagnosis"]
    assert remedies["diagnosis"]["worst_layers"][0]["rmse_over_scale"] > 0
    # Layers are named by their PyTorch module path (the direct converter scopes the TF ops with it).
    model, _ = load_checkpoint(run_dir)
    modules = {name.removeprefix("net.") for name, _ in model.named_modules()} | {"normalize", "pool", "logits"}
    worst = [w["layer"] for w in remedies["diagnosis"]["worst_layers"]]
    assert set(worst) <= modules, worst
    assert any(name.startswith("16-bit") for name in remedies)
    manifest = read_manifest(run_dir)
    assert manifest["stages"]["check"]["artifacts"]["model_int8.tflite"]["passed"] is False
    assert manifest["stages"]["export"]["calibration"]["source"] == "dir"
    assert manifest["stages"]["export"]["bias_correction"] is None  # --no-bias-correction was honoured
    report = json.loads((run_dir / "parity.json").read_text())
    assert [r["remedy"] for r in report["int8_remedies"]][0] == "diagnosis"
    assert "## int8 diagnosis and remedies" in (run_dir / "parity.md").read_text()
    assert f"`{worst[0]}`" in (run_dir / "parity.md").read_text()
    assert "`edgetl qat run --out run-qat`" in (run_dir / "parity.md").read_text()  # the next step is named
    # Blank calibration breaks confident predictions too: not a near-tie problem, so retraining is not suggested.
    ties = report["artifacts"]["model_int8.tflite"]["near_ties"]
    assert ties["disagreements_outside"] > 0
    assert "fine-tune the whole backbone" not in (run_dir / "parity.md").read_text()

    # Packaging refuses the failing int8 model (exit 3) unless forced, and a forced bundle says so.
    target = tmp_path / "t64.toml"
    target.write_text(open(load_target("rpi4-cpu").source).read().replace("size = 224", "size = 64"))
    refused = CliRunner().invoke(main, ["package", str(run_dir), "--target", str(target), "--out", str(tmp_path / "b")])
    assert refused.exit_code == 3 and "failed parity" in refused.stderr
    assert not (tmp_path / "b").exists()
    forced = CliRunner().invoke(main, ["-q", "package", str(run_dir), "--target", str(target),
                                       "--out", str(tmp_path / "b"), "--force", "--json"])  # fmt: skip
    assert forced.exit_code == 0, forced.output
    bundle_manifest = json.loads(open(json.loads(forced.stdout)["bundle_dir"] + "/manifest.json").read())
    assert bundle_manifest["forced"] is True and bundle_manifest["parity"]["passed_for_target"] is False

    # A remedy that broke (e.g. an int16x8 model the interpreter refuses) is reported, not a crash.
    from edgetl.check.remedies import record_remedies

    record_remedies(run_dir, [{"remedy": "16-bit activations", "passed": False, "error": "failed to prepare"}])
    assert "- 16-bit activations: failed to run: failed to prepare" in (run_dir / "parity.md").read_text()


# ----------------------------------------------------------------------------- calibration


def test_every_shipped_recipe_loads():
    recipes = sorted(data_dir("calib").glob("*.toml"))
    assert {p.stem for p in recipes} >= {"default", "small", "thorough"}
    for path in recipes:
        recipe = load_recipe(path.stem)
        assert recipe.source == "train" and recipe.preprocessing == "eval"


@pytest.mark.parametrize(
    "text, message",
    [
        ('per_clas = 3\n', "did you mean 'per_class'"),
        ('source = "val"\n', "not allowed"),
        ('preprocessing = "train"\n', "must be 'eval'"),
        ('per_class = "many"\n', "must be a int"),
        ('bias_correction = 1\n', "must be a bool"),
        ('per_class = [\n', "cannot read"),
    ],
)
def test_bad_recipes_are_config_errors(tmp_path, text, message):
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_recipe(str(path))
    assert message in f"{info.value.message} {info.value.hint}"


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        load_recipe("nonexistent")
    assert "default" in info.value.hint


def test_recipe_draws_balanced_and_seeded_from_train(toy_data):
    splits = discover(toy_data)
    spec = PreprocessSpec.for_size(32)
    first = calibration_set(splits, spec, CalibRecipe(per_class=2, max_images=5, seed=1))
    again = calibration_set(splits, spec, CalibRecipe(per_class=2, max_images=5, seed=1))
    assert len(first.paths) == 5 and first.paths == again.paths and first.sha256 == again.sha256
    assert set(first.paths) <= {str(s.path) for s in splits.train}
    assert first.images.shape == (5, 32, 32, 3)


def test_leakage_guard_catches_a_copied_validation_image(toy_data, tmp_path):
    splits = discover(toy_data)
    calib = tmp_path / "calib"
    calib.mkdir()
    shutil.copy(splits.val[0].path, calib / "renamed.png")  # same content, another name
    with pytest.raises(DataError, match="also in the parity set"):
        calibration_set(splits, PreprocessSpec.for_size(32), calib_dir=calib,
                        guard_samples=splits.val)  # fmt: skip


def test_export_cli_errors_are_one_line(tmp_path):
    cli = CliRunner().invoke(main, ["export", str(tmp_path / "nope")])
    assert cli.exit_code == 1 and "has no model.pt" in cli.stderr and "Traceback" not in cli.output
    cli = CliRunner().invoke(main, ["check", str(tmp_path)])
    assert cli.exit_code == 1 and "edgetl: error:" in cli.stderr
