"""Cross-layer range equalisation: exact in float, equal channel ranges afterwards, only where it is valid."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture
def model():
    from edgetl.train.model import EdgeClassifier

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = EdgeClassifier(num_classes=4, width=0.35, dropout=0.0)
    # Give every BatchNorm distinct statistics, so channel ranges really differ (as after ImageNet training).
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.05, 2.0)
            module.weight.data.uniform_(0.2, 3.0)
            module.bias.data.uniform_(-0.5, 0.5)
            assert channels > 0
    return net.eval()


def _images(n: int = 8, side: int = 48) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def test_streams_are_the_stages_with_every_reader(model):
    from edgetl.quantize.equalize import streams

    found = streams(model.net.features)
    assert [(s["first"], s["residual"]) for s in found] == [
        (1, []), (2, [3]), (4, [5, 6]), (7, [8, 9, 10]), (11, [12, 13]), (14, [15, 16]), (17, [])]
    # readers: each residual block's expansion and the next stage's (the last stage: the final 1x1 conv)
    assert [len(s["readers"]) for s in found] == [1, 2, 3, 4, 3, 3, 1]
    assert found[-1]["readers"][0] is model.net.features[18]
    assert all(r[0].kernel_size == (1, 1) for s in found for r in s["readers"])


def _ranges(model, module, images):
    """Per-channel (min, max) of ``module``'s output on ``images``."""
    from edgetl.train.loop import torch_logits

    seen = []
    hook = module.register_forward_hook(lambda m, x, y: seen.append((y.amin((0, 2, 3)), y.amax((0, 2, 3)))))
    try:
        torch_logits(model, images)
    finally:
        hook.remove()
    return seen[0]


def test_equalisation_is_exact_in_float_and_centres_and_equalises_the_streams(model):
    from edgetl.quantize.equalize import equalize
    from edgetl.train.loop import torch_logits

    images = _images()
    features = model.net.features
    before = torch_logits(model, images)
    low, high = _ranges(model, features[1], images)
    half = (high - low) / 2

    records = equalize(model, images)

    after = torch_logits(model, images)
    assert np.abs(after - before).max() <= 1e-4 * max(1.0, np.abs(before).max())
    # Block 1's output (a stream with no residual): every channel centred on zero, all the same half-range.
    assert half.max() / half.min() > 2  # they differed
    assert (low + high).abs().max() > 0.1 * half.max()  # and were not centred
    low_after, high_after = _ranges(model, features[1], images)
    assert torch.allclose(high_after, half.max().expand_as(high_after), rtol=1e-4)
    assert torch.allclose(low_after, -high_after, rtol=1e-4)
    assert records[0]["tensor"] == "features.1" and records[0]["channels"] == len(half)
    assert records[0]["scale_max"] == pytest.approx(float(half.max() / half.min()), rel=1e-4)
    # Stage 5 (blocks 4, 5, 6): every channel reaches the stream's widest range in one of its tensors.
    assert [r["tensor"] for r in records] == ["features.1", "features.2+3", "features.4+5+6", "features.7+8+9+10",
                                              "features.11+12+13", "features.14+15+16", "features.17"]  # fmt: skip
    widest = []
    for module in (features[4], features[5].conv, features[5], features[6].conv, features[6]):
        lo, hi = _ranges(model, module, images)
        widest.append(torch.maximum(lo.abs(), hi.abs()))
    widest = torch.stack(widest).amax(0)
    assert torch.allclose(widest, widest.max().expand_as(widest), rtol=1e-3)


def test_relu_equalisation_pairs_every_relu6_that_feeds_a_depthwise_convolution(model):
    from edgetl.quantize.equalize import relu_pairs

    pairs = relu_pairs(model.net.features)
    assert [name for name, _, _ in pairs] == ["features.0"] + [f"features.{i}.conv.0" for i in range(2, 18)]
    for _, producer, depthwise in pairs:
        assert isinstance(producer[2], torch.nn.ReLU6)
        assert depthwise[0].groups == depthwise[0].in_channels == producer[0].out_channels


def test_relu_equalisation_is_exact_up_to_the_calibration_maxima(model):
    from edgetl.quantize.equalize import MAX_RELU_SCALE, equalize_relu, relu_pairs
    from edgetl.train.loop import torch_logits

    images = _images()
    with torch.no_grad():  # a channel that is never positive must be left alone, not divided by zero
        model.net.features[2].conv[0][1].bias[0] = -1e3
    before = torch_logits(model, images)
    maxima_before = [_ranges(model, producer, images)[1] for _, producer, _ in relu_pairs(model.net.features)]

    records = equalize_relu(model, images)

    after = torch_logits(model, images)
    assert np.abs(after - before).max() <= 1e-4 * max(1.0, np.abs(before).max())  # same images: exact
    assert len(records) == 17
    for (name, producer, _), maxima, record in zip(relu_pairs(model.net.features), maxima_before, records,
                                                   strict=True):  # fmt: skip
        alive = maxima > 0
        expected = torch.minimum(maxima.max().expand_as(maxima), maxima * MAX_RELU_SCALE)  # capped scale
        high = _ranges(model, producer, images)[1]
        assert torch.allclose(high[alive], expected[alive], rtol=1e-3), name
        assert record["dead_channels"] == int((~alive).sum())
        ratio = min(float(maxima.max() / maxima[alive].min()), MAX_RELU_SCALE)
        assert record["scale_max"] == pytest.approx(ratio, rel=1e-3), name
    assert records[1]["dead_channels"] >= 1
    assert max(r["scale_max"] for r in records) == MAX_RELU_SCALE  # this model has a nearly dead channel


def test_equalize_for_int8_is_both_transforms_on_a_copy(model):
    import copy

    from edgetl.quantize.equalize import equalize, equalize_for_int8, equalize_relu
    from edgetl.train.loop import torch_logits

    images = _images()
    original = copy.deepcopy(model)
    sequential = copy.deepcopy(model)
    expected_records = equalize(sequential, images)
    expected_relu = equalize_relu(sequential, images)

    int8_model, records, relu_records = equalize_for_int8(model, images)

    assert int8_model is not model and records == expected_records
    assert [r["tensor"] for r in relu_records] == [r["tensor"] for r in expected_relu]
    for got, want in zip(relu_records, expected_relu, strict=True):
        assert got["scale_max"] == pytest.approx(want["scale_max"], rel=1e-3)
    for (name, a), b in zip(model.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # the trained model itself is untouched
    assert not torch.allclose(original.net.features[0][1].weight, int8_model.net.features[0][1].weight)
    assert torch.allclose(int8_model.net.features[0][1].weight, sequential.net.features[0][1].weight, rtol=1e-3)
    np.testing.assert_allclose(torch_logits(int8_model, images), torch_logits(sequential, images), atol=1e-4)
    np.testing.assert_allclose(torch_logits(int8_model, images), torch_logits(original, images), atol=1e-3)
