"""PIL image -> training tensor: shorter side to size, square crop, optional flip.

Loader workers return uint8 pixels; `to_signed_unit` turns them into [-1, 1] floats after the batch
reached the device (the DataModule's `on_after_batch_transfer`): a quarter of the bytes through worker
IPC and host-to-device copies, and no float arithmetic in the workers.
"""

import numpy as np
import torch
from PIL import Image


class SquareCrop:
    """Resize the shorter side to `size` and crop a square, as one PIL resample of just the crop box.

    torchvision's Resize -> CenterCrop/RandomCrop -> RandomHorizontalFlip -> ToDtype -> Normalize does the
    same in five steps; on 224 px JPEGs this single `Image.resize(box=...)` is what brings the loader near
    the speed of a bare PIL loop (see `diffusion-lab bench data`). Random choices come from the generator
    passed in, which the stream seeds per example, so augmentation survives resume exactly.
    """

    def __init__(self, size: int, center_crop: bool = True, random_flip: bool = False) -> None:
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        scale = self.size / min(image.size)
        spare_x = max(0, round(image.width * scale) - self.size)
        spare_y = max(0, round(image.height * scale) - self.size)
        if self.center_crop:
            left, top = spare_x // 2, spare_y // 2
        else:
            left, top = (
                int(torch.randint(0, spare + 1, (), generator=generator)) for spare in (spare_x, spare_y)
            )
        box = (left / scale, top / scale, (left + self.size) / scale, (top + self.size) / scale)
        image = image.resize((self.size, self.size), Image.BILINEAR, box=box, reducing_gap=None)
        if self.random_flip and bool(torch.rand((), generator=generator) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_uint8_tensor(image)


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """uint8 HWC picture -> uint8 CHW tensor."""
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))
    pixels = pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels
    return pixels.permute(2, 0, 1).contiguous()


def to_signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]; floats pass through unchanged."""
    if pixels.dtype != torch.uint8:
        return pixels
    return pixels.float().mul_(2 / 255).sub_(1)


def image_transform(image_size: int, random_flip: bool, center_crop: bool) -> SquareCrop:
    return SquareCrop(image_size, center_crop=center_crop, random_flip=random_flip)
