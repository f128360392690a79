"""PIL image -> training tensor: shorter side to size, square crop; random flips on the device.

Loader workers return uint8 pixels in HWC order, as PIL lays them out; `to_signed_unit` turns a batch of
them into [-1, 1] float NCHW after it reached the device (the DataModule's `on_after_batch_transfer`): a
quarter of the bytes through worker IPC and host-to-device copies, and no per-image copies in the workers.
"""

import numpy as np
import torch
from PIL import Image

from diffusion_lab.core.random import FLIP_SALT, keyed_coin, salted, sample_keys


def resize_shorter_side(image: Image.Image, size: int) -> np.ndarray:
    """The whole image with its shorter side at `size`, as uint8 HWC: what a crop is cut from (and what the
    pixel cache stores, so that cached and decoded crops are the same pixels)."""
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    resized = image.resize((width, height), Image.BILINEAR, reducing_gap=None)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


class SquareCrop:
    """A `size` x `size` crop of a `resize_shorter_side` array: centred, or at an offset taken from the bits
    of `entropy`, a per-example hash the stream derives from (seed, epoch, row), so augmentation survives
    resume exactly. Flips are not drawn here but on the device (`random_flips`), keyed like the noise."""

    def __init__(self, size: int, center_crop: bool = True) -> None:
        self.size, self.center_crop = size, center_crop

    def __call__(self, pixels: np.ndarray, entropy: int = 0) -> torch.Tensor:
        spare_y, spare_x = pixels.shape[0] - self.size, pixels.shape[1] - self.size
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = (entropy >> 8) % (spare_x + 1), (entropy >> 24) % (spare_y + 1)
        crop = pixels[top : top + self.size, left : left + self.size]
        return torch.from_numpy(crop.copy())  # a copy: `pixels` may be a read-only memory map


def to_signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """A uint8 NHWC batch [0, 255] -> float NCHW [-1, 1]; float batches pass through unchanged."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.permute(0, 3, 1, 2).float().mul_(2 / 255).sub_(1).contiguous()


def random_flips(seed: int, step: int, sample_ids: torch.Tensor) -> torch.Tensor:
    """Which images of a training batch are mirrored: a keyed coin per (seed, step, image), so decoded images,
    cached pixels and cached latents of the same image at the same step get the same flip."""
    return keyed_coin(salted(sample_keys(seed, step, sample_ids), FLIP_SALT))


def flip_rows(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) mirrored left-right where `flips` is True."""
    mask = flips.to(images.device).view(-1, *([1] * (images.ndim - 1)))
    return torch.where(mask, images.flip(-1), images)
