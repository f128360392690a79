"""PIL image -> training tensor: shorter side to size, square crop, optional flip.

Loader workers return uint8 pixels in HWC order, as PIL lays them out; `to_signed_unit` turns a batch of
them into [-1, 1] float NCHW after it reached the device (the DataModule's `on_after_batch_transfer`): a
quarter of the bytes through worker IPC and host-to-device copies, and no per-image copies in the workers.
"""

import numpy as np
import torch
from PIL import Image


class SquareCrop:
    """Resize the shorter side to `size` and crop a square, as one PIL resample of just the crop box.

    torchvision's Resize -> CenterCrop/RandomCrop -> RandomHorizontalFlip -> ToDtype -> Normalize does the
    same in five steps; on 224 px JPEGs this single `Image.resize(box=...)` is what brings the loader near
    the speed of a bare PIL loop (see `diffusion-lab bench data`). Random choices are bits of `entropy`, a
    per-example hash the stream derives from (seed, epoch, row): augmentation survives resume exactly.
    """

    def __init__(self, size: int, center_crop: bool = True, random_flip: bool = False) -> None:
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip

    def __call__(self, image: Image.Image, entropy: int = 0) -> torch.Tensor:
        scale = self.size / min(image.size)
        spare_x = max(0, round(image.width * scale) - self.size)
        spare_y = max(0, round(image.height * scale) - self.size)
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = (entropy >> 8) % (spare_x + 1), (entropy >> 24) % (spare_y + 1)
        box = (left / scale, top / scale, (left + self.size) / scale, (top + self.size) / scale)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box, reducing_gap=None)
        if self.random_flip and entropy & 1:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(image)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """PIL picture -> uint8 HWC tensor (one copy)."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    return pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels


def to_signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """A uint8 NHWC batch [0, 255] -> float NCHW [-1, 1]; float batches pass through unchanged."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.permute(0, 3, 1, 2).float().mul_(2 / 255).sub_(1).contiguous()


def image_transform(image_size: int, random_flip: bool, center_crop: bool) -> SquareCrop:
    return SquareCrop(image_size, center_crop=center_crop, random_flip=random_flip)
