"""How images reach the feature extractor: the choice that moves FID by whole points (clean-fid,
arXiv:2104.11222).

- `legacy`: uint8 images go in at their own size and the extractor resizes them (for InceptionV3: the
  TF1-style bilinear resize of torch-fidelity / the original TF code: the numbers in most papers).
- `clean`: each uint8 image is first resized to the extractor's input size as clean-fid does
  (`make_resizer("PIL", False, "bicubic", ...)`): each channel as a float32 PIL image (mode "F"), PIL bicubic
  (antialiased), clipped to 0..255 and *not* rounded; the extractor gets these float images and has nothing
  left to resize.
"""

import numpy as np
import torch
from PIL import Image

PROTOCOLS = ("legacy", "clean")


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown fid_protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
    return protocol


def as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [-1, 1] float (N, C, H, W) -> uint8 (N, 3, H, W) on the CPU; grey images are repeated."""
    if images.dtype != torch.uint8:
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    images = images.cpu()
    return images.expand(-1, 3, -1, -1).contiguous() if images.shape[1] == 1 else images


def clean_resize(image: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's resize of one (H, W) channel, values 0..255: float32 (size, size), not rounded."""
    picture = Image.fromarray(np.asarray(image, dtype=np.float32))  # mode "F"
    return np.asarray(picture.resize((size, size), Image.BICUBIC)).clip(0, 255)


def prepare_for_extractor(images: torch.Tensor, protocol: str, input_size: int | None) -> torch.Tensor:
    """uint8 (N, 3, H, W) as the protocol hands them to the extractor: `legacy` the same uint8 images;
    `clean` float32 values 0..255 at `input_size` (already that size: the same values, as PIL's resize to
    the same size is a copy)."""
    if check_protocol(protocol) == "legacy" or input_size is None:
        return images
    if images.shape[-2:] == (input_size, input_size):
        return images.float()
    channels = images.numpy()
    resized = [[clean_resize(channel, input_size) for channel in image] for image in channels]
    return torch.from_numpy(np.asarray(resized, dtype=np.float32))
