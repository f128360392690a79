"""How images reach the feature extractor: the choice that moves FID by whole points (clean-fid,
arXiv:2104.11222).

- `legacy`: uint8 images go in at their own size and the extractor resizes them (for InceptionV3: the
  TF1-style bilinear resize of torch-fidelity / the original TF code: the numbers in most papers).
- `clean`: each uint8 image is first resized to the extractor's input size with PIL bicubic (antialiased),
  as clean-fid does; then nothing is left for the extractor to resize.
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


def prepare_for_extractor(images: torch.Tensor, protocol: str, input_size: int | None) -> torch.Tensor:
    """uint8 (N, 3, H, W) as the protocol hands them to the extractor."""
    if check_protocol(protocol) == "legacy" or input_size is None:
        return images
    if images.shape[-2:] == (input_size, input_size):
        return images
    resized = [
        np.asarray(
            Image.fromarray(image.permute(1, 2, 0).numpy()).resize((input_size, input_size), Image.BICUBIC)
        )
        for image in images
    ]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous()
