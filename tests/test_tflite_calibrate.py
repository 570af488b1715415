"""edgetl.quantize.calibrate: int8 calibration split over two processes gives the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def graph_dir(learned_run, tmp_path_factory):
    """A converter work folder: the learned toy model's graph and 12 calibration images."""
    pytest.importorskip("tensorflow", reason="needs the export extra")
    from edgetl.export.tf_graph import save_graph
    from edgetl.export.tflite_process import GRAPH
    from edgetl.train.checkpoint import load_checkpoint

    model, _ = load_checkpoint(learned_run[1])
    folder = tmp_path_factory.mktemp("calibrate")
    save_graph(model, 64, folder / GRAPH)
    images = np.random.default_rng(0).integers(0, 256, (12, 64, 64, 3), dtype=np.uint8)
    np.save(folder / "calibration.npy", images)
    return folder


def _int8(folder: Path, helper, calibration: Path | None = None) -> bytes:
    from edgetl.export.tflite_process import converter_factory, quantize

    return quantize(converter_factory(folder), calibration or folder / "calibration.npy", "int8", helper)


def _int8_and_calibration_input(folder: Path, calibration: Path | None = None) -> tuple[bytes, bytes]:
    """The int8 model (no helper) and the model TensorFlow's calibrator was given for it."""
    from tensorflow.lite.python.optimize import calibrator

    captured = {}
    original = calibrator.Calibrator.calibrate

    def capture(self, dataset_gen):
        captured["model"] = self._model_content
        return original(self, dataset_gen)

    calibrator.Calibrator.calibrate = capture
    try:
        model = _int8(folder, None, calibration)
    finally:
        calibrator.Calibrator.calibrate = original
    return model, captured["model"]


def _calibrate(model: bytes, images: np.ndarray) -> bytes:
    """TensorFlow's calibrator alone on ``images``: ``model`` with every tensor's min/max recorded."""
    from tensorflow.lite.python.optimize import calibrator

    from edgetl.quantize.calibrate import calibration_samples

    return calibrator.Calibrator(model).calibrate(lambda: calibration_samples(images))


def test_two_process_calibration_gives_the_same_model(graph_dir):
    from edgetl.quantize.calibrate import Helper

    single = _int8(graph_dir, None)
    (graph_dir / "calibrated_part.tflite").unlink(missing_ok=True)
    helper = Helper(graph_dir)
    try:
        split = _int8(graph_dir, helper)
    finally:
        helper.close()
    assert (graph_dir / "calibrated_part.tflite").is_file()  # the helper calibrated its half
    assert split == single  # byte for byte: the merged ranges are the whole set's


class FailingHelper:
    """A helper process that died: the converter calibrates its half itself."""

    def start(self, model: bytes, images: np.ndarray) -> Path:
        return Path("/nonexistent")

    def finish(self, output: Path) -> None:
        return None


def test_a_failed_helper_changes_nothing(graph_dir):
    assert _int8(graph_dir, FailingHelper()) == _int8(graph_dir, None)


def test_merge_ranges_takes_the_wider_range(graph_dir):
    from ai_edge_litert import schema_py_generated as schema

    from edgetl.quantize.calibrate import merge_ranges

    _, calibration_input = _int8_and_calibration_input(graph_dir)
    images = np.load(graph_dir / "calibration.npy")
    dark, bright = (_calibrate(calibration_input, part) for part in (images // 4, 192 + images // 4))

    def ranges(model: bytes) -> list[tuple[float, float]]:
        graph = schema.ModelT.InitFromObj(schema.Model.GetRootAs(model, 0)).subgraphs[0]
        return [(float(t.quantization.min[0]), float(t.quantization.max[0])) for t in graph.tensors
                if t.quantization is not None and t.quantization.min is not None]  # fmt: skip

    merged = ranges(merge_ranges(dark, bright))
    expected = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(ranges(dark), ranges(bright), strict=True)]
    assert merged == expected and merged != ranges(dark) and merged != ranges(bright)


def test_raw_pixel_input_whatever_the_images_span(graph_dir, tmp_path):
    """Images spanning 40..200 only: the uint8 input is still scale 1, zero point 0, and no other tensor's
    range is touched (a black and a white pixel in an image, the old way, widened the stem's)."""
    from ai_edge_litert import schema_py_generated as schema

    from edgetl.quantize.calibrate import merge_ranges
    from edgetl.quantize.tflite_facts import inspect_tflite

    narrow = np.random.default_rng(1).integers(40, 201, (8, 64, 64, 3), dtype=np.uint8)
    np.save(tmp_path / "narrow.npy", narrow)
    model, calibration_input = _int8_and_calibration_input(graph_dir, tmp_path / "narrow.npy")
    (tmp_path / "m.tflite").write_bytes(model)
    facts = inspect_tflite(str(tmp_path / "m.tflite"))
    assert (facts.input.dtype, facts.input.scale, facts.input.zero_point) == ("uint8", 1.0, 0)

    plain = _calibrate(calibration_input, narrow)
    trees = [schema.ModelT.InitFromObj(schema.Model.GetRootAs(m, 0)).subgraphs[0]
             for m in (plain, merge_ranges(plain, None, (0.0, 255.0)))]  # fmt: skip
    changed = [i for i, (a, b) in enumerate(zip(trees[0].tensors, trees[1].tensors, strict=True))
               if a.quantization is not None and a.quantization.min is not None
               and (list(a.quantization.min) != list(b.quantization.min)
                    or list(a.quantization.max) != list(b.quantization.max))]  # fmt: skip
    assert changed == [trees[0].inputs[0]]  # the input alone: 40..200 -> 0..255
    assert list(trees[1].tensors[changed[0]].quantization.max) == [255.0]
