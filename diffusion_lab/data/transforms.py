"""PIL image -> training tensor: resized to cover its bucket (or square), cropped; random flips on the device.

Loader workers return uint8 pixels in HWC order, as PIL lays them out; `to_signed_unit` turns a batch of
them into [-1, 1] float NCHW after it reached the device (the DataModule's `on_after_batch_transfer`): a
quarter of the bytes through worker IPC and host-to-device copies, and no per-image copies in the workers.
"""

import numpy as np
import torch
from PIL import Image

from diffusion_lab.core.random import FLIP_SALT, keyed_coin, salted, sample_keys
from diffusion_lab.data.buckets import CropPlan


def resize_to_cover(image: Image.Image, plan: CropPlan) -> np.ndarray:
    """The whole image at `plan.resized`, as uint8 HWC: what the crop is cut from (and what the pixel cache
    stores for a square plan, so that cached and decoded crops are the same pixels)."""
    resized = image.resize(plan.resized, Image.BILINEAR, reducing_gap=None)
    pixels = np.asarray(resized, dtype=np.uint8)
    return pixels[..., None] if pixels.ndim == 2 else pixels


def crop(pixels: np.ndarray, plan: CropPlan) -> torch.Tensor:
    """The plan's bucket cut from a `resize_to_cover` array at the plan's (top, left). The offsets come from
    the bits of a per-example hash (`buckets.cover_and_crop`), so augmentation survives resume exactly;
    flips are drawn on the device (`random_flips`), keyed like the noise."""
    bucket = plan.bucket
    window = pixels[plan.top : plan.top + bucket.height, plan.left : plan.left + bucket.width]
    return torch.from_numpy(window.copy())  # a copy: `pixels` may be a read-only memory map


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
