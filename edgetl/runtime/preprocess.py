"""Eval-time preprocessing, implemented once.

A :class:`PreprocessSpec` travels with the model (checkpoint, manifest, bundle). :func:`prepare` turns
a decoded RGB ``uint8`` image into the model's square ``uint8`` input crop; normalisation (mean/std)
lives inside the model graph, so the device feeds raw pixels. :func:`normalize` exists for models
exported without it.

Only numpy and OpenCV are used here: this module runs on the device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from .imageheader import MAX_PIXELS, refuse_too_large

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("area", "linear", "cubic", "nearest")


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes the model's input. All fields are plain data (JSON-serialisable)."""

    image_size: int  # side of the square crop the model sees
    resize_size: int  # the shorter side is resized to this, then the centre is cropped
    interpolation: str = "area"  # "area": area averaging when shrinking, bilinear when enlarging
    mean: tuple[float, float, float] = IMAGENET_MEAN  # per channel, on the 0..1 scale
    std: tuple[float, float, float] = IMAGENET_STD  # per channel, on the 0..1 scale
    channel_order: str = "RGB"  # order of channels the model expects
    layout: str = "NHWC"  # layout of the uint8 input tensor on the device

    def __post_init__(self) -> None:
        if self.image_size < 8 or self.resize_size < self.image_size:
            raise ValueError(
                f"need 8 <= image_size <= resize_size, got {self.image_size}, {self.resize_size}"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
        if self.channel_order != "RGB":
            raise ValueError("only RGB channel order is supported")

    @classmethod
    def for_size(cls, image_size: int, crop_fraction: float = 0.875, **kwargs: Any) -> PreprocessSpec:
        """The torchvision convention: resize the shorter side to ``image_size / crop_fraction``."""
        return cls(image_size=image_size, resize_size=round(image_size / crop_fraction), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PreprocessSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing keys: {sorted(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)


def _cv2():
    import os

    # OpenCV's own pixel limit, read once when it first decodes: the same as training's, for the formats
    # edgetl.runtime.imageheader does not read (a user's own setting wins).
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_PIXELS))
    import cv2  # imported lazily so that reading a spec does not need OpenCV

    return cv2


def resize_shorter(image: np.ndarray, size: int, interpolation: str = "area") -> np.ndarray:
    """Resize so that the shorter side is ``size``, keeping the aspect ratio."""
    cv2 = _cv2()
    height, width = image.shape[:2]
    scale = size / min(height, width)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_h, new_w) == (height, width):
        return image
    flag = {
        "area": cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR,
        "linear": cv2.INTER_LINEAR,
        "cubic": cv2.INTER_CUBIC,
        "nearest": cv2.INTER_NEAREST,
    }[interpolation]
    return cv2.resize(image, (new_w, new_h), interpolation=flag)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
    height, width = image.shape[:2]
    top, left = (height - size) // 2, (width - size) // 2
    return image[top : top + size, left : left + size]


def prepare(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Decoded RGB uint8 ``[H, W, 3]`` image -> the model's ``uint8 [S, S, 3]`` input crop."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 image [H, W, 3], got {image.dtype} {image.shape}")
    resized = resize_shorter(image, spec.resize_size, spec.interpolation)
    return np.ascontiguousarray(center_crop(resized, spec.image_size))


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 RGB pixels (channels last) -> float32 normalised with the spec's mean and std."""
    mean = np.asarray(spec.mean, np.float32) * 255.0
    std = np.asarray(spec.std, np.float32) * 255.0
    return (pixels.astype(np.float32) - mean) / std


def decode_bgr_frame(frame: np.ndarray) -> np.ndarray:
    """An OpenCV BGR(A)/grey frame -> RGB uint8."""
    cv2 = _cv2()
    if frame.ndim == 2:
        return cv2.cvtColor(frame, cv2.COLOR_GRAY2RGB)
    if frame.shape[2] == 4:
        return cv2.cvtColor(frame, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)


def load_image(path: str) -> np.ndarray:
    """Decode an image file to RGB uint8 with OpenCV (EXIF orientation applied).

    Raises:
        ValueError: the file cannot be read or decoded.
    """
    cv2 = _cv2()
    try:
        data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode handles non-ASCII paths
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    refuse_too_large(data[: 1 << 20].tobytes(), path)  # before decoding: a small file can declare 400 Mpx
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ValueError(f"cannot decode {path} as an image")
    return decode_bgr_frame(image)
