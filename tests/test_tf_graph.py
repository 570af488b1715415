"""The direct PyTorch -> TensorFlow rebuild of MobileNetV2 (edgetl.export.tf_graph) and its place in export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import copy_run, mobilenet_with_real_bn_statistics

from edgetl.check.runners import runner_for
from edgetl.cli import main
from edgetl.export.tf_graph import _padding, build, graph_spec, save_graph
from edgetl.rundir import read_manifest
from edgetl.train.layers import UnsupportedModel

tf = pytest.importorskip("tensorflow", reason="needs the export extra")


def test_padding_follows_pytorch_not_tf_same():
    assert _padding(64, 3, 1, 1) == "SAME"
    assert _padding(63, 3, 2, 1) == "SAME"  # odd: TF's SAME pads 1 + 1 like PyTorch
    assert _padding(64, 3, 2, 1) is None  # even: SAME would pad 0 + 1, PyTorch pads 1 + 1
    assert _padding(7, 1, 1, 0) == "VALID"


@pytest.mark.parametrize("size", [64, 71])
def test_rebuilt_graph_matches_pytorch(tmp_path, size):
    """Folded BatchNorms, odd and even sizes at every stride-2 layer, residuals, the head: within 1e-4."""
    model = mobilenet_with_real_bn_statistics()
    pixels = np.random.default_rng(0).uniform(0, 255, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        reference = model(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()
    save_graph(model, size, tmp_path / "graph.npz")
    function = build(tmp_path / "graph.npz")
    logits = np.concatenate([function(tf.constant(p[None]))["logits"].numpy() for p in pixels])
    assert logits.shape == reference.shape
    assert np.abs(logits - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_graph_spec_mirrors_mobilenet_v2():
    spec, arrays = graph_spec(mobilenet_with_real_bn_statistics())
    layers = spec["layers"]
    assert [layer["op"] for layer in layers[:2]] == ["normalize", "conv"]
    blocks = [layer for layer in layers if layer["op"] == "block"]
    assert len(blocks) == 17 and sum(b["residual"] for b in blocks) == 10  # MobileNetV2's 10 skip adds
    assert [layer["op"] for layer in layers[-3:]] == ["conv", "mean", "dense"]
    depthwise = [c for b in blocks for c in b["layers"] if c["depthwise"]]
    assert len(depthwise) == 17 and all(arrays[c["w"]].shape[3] == 1 for c in depthwise)
    assert all(b["layers"][-1]["act"] is None for b in blocks)  # linear bottlenecks stay linear


def test_unknown_module_is_named():
    model = mobilenet_with_real_bn_statistics()
    model.net.features[3].conv[0][2] = torch.nn.Hardswish()
    with pytest.raises(UnsupportedModel, match="Hardswish"):
        graph_spec(model)


@pytest.mark.slow
def test_onnx2tf_route_still_converts(learned_run, tmp_path, netguard_log):
    run_dir = copy_run(learned_run[1], tmp_path / "run")
    cli = CliRunner().invoke(main, ["-q", "export", str(run_dir), "--no-int8", "--converter", "onnx2tf", "--json"])
    assert cli.exit_code == 0, cli.output
    stage = read_manifest(run_dir)["stages"]["export"]
    assert stage["converter"] == "onnx2tf" and stage["timings"]["onnx2tf_s"] > 0
    payload = json.loads(cli.stdout)
    assert payload["artifacts"]["model_float32.tflite"]["max_abs_logit_diff_vs_torch"] <= 1e-4
    assert "model_int8.tflite" not in payload["artifacts"]
    assert runner_for(run_dir / "model_float32.tflite")(np.zeros((1, 64, 64, 3), np.uint8)).shape == (1, 4)
    # onnx2tf fetches a sample calibration file unless one is in its working directory: it must not try.
    assert not netguard_log.exists() or netguard_log.read_text() == ""


def test_diagnosis_names_layers_by_module_path():
    from edgetl.check.remedies import layer_name

    fused = "features.2/features.2.conv.0.0/Relu6;features.2/features.2.conv.0.0/BiasAdd;Const_98"
    assert layer_name(fused) == "features.2.conv.0.0"
    assert layer_name("features.3/add") == "features.3"
    assert layer_name("pool/Mean") == "pool"
    assert layer_name("PartitionedCall:0") == "logits"
    assert layer_name("weird") == "weird"


def test_parity_reference_is_the_model_folded_and_leaves_the_model_alone():
    from edgetl.train.loop import predict_logits, torch_logits

    model = mobilenet_with_real_bn_statistics()
    pixels = np.random.default_rng(1).integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    plain = predict_logits(model, pixels, torch.device("cpu"))
    fast = torch_logits(model, pixels)
    assert np.abs(fast - plain).max() <= 1e-4 * max(1.0, np.abs(plain).max())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 52  # not fused in place
    assert model.net.features[0][0].weight.is_contiguous()  # nor moved to channels-last
