"""Bias correction of quantised TFLite models (edgetl.quantize.bias_correction)."""

from __future__ import annotations

import numpy as np
import pytest

from edgetl.quantize.bias_correction import expected_error, tap_means


def _conv_mean_bruteforce(x, w, stride, dilation, same):
    """Spatial mean of a direct convolution of x [H, W, C] with w [KH, KW, C] (one output channel)."""
    (h, wd, _), (kh, kw, _) = x.shape, w.shape
    if same:
        out_h, out_w = -(-h // stride[0]), -(-wd // stride[1])
        ph = max((out_h - 1) * stride[0] + (kh - 1) * dilation[0] + 1 - h, 0)
        pw = max((out_w - 1) * stride[1] + (kw - 1) * dilation[1] + 1 - wd, 0)
        x = np.pad(x, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = []
    for i in range(0, x.shape[0] - (kh - 1) * dilation[0], stride[0]):
        for j in range(0, x.shape[1] - (kw - 1) * dilation[1], stride[1]):
            patch = x[
                i : i + (kh - 1) * dilation[0] + 1 : dilation[0], j : j + (kw - 1) * dilation[1] + 1 : dilation[1]
            ]
            out.append((patch * w).sum())
    return np.mean(out)


@pytest.mark.parametrize(
    "size, kernel, stride, dilation, same",
    [((7, 7), (3, 3), (1, 1), (1, 1), True), ((8, 6), (3, 3), (2, 2), (1, 1), True),
     ((9, 9), (3, 3), (2, 2), (1, 1), False), ((5, 5), (1, 1), (1, 1), (1, 1), True),
     ((10, 10), (3, 3), (1, 1), (2, 2), True), ((6, 7), (5, 3), (2, 1), (1, 1), True)],
)  # fmt: skip
def test_tap_means_equal_a_direct_convolution_with_padding(size, kernel, stride, dilation, same):
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 1.0, (*size, 4))  # a large mean makes the zero padding matter
    w = rng.normal(0.0, 1.0, (*kernel, 4))
    taps = tap_means(x, kernel, stride, dilation, same)
    assert (w * taps).sum() == pytest.approx(_conv_mean_bruteforce(x, w, stride, dilation, same), rel=1e-9)


def test_fully_connected_expected_error_is_delta_times_mean_input():
    rng = np.random.default_rng(1)
    delta, x = rng.normal(size=(3, 5)), rng.normal(size=(1, 5))
    np.testing.assert_allclose(expected_error("FULLY_CONNECTED", None, delta, x), delta @ x[0])


TINY_INT16X8: list[bytes] = []  # filled by tiny_models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """A conv (SAME, stride 2) + depthwise model whose inputs have a large mean, in float32
    and int8 TFLite, and its calibration images."""
    tf = pytest.importorskip("tensorflow", reason="needs the export extra")
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((12, 12, 3), batch_size=1)
    x = tf.keras.layers.Conv2D(8, 3, strides=2, padding="same")(inputs)
    outputs = tf.keras.layers.DepthwiseConv2D(3, padding="same")(x)
    model = tf.keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    # One large weight per output channel sets its int8 step; the small ones round coarsely, and on a
    # non-zero-mean input their rounding errors add up to a shift (a folded BatchNorm with a tiny
    # variance does the same to a fine-tuned MobileNetV2).
    conv = model.layers[1]
    kernel = rng.normal(0.0, 0.03, (3, 3, 3, 8)).astype(np.float32)
    kernel[1, 1, 0, :] = 4.0
    conv.set_weights([kernel, -kernel.sum(axis=(0, 1, 2)) * 5.0])
    images = rng.normal(5.0, 0.3, (64, 12, 12, 3)).astype(np.float32)

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    float_model = converter.convert()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    int8_model = converter.convert()
    # int16 activations with int16 I/O, as edgetl's remedy builds it: the input is quantised, not raw
    converter.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    converter.inference_input_type = converter.inference_output_type = tf.int16
    TINY_INT16X8.append(converter.convert())
    path = tmp_path_factory.mktemp("bc") / "float.tflite"
    path.write_bytes(float_model)
    return str(path), int8_model, images


def _outputs(model, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=model) if isinstance(model, bytes) else Interpreter(model_path=model)
    interpreter.allocate_tensors()
    feed, fetch = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    out = []
    for image in images:
        interpreter.set_tensor(feed["index"], image[None])
        interpreter.invoke()
        out.append(interpreter.get_tensor(fetch["index"])[0])
    return np.asarray(out, np.float64)


def test_correction_removes_the_mean_error_of_a_quantised_model(tiny_models):
    from edgetl.quantize.bias_correction import correct

    float_path, int8_model, images = tiny_models
    corrected, summary = correct(int8_model, float_path, images[:32])
    assert summary["layers"] == 2 and summary["images"] == 32
    reference = _outputs(float_path, images[32:])  # held out from the correction
    before = np.abs((_outputs(int8_model, images[32:]) - reference).mean(axis=(0, 1, 2))).max()
    after = np.abs((_outputs(corrected, images[32:]) - reference).mean(axis=(0, 1, 2))).max()
    assert summary["largest_shift_steps"] > 1
    assert after < before / 3, (before, after)


def test_models_that_do_not_pair_are_left_alone(tiny_models, tmp_path):
    from edgetl.quantize.bias_correction import NotCorrectable, correct

    float_path, int8_model, images = tiny_models
    with pytest.raises(NotCorrectable):
        correct(int8_model, _other_model(tmp_path), images)


def _other_model(tmp_path):
    import tensorflow as tf

    inputs = tf.keras.Input((12, 12, 3), batch_size=1)
    outputs = tf.keras.layers.Dense(4)(tf.keras.layers.Flatten()(inputs))
    path = tmp_path / "other.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(tf.keras.Model(inputs, outputs)).convert())
    return str(path)


def test_output_correction_removes_the_mean_error_at_the_output(tiny_models):
    from edgetl.quantize.activation_correction import correct_output

    float_path, int8_model, images = tiny_models
    corrected, summary = correct_output(int8_model, float_path, images[:32])
    assert summary["op"] == "DEPTHWISE_CONV_2D" and summary["images"] == 32 and summary["largest_shift_steps"] > 1
    reference = _outputs(float_path, images[32:])  # held out from the correction
    before = np.abs((_outputs(int8_model, images[32:]) - reference).mean(axis=(0, 1, 2))).max()
    after = np.abs((_outputs(corrected, images[32:]) - reference).mean(axis=(0, 1, 2))).max()
    assert after < before / 3, (before, after)


def test_output_correction_quantises_the_input_of_an_int16x8_model(tiny_models):
    from edgetl.quantize.activation_correction import correct_output, outputs

    float_path, _, images = tiny_models
    model = TINY_INT16X8[-1]
    reference = _outputs(float_path, images[32:])
    before = outputs(model, images[32:])
    assert np.abs(before - reference).mean() < 0.3 * np.abs(reference).mean()  # raw pixels as int16: ~100 %
    corrected, _ = correct_output(model, float_path, images[:32])
    after = outputs(corrected, images[32:])
    shift = lambda out: np.abs((out - reference).mean(axis=(0, 1, 2))).max()  # noqa: E731
    assert shift(after) <= shift(before)


def _float_and_int8(tf, model, images, path, int8_ops: bool = False) -> bytes:
    """Write ``model`` as a float32 TFLite file at ``path``; return it quantised, calibrated on ``images``
    (with ``int8_ops``, every op int8)."""
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([image[None]] for image in images)
    if int8_ops:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def _output_behind_an_activation(tmp_path):
    """A Dense + ReLU model (its bias non-zero: the converter leaves a zero bias out) as float32 (a
    path) and int8 (bytes), and its calibration images."""
    tf = pytest.importorskip("tensorflow", reason="needs the export extra")
    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((4, 4, 3), batch_size=1)
    model = tf.keras.Model(inputs, tf.keras.layers.Dense(4, activation="relu")(tf.keras.layers.Flatten()(inputs)))
    kernel, _ = model.layers[-1].get_weights()
    model.layers[-1].set_weights([kernel, np.full(4, 0.5, np.float32)])
    images = np.random.default_rng(0).normal(size=(16, 4, 4, 3)).astype(np.float32)
    path = tmp_path / "float.tflite"
    return str(path), _float_and_int8(tf, model, images, path), images


def test_output_correction_refuses_an_output_behind_an_activation(tmp_path):
    from edgetl.quantize.activation_correction import correct_output
    from edgetl.quantize.bias_correction import NotCorrectable

    float_path, int8_model, images = _output_behind_an_activation(tmp_path)
    with pytest.raises(NotCorrectable, match="fused activation"):
        correct_output(int8_model, float_path, images)


def test_sequential_correction_leaves_no_layer_shifted(tiny_models):
    """Each layer is measured with the layers before it already corrected: correcting both layers from
    one measurement of the uncorrected model would remove the first layer's shift twice from the second
    (once at the first layer, once inherited), and leave the second shifted the other way."""
    from edgetl.quantize.activation_correction import correct_sequential, layer_shifts

    float_path, int8_model, images = tiny_models
    before = layer_shifts(int8_model, float_path, images[32:])  # held out from the correction
    corrected, summary = correct_sequential(int8_model, float_path, images[:32])
    after = layer_shifts(corrected, float_path, images[32:])
    assert summary["layers"] == 2 and summary["images"] == 32
    assert min(before) > 3, before  # both layers shifted: the first's own, the second's mostly inherited
    assert max(after) < 1, after


def test_sequential_correction_refuses_models_that_do_not_pair(tiny_models, tmp_path):
    from edgetl.quantize.activation_correction import correct_sequential
    from edgetl.quantize.bias_correction import NotCorrectable

    float_path, int8_model, images = tiny_models
    with pytest.raises(NotCorrectable):
        correct_sequential(int8_model, _other_model(tmp_path), images)


def test_correcting_a_layer_leaves_a_layer_that_shared_its_bias_buffer_alone(tmp_path):
    """The converter stores equal constants once: two all-zero biases share a buffer. The first layer's
    weights are exact in int8 (nothing to correct); the second's are not."""
    tf = pytest.importorskip("tensorflow", reason="needs the export extra")
    from tensorflow.lite.tools import flatbuffer_utils

    from edgetl.quantize.bias_correction import buffer, correct, weighted_ops

    tf.keras.utils.set_random_seed(0)
    inputs = tf.keras.Input((8, 8, 2), batch_size=1)
    x = tf.keras.layers.Conv2D(4, 1)(inputs)
    model = tf.keras.Model(inputs, tf.keras.layers.DepthwiseConv2D(3, padding="same")(x))
    kernel = np.zeros((1, 1, 2, 4), np.float32)
    kernel[0, 0, 0] = [1.0, 2.0, 3.0, 4.0]  # one weight per output channel: exactly 127 steps
    model.layers[1].set_weights([kernel, np.zeros(4, np.float32)])
    images = np.random.default_rng(0).normal(4.0, 1.0, (16, 8, 8, 2)).astype(np.float32)
    path = tmp_path / "float.tflite"
    quantized = _float_and_int8(tf, model, images, path, int8_ops=True)

    def biases(content):
        tree = flatbuffer_utils.convert_bytearray_to_object(bytearray(content))
        graph = tree.subgraphs[0]
        ops = [op for _, op in weighted_ops(tree)]
        return [graph.tensors[op.inputs[2]].buffer for op in ops], [
            buffer(tree, graph.tensors[op.inputs[2]], np.int32) for op in ops]  # fmt: skip

    shared, _ = biases(quantized)
    assert shared[0] == shared[1]  # the situation under test
    corrected, _ = correct(quantized, str(path), images)
    buffers, values = biases(corrected)
    assert buffers[0] != buffers[1]
    assert np.all(values[0] == 0) and np.any(values[1] != 0)


def test_activation_correction_keeps_the_candidate_best_on_held_out_images(tiny_models):
    from edgetl.quantize.activation_correction import correct_activations, outputs

    float_path, int8_model, images = tiny_models
    corrected, summary = correct_activations(int8_model, float_path, images, count=16, held_out_count=24)
    assert summary["fit_images"] == 16 and summary["held_out_images"] == 24
    scores = summary["held_out_sqnr_db"]
    assert set(scores) == {"uncorrected", "output_layer", "sequential"}
    assert scores[summary["kept"]] == max(scores.values())
    assert scores["sequential"] > scores["uncorrected"] + 3  # this model's shift is large: correcting it pays
    reference = outputs(float_path, images)
    error = lambda model: np.mean((outputs(model, images) - reference) ** 2)  # noqa: E731
    assert error(corrected) < error(int8_model) / 2


def test_activation_correction_without_an_output_correction(tmp_path):
    """A model whose output comes through an activation cannot have its output layer corrected alone;
    the other candidates are still weighed."""
    from edgetl.quantize.activation_correction import correct_activations

    float_path, int8_model, images = _output_behind_an_activation(tmp_path)
    _, summary = correct_activations(int8_model, float_path, images)
    assert "fused activation" in summary["output_layer"]["skipped"]
    assert set(summary["held_out_sqnr_db"]) == {"uncorrected", "sequential"}
