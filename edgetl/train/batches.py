"""Where the training images live while a run trains, and how a batch reaches the model.

The decoded split is a memory map of the image cache (:mod:`edgetl.data.cache`). :func:`place` puts it:

- ``device``: the whole split copied to the GPU once (chunk by chunk, no second host copy); a batch
  is one gather on the GPU. The default on a GPU when the split takes at most half of its free memory.
- ``stream``: batches gathered from the memory map by a background thread into pinned host memory and
  copied to the GPU asynchronously, a few batches ahead of the model: any dataset size, the GPU holds
  only the batches in flight. The default on a GPU when the split does not fit.
- on the CPU the memory map is the training set: a batch is gathered straight from it (the page cache
  holds the pixels, shared with every other process that maps the same entry).

Every placement gives the same batches in the same order, so the choice never changes the model.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from edgetl.errors import ConfigError

log = logging.getLogger(__name__)

DEVICE_SHARE = 0.5  # "auto" keeps a split on the GPU when it takes at most this share of its free memory
PREFETCH = 3  # batches a stream gathers ahead of the model
CHUNK_BYTES = 256 * 2**20  # host -> GPU copy size when a split moves to the GPU


class Resident:
    """A split the training device indexes directly: on the GPU, or a CPU memory map."""

    def __init__(self, images: torch.Tensor, where: str):
        self.images, self.where = images, where

    def batches(self, plan: list[np.ndarray], labels: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(uint8 images, labels) of each batch of ``plan`` on the images' device: the epoch's order
        moves there once, so no step waits for the host."""
        device = self.images.device
        order = torch.from_numpy(np.concatenate(plan) if plan else np.zeros(0, np.int64)).to(device)
        labels_on_device = torch.from_numpy(labels).to(device)
        start = 0
        for index in plan:
            batch = order[start : start + len(index)]
            start += len(index)
            yield self.images[batch], labels_on_device[batch]


class Streamed:
    """Batches gathered on the host (``PREFETCH`` ahead, in a background thread) and copied to ``device``."""

    def __init__(self, images: np.ndarray, device: torch.device):
        self.images, self.device, self.where = images, device, "streamed from the memory map"
        self.pin = device.type == "cuda"

    def _gather(self, index: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        out = torch.empty((len(index), *self.images.shape[1:]), dtype=torch.uint8, pin_memory=self.pin)
        np.take(self.images, index, axis=0, out=out.numpy())
        targets = torch.from_numpy(labels[index])
        return out, targets.pin_memory() if self.pin else targets

    def batches(self, plan: list[np.ndarray], labels: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgetl-batches") as pool:
            ahead = deque(pool.submit(self._gather, index, labels) for index in plan[:PREFETCH])
            following = iter(plan[PREFETCH:])
            while ahead:
                images, targets = ahead.popleft().result()
                index = next(following, None)
                if index is not None:
                    ahead.append(pool.submit(self._gather, index, labels))
                # Pinned memory is not handed out again before its copy has finished (PyTorch's host allocator).
                yield images.to(self.device, non_blocking=self.pin), targets.to(self.device, non_blocking=self.pin)


Source = Resident | Streamed


def gpu_placement(nbytes: int, free: int, placement: str) -> str:
    """"device" or "stream" for a split of ``nbytes`` on a GPU with ``free`` bytes free."""
    if placement != "auto":
        return placement
    return "device" if nbytes <= DEVICE_SHARE * free else "stream"


def place(images: np.ndarray, device: torch.device, placement: str = "auto") -> Source:
    """The split's place for training on ``device`` (see the module docstring).

    Args:
        images: uint8 ``[N, S, S, 3]``, usually a memory map of the cache.
        device: the training device.
        placement: "auto", "device" (GPU copy; on the CPU the map itself) or "stream".
    """
    if placement == "stream":
        return Streamed(images, device)
    if device.type != "cuda":
        return Resident(torch.from_numpy(images), "memory-mapped from the image cache")
    free, _ = torch.cuda.mem_get_info(device)
    if gpu_placement(images.nbytes, free, placement) == "stream":
        log.info("training images (%.1f GiB) stream from host memory: more than %.0f %% of the GPU's %.1f GiB free",
                 images.nbytes / 2**30, DEVICE_SHARE * 100, free / 2**30)  # fmt: skip
        return Streamed(images, device)
    try:
        on_device = torch.empty(images.shape, dtype=torch.uint8, device=device)
    except torch.OutOfMemoryError:
        raise ConfigError(f"the training images ({images.nbytes / 2**30:.1f} GiB) do not fit on the GPU "
                          f"({free / 2**30:.1f} GiB free)",
                          hint="use --data-placement stream (or auto)") from None  # fmt: skip
    rows = max(1, CHUNK_BYTES // int(np.prod(images.shape[1:])))
    for start in range(0, len(images), rows):
        on_device[start : start + rows].copy_(torch.from_numpy(np.ascontiguousarray(images[start : start + rows])))
    return Resident(on_device, "on the GPU")
