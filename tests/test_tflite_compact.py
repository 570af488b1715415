"""edgetl.export.tflite_dedup: shared vectors and aligned buffers, the model's behaviour unchanged."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.export.tflite_dedup import BUFFER_ALIGNMENT, compact
from edgetl.quantize.tflite_facts import size_breakdown

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(exported_run, tmp_path_factory):
    """The exported int8 model re-written as TFLite's Python writer (and the converter) write it, one
    vector per tensor, and that model compacted again: (unshared path, compacted path)."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    _, run_dir = exported_run
    tree = schema.ModelT.InitFromObj(schema.Model.GetRootAs((run_dir / "model_int8.tflite").read_bytes(), 0))
    unshared = bytes(flatbuffer_utils.convert_object_to_bytearray(tree))
    folder = tmp_path_factory.mktemp("compact")
    (folder / "unshared.tflite").write_bytes(unshared)
    (folder / "compact.tflite").write_bytes(compact(unshared))
    return folder / "unshared.tflite", folder / "compact.tflite"


def test_compact_stores_each_quantisation_vector_once(models):
    unshared, compacted = (size_breakdown(str(p)) for p in models)
    channels = unshared["biases"] // 4
    assert unshared["quantization_parameters"] >= 24 * channels  # scale + int64 zero point, twice
    assert compacted["quantization_parameters"] < 12 * channels
    saved = unshared["quantization_parameters"] - compacted["quantization_parameters"]
    assert unshared["file"] - compacted["file"] >= saved - 4096  # what it saves is what the file loses
    for key in ("weights", "biases", "tensor_names"):
        assert compacted[key] == unshared[key]


def test_compact_aligns_buffers(models):
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAs(models[1].read_bytes(), 0)
    starts = []
    for i in range(model.BuffersLength()):
        table = model.Buffers(i)._tab
        offset = table.Offset(4)  # Buffer.data
        if offset:
            starts.append(table.Vector(offset))
    assert len(starts) > 50 and all(start % BUFFER_ALIGNMENT == 0 for start in starts)


def test_compact_model_computes_the_same_outputs(models):
    from edgetl.runtime.model import TFLiteClassifier

    rng = np.random.default_rng(0)
    unshared, compacted = (TFLiteClassifier(str(p)) for p in models)
    shape = unshared.input.shape[1:]
    for _ in range(4):
        image = rng.integers(0, 256, shape, dtype=np.uint8)
        assert np.array_equal(unshared.predict(image), compacted.predict(image))


def test_compact_model_runs_on_tflite_micro(models):
    runtime = pytest.importorskip("tflite_micro.python.tflite_micro.runtime", reason="needs tflite-micro")
    interpreters = [runtime.Interpreter.from_bytes(p.read_bytes(), arena_size=4 << 20) for p in models]
    shape = interpreters[0].get_input_details(0)["shape"]
    image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    outputs = []
    for interpreter in interpreters:
        interpreter.set_input(image, 0)
        interpreter.invoke()
        outputs.append(interpreter.get_output(0).copy())
    assert outputs[0].dtype == np.uint8 and np.array_equal(*outputs)  # TFLM runs the final QUANTIZE too


def test_compact_leaves_an_already_compact_model_as_is(models):
    data = models[1].read_bytes()
    assert compact(data) == data
