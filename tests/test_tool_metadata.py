"""Models for other tools: TFLite metadata with the labels packed in, and the uint8 output op."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_run
from test_package import target_file

from edgetl.cli import main
from edgetl.export.tflite_dedup import unpack
from edgetl.export.tool_metadata import METADATA_NAME, ModelDescription, packed_files, with_metadata

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def int8_output_run(exported_run, tmp_path_factory):
    """The exported run exported again with the raw int8 output (a target's ``output_dtype = "int8"``)."""
    from edgetl.config import ExportConfig, Thresholds
    from edgetl.pipeline import export_and_check

    run_dir = copy_run(exported_run[1], tmp_path_factory.mktemp("int8out") / "run")
    loose = Thresholds(max_drop=10.0, min_agreement=0.85)
    export_and_check(run_dir, ExportConfig(int8_output="int8", thresholds=loose))
    return run_dir


@pytest.mark.parametrize("artifact", ["model_int8.tflite", "model_float32.tflite"])
def test_exported_models_carry_metadata_and_their_labels(exported_run, artifact):
    run_dir = exported_run[1]
    model = (run_dir / artifact).read_bytes()
    assert packed_files(model) == {"labels.txt": (run_dir / "labels.txt").read_bytes()}
    tree = unpack(model)
    entries = {m.name: m.buffer for m in tree.metadata}
    metadata = bytes(tree.buffers[entries[METADATA_NAME]].data)
    assert metadata[4:8] == b"M001"
    assert b"labels.txt" in metadata and run_dir.resolve().name.encode() in metadata


def test_the_uint8_output_is_the_int8_output_shifted_by_128(exported_run, int8_output_run):
    """Same calibration, same int8 graph; the final QUANTIZE only re-centres: dequantised logits are equal."""
    from edgetl.runtime.model import open_model

    uint8_model = open_model(str(exported_run[1] / "model_int8.tflite"))
    int8_model = open_model(str(int8_output_run / "model_int8.tflite"))
    manifest = json.loads((int8_output_run / "manifest.json").read_text())
    assert manifest["stages"]["export"]["artifacts"]["model_int8.tflite"]["output"]["dtype"] == "int8"
    theirs = json.loads((exported_run[1] / "manifest.json").read_text())["stages"]["export"]["artifacts"]
    assert theirs["model_int8.tflite"]["output"]["dtype"] == "uint8"
    assert theirs["model_int8.tflite"]["output"]["zero_point"] == (
        manifest["stages"]["export"]["artifacts"]["model_int8.tflite"]["output"]["zero_point"] + 128)
    pixels = np.random.default_rng(0).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    for image in pixels:
        np.testing.assert_array_equal(uint8_model.invoke(uint8_model.to_input(image)),
                                      int8_model.invoke(int8_model.to_input(image)))  # fmt: skip


def test_package_refuses_an_output_type_the_target_does_not_take(int8_output_run, tmp_path):
    result = CliRunner().invoke(main, ["package", str(int8_output_run), "--target", target_file(tmp_path)])
    assert result.exit_code == 4
    assert "model output dtype is int8, the target needs uint8 (export with --target" in result.stderr


def test_metadata_is_replaced_not_stacked():
    about = ModelDescription("m", "d", "1", ["a", "b"], 32)
    from ai_edge_litert import schema_py_generated as schema

    from edgetl.export.tflite_dedup import pack

    tree = schema.ModelT()
    tree.buffers, tree.subgraphs, tree.operatorCodes, tree.version = [schema.BufferT()], [], [], 3
    once = with_metadata(pack(tree), about)
    twice = with_metadata(once, ModelDescription("m", "d", "1", ["a", "b", "c"], 32))
    assert [m.name for m in unpack(twice).metadata] == [METADATA_NAME]
    assert packed_files(twice) == {"labels.txt": b"a\nb\nc\n"}
