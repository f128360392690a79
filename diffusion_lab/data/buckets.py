"""Aspect-ratio buckets: resolutions of about one pixel count, and where an image goes among them.

Square crops cut off heads and feet and throw away the sides of every landscape photo; buckets train each image
at the resolution nearest its own shape instead (NovelAI's aspect-ratio bucketing, blog.novelai.net 2022; SDXL
trains on such a set at 1024^2 px, arXiv:2307.01952 section 2.3). This module is the arithmetic only: the set,
the nearest bucket, and the resize-to-cover plus crop whose numbers SDXL's micro-conditioning records
(original size, crop top-left, target size; arXiv:2307.01952 section 2.2).
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @classmethod
    def square(cls, size: int) -> "Bucket":
        return cls(size, size)

    @property
    def aspect(self) -> float:
        return self.width / self.height


def bucket_set(target_area: int, step: int = 64, max_aspect: float = 4.0) -> tuple[Bucket, ...]:
    """Every landscape width that is a multiple of `step`, with the tallest multiple-of-`step` height that keeps
    the area within `target_area`, up to `max_aspect`, and each one's portrait twin; sorted by aspect ratio.
    At 1024^2 and step 64 this holds SDXL's list: 1024x1024, 1152x896, 1216x832, 1344x768, 1536x640 and their
    portrait twins, among others."""
    if step <= 0 or target_area < step * step:
        raise ValueError(
            f"buckets need step > 0 and target_area >= step^2, got area {target_area}, step {step}"
        )
    buckets = set()
    for width in range(step, target_area // step + 1, step):
        height = (target_area // width) // step * step
        if step <= height <= width and width / height <= max_aspect:
            buckets.update({Bucket(width, height), Bucket(height, width)})
    return tuple(sorted(buckets, key=lambda bucket: (bucket.aspect, bucket.width)))


def nearest_bucket(width: int, height: int, buckets: tuple[Bucket, ...]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's, on a log scale (2:1 and 1:2 are equally far from
    1:1); ties go to the larger area."""
    log_aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - log_aspect), -b.width * b.height))


@dataclass(frozen=True)
class CropPlan:
    """An image of `original` (width, height) resized to `resized` so it covers `bucket`, then cropped at
    (`left`, `top`) of the resized image."""

    original: tuple[int, int]
    resized: tuple[int, int]
    left: int
    top: int
    bucket: Bucket

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's `add_time_ids`: original (height, width), crop (top, left), target (height, width)."""
        width, height = self.original
        return (height, width, self.top, self.left, self.bucket.height, self.bucket.width)

    def geometry(self) -> torch.Tensor:
        """What a batch carries as `crop_geometry`: the six time ids, then the resized (height, width) that a
        flip on the device needs to move the crop's left edge (`core.crop_geometry.flip_crop_geometry`)."""
        return torch.tensor([*self.time_ids(), self.resized[1], self.resized[0]], dtype=torch.long)


def cover_and_crop(
    width: int, height: int, bucket: Bucket, center: bool = True, entropy: int = 0
) -> CropPlan:
    """Resize (keeping the aspect ratio) until both sides cover the bucket, then crop it: centred, or at an
    offset taken from the bits of `entropy` (the stream's per-example hash)."""
    scale = max(bucket.width / width, bucket.height / height)
    resized = (max(bucket.width, round(width * scale)), max(bucket.height, round(height * scale)))
    spare_x, spare_y = resized[0] - bucket.width, resized[1] - bucket.height
    if center:
        left, top = spare_x // 2, spare_y // 2
    else:
        left, top = (entropy >> 8) % (spare_x + 1), (entropy >> 24) % (spare_y + 1)
    return CropPlan((width, height), resized, left, top, bucket)
