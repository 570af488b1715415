"""Cross-layer range equalisation: exact in float, equal channel ranges afterwards, only where it is valid."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.fixture
def model():
    from edgetl.model import EdgeClassifier

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


def test_only_linear_bottlenecks_that_feed_one_block_are_paired(model):
    from edgetl.prequant import linear_pairs

    features = model.net.features
    pairs = linear_pairs(features)
    assert pairs == [1]  # block 1 (32 -> 16, no residual) feeds block 2 (16 -> 24, stride 2); all others add
    for i in range(2, len(features) - 2):
        if features[i + 1].use_res_connect:
            assert i not in pairs


def test_equalisation_is_exact_in_float_and_equalises_the_ranges(model):
    from edgetl.parity import torch_logits
    from edgetl.prequant import equalize

    images = _images()
    before = torch_logits(model, images)
    seen = []
    hook = model.net.features[1].register_forward_hook(lambda m, x, y: seen.append(y.abs().amax((0, 2, 3))))
    torch_logits(model, images)
    ranges_before = seen.pop()

    records = equalize(model, images)

    after = torch_logits(model, images)
    ranges_after = (torch_logits(model, images), seen.pop())[1]
    hook.remove()
    assert np.abs(after - before).max() <= 1e-4 * max(1.0, np.abs(before).max())
    assert ranges_before.max() / ranges_before.min() > 2  # they differed
    assert torch.allclose(ranges_after, ranges_after.max().expand_as(ranges_after), rtol=1e-4)
    assert len(records) == 1 and records[0]["tensor"] == "features.1 -> features.2"
    assert records[0]["channels"] == len(ranges_before)
    assert records[0]["scale_max"] == pytest.approx(float(ranges_before.max() / ranges_before.min()), rel=1e-4)

