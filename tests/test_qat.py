"""Quantisation-aware fine-tuning: the int8 simulation, the `qat` command and its new run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import copy_run, mobilenet_with_real_bn_statistics

from edgetl.check.runners import runner_for
from edgetl.cli import main
from edgetl.data.heldout import evaluation_set
from edgetl.quantize.equalize import equalize_for_int8
from edgetl.quantize.qat import QuantSim, _fake_quant_weight
from edgetl.quantize.recipes import calibration_set, load_recipe
from edgetl.rundir import read_manifest, sha256_file, verify_files
from edgetl.runtime.preprocess import PreprocessSpec
from edgetl.train.checkpoint import load_checkpoint
from edgetl.train.layers import fold
from edgetl.train.loop import predict_logits


def test_weight_fake_quant_is_tflite_symmetric_int8_per_channel():
    weight = torch.tensor([[1.0, -0.5, 0.26], [0.02, 0.01, -0.00007]]).view(2, 3, 1, 1)
    quantised = _fake_quant_weight(weight)
    steps = quantised / (weight.abs().amax(dim=(1, 2, 3), keepdim=True) / 127)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() == pytest.approx(127)
    assert quantised[1].abs().max() == pytest.approx(0.02)  # a small channel keeps its own scale
    assert quantised[1, 2].item() == 0.0  # below half a step (0.5 * 0.02 / 127): rounds to zero
    assert quantised[0, 2].item() == pytest.approx(33 / 127)  # 0.26 * 127 = 33.02 -> 33 steps


def test_simulation_is_float_until_calibrated_then_int8_like():
    model = mobilenet_with_real_bn_statistics()
    sim = QuantSim(model)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    float_logits = predict_logits(model, pixels, torch.device("cpu"))
    assert np.abs(predict_logits(sim, pixels, torch.device("cpu")) - float_logits).max() < 1e-4  # folding is exact
    sim.calibrate(pixels)
    assert not sim.observing and "normalize" in sim.ranges and "features.3/add" in sim.ranges
    assert all(low <= high for low, high in sim.ranges.values())
    quantised = predict_logits(sim, pixels, torch.device("cpu"))
    error = np.abs(quantised - float_logits).max()
    assert 0 < error < 0.2 * np.abs(float_logits).max(), (error, np.abs(float_logits).max())


@pytest.mark.slow
def test_simulation_tracks_the_exported_int8_model(learned_run, tmp_path):
    """The simulated int8 logits are much closer to the real TFLite int8 model's than the float logits
    are (export without bias correction, which the simulation leaves to training)."""
    from edgetl.config import ExportConfig, Thresholds
    from edgetl.pipeline import export_and_check as export

    run_dir = copy_run(learned_run[1], tmp_path / "run")
    export(run_dir, ExportConfig(bias_correction=False, remedies=False, thresholds=Thresholds(100.0, 0.0)))
    model, checkpoint = load_checkpoint(run_dir)
    val, _, _, splits = evaluation_set(run_dir, read_manifest(run_dir), None)
    calibration = calibration_set(splits, PreprocessSpec.from_dict(checkpoint["preprocess"]), load_recipe("default"))
    float_logits = predict_logits(model, val.images, torch.device("cpu"))
    int8_model, _, _ = equalize_for_int8(model, calibration.images)  # as the export did
    sim = QuantSim(int8_model)
    sim.calibrate(calibration.images)
    simulated = predict_logits(sim, val.images, torch.device("cpu"))
    real = runner_for(run_dir / "model_int8.tflite")(val.images)
    # Measured: 0.16 vs 0.30 (0.17 vs 0.51 before the export equalised ReLU6 ranges, which cut the int8 error)
    assert np.abs(simulated - real).mean() < 0.6 * np.abs(float_logits - real).mean()


def _int8_weights(path, op_name: str, module: str) -> np.ndarray:
    """The int8 weights of the op that PyTorch module ``module`` became (its TF scope names the output)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    names = {t["index"]: t["name"] for t in interpreter.get_tensor_details()}
    op = next(op for op in interpreter._get_ops_details()
              if op["op_name"] == op_name and f"{module}/" in names[op["outputs"][0]].split(";")[0])  # fmt: skip
    return interpreter.get_tensor(op["inputs"][1])


def _int8_classifier(path) -> np.ndarray:
    """The int8 weights of the TFLite model's FULLY_CONNECTED op."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    resolver = OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
    interpreter.allocate_tensors()
    op = next(op for op in interpreter._get_ops_details() if op["op_name"] == "FULLY_CONNECTED")
    return interpreter.get_tensor(op["inputs"][1])


def _quantised(weight: torch.Tensor) -> np.ndarray:
    w = weight.detach().double().numpy()
    return np.round(w / (np.abs(w).max(axis=1, keepdims=True) / 127)).astype(np.int8)


@pytest.mark.slow
def test_qat_makes_a_new_run_that_exports(learned_run, tmp_path, netguard_log):
    source = copy_run(learned_run[1], tmp_path / "run")
    before = sha256_file(source / "model.pt")
    out = tmp_path / "qat"
    cli = CliRunner().invoke(main, ["-q", "qat", str(source), "--out", str(out), "--epochs", "1", "--lr", "1e-3",
                                    "--consistency", "0.5", "--distill", "1", "--json"])  # fmt: skip
    assert cli.exit_code == 0, cli.output
    record = json.loads(cli.stdout)
    assert [row["epoch"] for row in record["history"]] == [0, 1] and record["config"]["consistency"] == 0.5
    assert record["config"]["distill"] == 1.0
    assert record["after"]["seconds"] > 0 and 0 <= record["after"]["simulated_int8"]["agreement"] <= 1
    assert sha256_file(source / "model.pt") == before  # the original run is untouched
    manifest = read_manifest(out)
    assert set(manifest["stages"]) == {"finetune", "qat"} and verify_files(out, manifest) == []
    # the new run's float model is the original, its QAT weights are beside it
    assert sha256_file(out / "model.pt") == before and manifest["files"]["model.pt"]["stage"] == "finetune"
    assert manifest["files"]["model_qat.pt"]["stage"] == "qat"
    trained, _ = load_checkpoint(out, "model_qat.pt")
    original, _ = load_checkpoint(source)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, original.state_dict()[k])]
    assert any(k.startswith("net.features.") for k in changed)  # the backbone was fine-tuned too
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left

    exported = CliRunner().invoke(main, ["-q", "export", str(out), "--no-remedies", "--json"])
    assert exported.exit_code in (0, 3), exported.output
    parity = json.loads(exported.stdout)["parity"]
    assert "model_int8.tflite" in parity
    assert parity["model_float32.tflite"]["agreement"] == 1.0  # the float export is the original model's
    stage = read_manifest(out)["stages"]["export"]
    assert stage["int8_weights"] == "model_qat.pt"
    assert "built from the quantisation-aware weights (model_qat.pt)" in (out / "parity.md").read_text()
    # QAT trained against the rounding without bias correction; the export builds the same (a plain run gets it)
    assert stage["bias_correction"] is None
    # the int8 classifier is the QAT weights rounded (per output channel), not the original's
    int8 = _int8_classifier(out / "model_int8.tflite")
    assert np.array_equal(int8, _quantised(trained.head[1].weight))
    assert not np.array_equal(int8, _quantised(original.head[1].weight))
    # ... and so are the convolutions: the export did not equalise the QAT weights again (which would move the
    # int8 grid of this one, which reads block 1's equalised stream, away from the one QAT trained against)
    reader = trained.net.features[2].conv[0]
    folded, _ = fold(reader[0], reader[1], torch.float64)
    int8 = _int8_weights(out / "model_int8.tflite", "CONV_2D", "features.2.conv.0.0")
    assert np.array_equal(int8.reshape(len(int8), -1), _quantised(folded.reshape(len(folded), -1)))
    assert not netguard_log.exists() or netguard_log.read_text() == ""


def test_qat_bad_input_is_one_line(learned_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    new = str(tmp_path / "n")
    for args, words in ((["--out", str(taken)], "already exists"),
                        (["--out", new, "--epochs", "0"], "--epochs must be >= 1"),
                        (["--out", new, "--consistency", "-1"], "--consistency")):  # fmt: skip
        result = CliRunner().invoke(main, ["qat", str(learned_run[1]), *args])
        assert result.exit_code != 0 and words in result.stderr, result.output
        assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1
    missing = CliRunner().invoke(main, ["qat", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")])
    assert missing.exit_code != 0 and "model.pt" in missing.stderr
