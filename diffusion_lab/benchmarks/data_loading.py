"""Decode + transform throughput of the DataModule against a bare PIL loop over the same files."""

import time
from pathlib import Path

import numpy as np
from PIL import Image

from diffusion_lab.data import ImageDataModule

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def image_files(root: str | Path, split: str) -> list[Path]:
    root = Path(root)
    folder = root / split if (root / split).is_dir() else root
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def bare_pil_images_per_second(files: list[Path], image_size: int) -> float:
    """The baseline a user would write: open, convert, resize the shorter side, center-crop, to array."""
    start = time.perf_counter()
    for path in files:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = image_size / min(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
            left, top = (image.width - image_size) // 2, (image.height - image_size) // 2
            np.asarray(image.crop((left, top, left + image_size, top + image_size)))
    return len(files) / (time.perf_counter() - start)


def datamodule_images_per_second(
    path: str, split: str, image_size: int, workers: int, batch_size: int, pixel_cache_dir: str | None = None
) -> float:
    """One epoch of the training stream (decode, EXIF, resize, crop, to uint8 batches), after the first
    batch so worker start-up is not counted. With `pixel_cache_dir` the rows come from the pixel cache
    (built there first, outside the timing)."""
    module = ImageDataModule(
        path=path, streaming=False, train_split=split, val_split=split, image_size=image_size,
        batch_size=batch_size, num_workers=workers, random_flip=True, center_crop=False,
        pixel_cache=pixel_cache_dir is not None, cache_dir=pixel_cache_dir,
    )  # fmt: skip
    module.setup("fit")
    module.train_set.epochs = 1
    loader = module.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    start, images = time.perf_counter(), 0
    for batch in iterator:
        images += len(batch["pixels"])
    return images / (time.perf_counter() - start)
