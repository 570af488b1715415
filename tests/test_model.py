"""Initial weights (full, backbone-only, mismatched, unavailable) and the freeze logic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SHARED_WEIGHTS, needs_shared_weights

from edgetl.config import FinetuneConfig
from edgetl.data.decode import LoadedSplit
from edgetl.errors import WeightsError
from edgetl.train.loop import train_one_epoch
from edgetl.train.model import (
    EdgeClassifier,
    default_unfreeze_from,
    load_initial_weights,
    set_train_mode,
    set_trainable,
)
from edgetl.train.optim import build_optimizer


def tiny(num_classes=3, width=0.35) -> EdgeClassifier:
    torch.manual_seed(0)
    return EdgeClassifier(num_classes, width)


def test_normalisation_is_inside_the_model():
    model = tiny().eval()
    pixels = torch.full((1, 3, 32, 32), 255.0)
    expected = model.net((pixels - model.mean) / model.std)
    assert torch.allclose(model(pixels), expected)
    assert torch.allclose(model.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]) * 255)


def test_full_state_dict_loads_backbone_and_keeps_a_new_head(tmp_path):
    source = tiny(num_classes=7)
    path = tmp_path / "full.pth"
    torch.save(source.net.state_dict(), path)  # torchvision layout, with a 7-class classifier
    target = tiny(num_classes=3)
    torch.nn.init.zeros_(target.net.features[0][0].weight)
    load_initial_weights(target, str(path), 0.35)
    assert torch.equal(target.net.features[0][0].weight, source.net.features[0][0].weight)
    assert target.net.classifier[1].out_features == 3


def test_backbone_only_and_wrapped_checkpoints_load(tmp_path):
    source = tiny()
    backbone = {f"features.{k}": v for k, v in source.net.features.state_dict().items()}
    for name, payload in (("bb.pth", backbone), ("wrapped.pth", {"state_dict": source.state_dict()})):
        torch.save(payload, tmp_path / name)
        target = EdgeClassifier(3, 0.35)
        load_initial_weights(target, str(tmp_path / name), 0.35)
        for key, value in source.net.features.state_dict().items():
            assert torch.equal(target.net.features.state_dict()[key], value), (name, key)


def test_width_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "w05.pth"
    torch.save(EdgeClassifier(3, 0.5).net.state_dict(), path)
    with pytest.raises(WeightsError, match="do not fit MobileNetV2 width 0.35") as info:
        load_initial_weights(tiny(), str(path), 0.35)
    assert "--width" in info.value.hint


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "does not exist"),
        (b"garbage", "cannot load weights"),
        ({"conv.weight": torch.zeros(1)}, "not a torchvision MobileNetV2"),
        ({"features.0.0.weight": torch.zeros(1)}, "lack"),
        ([1, 2, 3], "does not hold a state_dict"),
    ],
    ids=["missing", "garbage", "foreign-keys", "incomplete", "not-a-dict"],
)
def test_bad_weight_files_are_clear_errors(tmp_path, content, message):
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=message):
        load_initial_weights(tiny(), str(path), 0.35)


def test_imagenet_offline_names_both_ways_out():
    # TORCH_HOME is an empty folder and the network is blocked (conftest): nothing can be had.
    with pytest.raises(WeightsError) as info:
        load_initial_weights(EdgeClassifier(3, 1.0), "imagenet", 1.0)
    assert "not cached and could not be downloaded" in info.value.message
    assert "--weights PATH" in info.value.hint and "--weights none" in info.value.hint


def test_imagenet_exists_only_for_width_one():
    with pytest.raises(WeightsError, match="width 1.0 only"):
        load_initial_weights(tiny(), "imagenet", 0.35)


@needs_shared_weights
def test_shared_imagenet_backbone_loads():
    model = EdgeClassifier(10, 1.0)
    assert load_initial_weights(model, str(SHARED_WEIGHTS), 1.0) == str(SHARED_WEIGHTS)
    # Pretrained first-layer filters are far from the random initialisation's scale.
    assert model.net.features[0][1].running_var.mean() != 1.0


# ----------------------------------------------------------------------------- freezing


def bn_buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if "running" in k}


def params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def run_epoch(model: EdgeClassifier, phase: int, bn: str, unfreeze_from: int):
    cfg = FinetuneConfig(width=0.35, image_size=32, batch_size=8, bn=bn, lr=1e-2, finetune_lr=1e-2)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 37, 37, 3), dtype=np.uint8)
    split = LoadedSplit(images=images, labels=np.arange(16) % 3, paths=[""] * 16)
    set_trainable(model, phase, unfreeze_from)
    optimizer, scheduler = build_optimizer(model, cfg, phase, unfreeze_from, steps_per_epoch=2)
    set_train_mode(model, phase, unfreeze_from, cfg.bn)  # the caller of the shared loop sets the modes
    train_one_epoch(model, torch.from_numpy(images), split.labels, cfg, optimizer, scheduler, torch.device("cpu"),
                    epoch=0, desc="test")  # fmt: skip
    return optimizer


def test_phase1_trains_only_the_head_and_keeps_bn_statistics():
    model = tiny()
    before_features, before_head = params(model.features), params(model.head)
    before_bn = bn_buffers(model)
    run_epoch(model, phase=1, bn="frozen", unfreeze_from=default_unfreeze_from(model))
    assert all(torch.equal(v, params(model.features)[k]) for k, v in before_features.items())
    assert all(torch.equal(v, bn_buffers(model)[k]) for k, v in before_bn.items())
    assert any(not torch.equal(v, params(model.head)[k]) for k, v in before_head.items())
    assert all(not p.requires_grad for p in model.features.parameters())


def test_phase2_unfreezes_the_tail_with_a_lower_backbone_lr():
    model = tiny()
    cut = default_unfreeze_from(model)
    assert cut == 12  # the last third of MobileNetV2's 19 feature blocks
    frozen_before, tail_before = params(model.features[:cut]), params(model.features[cut:])
    before_bn = bn_buffers(model)
    optimizer = run_epoch(model, phase=2, bn="frozen", unfreeze_from=cut)
    assert all(torch.equal(v, params(model.features[:cut])[k]) for k, v in frozen_before.items())
    assert any(not torch.equal(v, params(model.features[cut:])[k]) for k, v in tail_before.items())
    assert all(torch.equal(v, bn_buffers(model)[k]) for k, v in before_bn.items())  # bn frozen
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone"]["initial_lr"] == pytest.approx(groups["head"]["initial_lr"] * 0.1)


def test_phase2_bn_train_updates_only_unfrozen_statistics():
    model = tiny()
    cut = 15
    frozen_bn, tail_bn = bn_buffers(model.features[:cut]), bn_buffers(model.features[cut:])
    run_epoch(model, phase=2, bn="train", unfreeze_from=cut)
    assert all(torch.equal(v, bn_buffers(model.features[:cut])[k]) for k, v in frozen_bn.items())
    assert any(not torch.equal(v, bn_buffers(model.features[cut:])[k]) for k, v in tail_bn.items())


def test_warmup_then_cosine_schedule():
    model = tiny()
    cfg = FinetuneConfig(width=0.35, finetune_epochs=4, warmup_epochs=1, lr=1e-3)
    set_trainable(model, 2, 0)
    optimizer, scheduler = build_optimizer(model, cfg, 2, 0, steps_per_epoch=10)
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    peak = cfg.phase2_head_lr
    assert lrs[0] < lrs[5] < lrs[9] <= peak + 1e-12  # warm-up rises
    assert max(lrs) == pytest.approx(peak)
    assert lrs[-1] < 0.05 * peak  # cosine ends near zero
    assert all(b <= a + 1e-12 for a, b in zip(lrs[10:], lrs[11:], strict=False))  # and only decays
