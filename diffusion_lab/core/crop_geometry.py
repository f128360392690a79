"""Where each training image was cropped from: SDXL's micro-conditioning, kept through flips and caches.

A `crop_geometry` row is (original height, original width, crop top, crop left, target height, target width,
resized height, resized width), as `data.buckets.CropPlan.geometry` makes it.
"""

import torch


def flip_crop_geometry(geometry: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """`crop_geometry` rows (see `CropPlan.geometry`) of mirrored images: the crop's left edge measured in the
    mirrored image, as if it had been flipped before the crop (what SDXL's training script does)."""
    left = geometry[:, 7] - geometry[:, 3] - geometry[:, 5]
    mirrored = geometry.clone()
    mirrored[:, 3] = left
    return torch.where(flips.to(geometry.device).view(-1, 1), mirrored, geometry)


def batch_crop_geometry(batch: dict) -> torch.Tensor:
    """The batch's `crop_geometry`; for data that makes no crop (the embedded digits), the whole image:
    original = target = the pixels' size, offset 0."""
    if "crop_geometry" in batch:
        return torch.as_tensor(batch["crop_geometry"])
    *_, height, width = batch["pixels"].shape
    whole = torch.tensor([height, width, 0, 0, height, width, height, width], dtype=torch.long)
    return whole.repeat(len(batch["pixels"]), 1)
