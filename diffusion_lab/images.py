"""Converting network-scale tensors to pictures on disk."""

import math
from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from diffusion_lab.runs.atomic import write_file


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats (B, C, H, W) to uint8 (B, C, H, W), clipping what the sampler overshoots."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def save_grid(
    images: torch.Tensor, path: str | Path, upscale_to: int = 64, columns: int | None = None
) -> Path:
    """Save a grid (square-ish unless `columns` is given); small images are upscaled (nearest) so a 16 px
    grid is readable."""
    grid = make_grid(
        to_uint8(images), nrow=columns or math.ceil(math.sqrt(len(images))), padding=1, pad_value=255
    )
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    scale = max(1, upscale_to // images.shape[-1])
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return write_file(path, lambda temporary: picture.save(temporary, format="PNG"))


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """One [-1, 1] (C, H, W) image as a PNG (grey for one channel), written then renamed."""
    path = Path(path)
    pixels = to_uint8(image.unsqueeze(0))[0].permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    return write_file(path, lambda temporary: picture.save(temporary, format="PNG"))
