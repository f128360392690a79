"""Decode + transform throughput of the DataModule against a bare PIL loop over the same files."""

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
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


def bench_data(cfg: DictConfig) -> dict:
    """`diffusion-lab bench data path=DIR`: DataModule images/s, decoded and from the pixel cache, per worker, next
    to a bare PIL loop, in the same run."""
    files = image_files(cfg.path, cfg.split)
    if not files:
        raise SystemExit(f"no images under {cfg.path}/{cfg.split}")
    with tempfile.TemporaryDirectory(prefix="bench_pixel_cache_") as cache_dir:
        # Alternate the sides and keep each one's best: a shared machine's noise hits both alike.
        bare = 0.0
        speeds = {(workers, side): 0.0 for workers in cfg.workers for side in ("decoded", "cached")}
        for _ in range(cfg.repeats):
            bare = max(bare, bare_pil_images_per_second(files, cfg.image_size))
            for workers, side in speeds:
                speed = datamodule_images_per_second(
                    cfg.path, cfg.split, cfg.image_size, workers, cfg.batch_size,
                    pixel_cache_dir=cache_dir if side == "cached" else None,
                )  # fmt: skip
                speeds[workers, side] = max(speeds[workers, side], speed)
    result = {"images": len(files), "image_size": cfg.image_size, "bare_pil_img_s": round(bare, 1)}
    for workers in cfg.workers:
        decoded, cached = speeds[workers, "decoded"], speeds[workers, "cached"]
        per_worker = decoded / max(1, workers)
        result[f"workers_{workers}"] = {
            "img_s": round(decoded, 1),
            "per_worker_img_s": round(per_worker, 1),
            "per_worker_vs_bare": round(per_worker / bare, 3),
            "cached_img_s": round(cached, 1),
            "cached_vs_decoded": round(cached / decoded, 2),
        }
    print(json.dumps(result))
    return result
