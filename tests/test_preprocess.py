"""The one preprocessing implementation: spec as data, crop geometry, host/device agreement."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import SHARED, SIGN_DATA
from PIL import Image

from edgetl.data.decode import decode_image
from edgetl.runtime.preprocess import PreprocessSpec, center_crop, load_image, normalize, prepare


def test_spec_round_trips_through_json_data():
    spec = PreprocessSpec.for_size(224)
    assert spec.resize_size == 256  # torchvision's 224/0.875 convention
    again = PreprocessSpec.from_dict(spec.to_dict())
    assert again == spec


def test_spec_rejects_unknown_keys_and_bad_values():
    data = PreprocessSpec.for_size(96).to_dict()
    with pytest.raises(ValueError, match="unknown preprocessing keys"):
        PreprocessSpec.from_dict({**data, "colour": "BGR"})
    with pytest.raises(ValueError):
        PreprocessSpec(image_size=64, resize_size=32)
    with pytest.raises(ValueError):
        PreprocessSpec(image_size=64, resize_size=64, interpolation="lanczos9")


def test_prepare_resizes_shorter_side_then_crops_the_centre():
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 90:110] = 255  # a white band in the middle
    crop = prepare(image, PreprocessSpec(image_size=40, resize_size=50))
    assert crop.shape == (40, 40, 3)
    assert crop[:, 20].min() == 255  # the band survives at the centre
    assert crop[:, 0].max() == 0


def test_prepare_upscales_small_images():
    crop = prepare(np.full((10, 12, 3), 7, np.uint8), PreprocessSpec.for_size(32))
    assert crop.shape == (32, 32, 3) and int(crop.mean()) == 7


def test_prepare_rejects_non_rgb_input():
    with pytest.raises(ValueError, match="RGB uint8"):
        prepare(np.zeros((10, 10), np.uint8), PreprocessSpec.for_size(8))


def test_center_crop_is_exact():
    image = np.arange(6 * 6 * 3, dtype=np.uint8).reshape(6, 6, 3)
    assert np.array_equal(center_crop(image, 2), image[2:4, 2:4])


def test_normalize_uses_mean_and_std_on_the_0_255_scale():
    spec = PreprocessSpec(image_size=8, resize_size=8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.25, 1.0))
    out = normalize(np.full((1, 1, 3), 255, np.uint8), spec)
    assert np.allclose(out[0, 0], [1.0, 2.0, 0.5])


def test_host_and_device_decoders_agree_on_generated_images(tmp_path):
    rng = np.random.default_rng(0)
    for fmt in ("png", "jpg", "bmp"):
        path = tmp_path / f"x.{fmt}"
        Image.fromarray(rng.integers(0, 255, (37, 53, 3), np.uint8)).save(path)
        assert np.array_equal(decode_image(path), load_image(str(path))), fmt


@pytest.mark.skipif(not SIGN_DATA.is_dir(), reason=f"needs real photos in {SIGN_DATA}")
def test_host_and_device_produce_the_same_input_tensor_on_real_photos():
    spec = PreprocessSpec.for_size(224)
    photos = sorted(SIGN_DATA.glob("*/*"))[::97]
    photos.append(SHARED / "models" / "coral_mobilenet_v2" / "parrot.jpg")
    for photo in photos:
        host = prepare(decode_image(photo), spec)
        device = prepare(load_image(str(photo)), spec)
        assert np.array_equal(host, device), photo


def test_device_decoder_errors_are_one_line(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(str(bad))
    with pytest.raises(ValueError, match="cannot read"):
        load_image(str(tmp_path / "missing.jpg"))
