"""Training augmentation as batched tensor ops on the training device: random resized crops, flips,
colour jitter. No per-image Python loop, so a GPU is not starved by its input pipeline."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from edgetl.config import FinetuneConfig


def augment(
    batch: torch.Tensor, out_size: int, cfg: FinetuneConfig, generator: torch.Generator
) -> torch.Tensor:
    """Random resized crop, horizontal flip and colour jitter for a whole batch.

    Args:
        batch: uint8 ``[N, S, S, 3]`` square training images on the training device.
        out_size: side of the output crops.
        cfg: augmentation settings (``min_crop_scale``, ``flip``, ``color_jitter``).
        generator: random source on the same device, so runs are reproducible.

    Returns:
        float ``[N, 3, out_size, out_size]`` pixels in 0..255.
    """
    n = batch.shape[0]
    device = batch.device
    pixels = batch.permute(0, 3, 1, 2).float()

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, device=device, generator=generator) * (high - low) + low

    # One affine grid per image: crop area fraction, aspect ratio, position and flip.
    area = uniform(cfg.min_crop_scale, 1.0)
    ratio = torch.exp(uniform(math.log(3 / 4), math.log(4 / 3)))
    crop_w = torch.sqrt(area * ratio).clamp(max=1.0)
    crop_h = torch.sqrt(area / ratio).clamp(max=1.0)
    shift_x = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - crop_w)
    shift_y = (torch.rand(n, device=device, generator=generator) * 2 - 1) * (1 - crop_h)
    sign = torch.ones(n, device=device)
    if cfg.flip:
        sign = torch.where(torch.rand(n, device=device, generator=generator) < 0.5, -sign, sign)
    theta = torch.zeros(n, 2, 3, device=device)
    theta[:, 0, 0] = crop_w * sign
    theta[:, 0, 2] = shift_x
    theta[:, 1, 1] = crop_h
    theta[:, 1, 2] = shift_y
    grid = F.affine_grid(theta, [n, 3, out_size, out_size], align_corners=False)
    pixels = F.grid_sample(pixels, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    if cfg.color_jitter > 0:
        j = cfg.color_jitter
        shape = (n, 1, 1, 1)
        grey = (pixels * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(
            1, keepdim=True
        )
        saturation = uniform(1 - j, 1 + j).view(shape)
        pixels = grey + (pixels - grey) * saturation
        contrast = uniform(1 - j, 1 + j).view(shape)
        mean = grey.mean(dim=(2, 3), keepdim=True)
        pixels = mean + (pixels - mean) * contrast
        brightness = uniform(1 - j, 1 + j).view(shape)
        pixels = pixels * brightness
    return pixels.clamp_(0, 255)


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` in 0..255 (eval input, no augmentation)."""
    return batch.permute(0, 3, 1, 2).float()
