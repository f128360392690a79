"""Reference image sets: a DataModule's split (each image once, centre-cropped, unflipped) or a folder."""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from diffusion_lab.data.bucket_batching import batches_by_shape
from diffusion_lab.data.decoding import BadSample, decode_image
from diffusion_lab.data.identity import data_identity
from diffusion_lab.metrics.protocol import as_rgb_uint8

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def image_datamodule(datamodule):
    """The DataModule that holds the images (a latent cache wraps one)."""
    return getattr(datamodule, "images", datamodule)


def dataset_batches(
    datamodule, split: str, batch_size: int = 64
) -> Iterator[tuple[torch.Tensor, list[str] | None]]:
    """(uint8 (N, 3, H, W), captions or None) for every usable image of `split`, at the training resolution."""
    datamodule = image_datamodule(datamodule)
    if not hasattr(datamodule, "examples_for_cache"):
        raise ValueError(
            f"{type(datamodule).__name__} cannot list its images once each (no examples_for_cache)"
        )
    examples, _ = datamodule.examples_for_cache(split)
    for batch in batches_by_shape(examples, batch_size):  # one bucket a batch, where the data has buckets
        batch = datamodule.on_after_batch_transfer(batch, 0)  # uint8 HWC -> [-1, 1] NCHW where needed
        yield as_rgb_uint8(batch["pixels"]), batch.get("caption")


def dataset_key(datamodule, split: str) -> dict:
    return {"data": data_identity(image_datamodule(datamodule)), "split": split}


def image_files(folder: str | Path, names: list[str] | None = None) -> list[Path]:
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder of images")
    if names is not None:
        return [folder / name for name in names]
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def listed_images(folder: str | Path) -> tuple[list[Path], list[str] | None]:
    """The images of a folder and their prompts where known: a `diffusion-lab sample` folder lists its
    images (not its grid) and their prompts in settings.json; any other folder gives every image file."""
    settings = Path(folder).expanduser() / "settings.json"
    if settings.exists():
        images = json.loads(settings.read_text())["images"]
        prompts = (
            [image["prompt"] for image in images] if all("prompt" in image for image in images) else None
        )
        return image_files(folder, [image["file"] for image in images]), prompts
    return image_files(folder), None


def folder_batches(files: list[Path], batch_size: int = 64) -> Iterator[torch.Tensor]:
    """uint8 (N, 3, H, W) batches of the files, each batch one size; unreadable files are skipped and
    counted."""
    pending: list[torch.Tensor] = []
    skipped = 0
    for path in files:
        try:
            picture = decode_image(path.read_bytes(), channels=3)
        except (BadSample, OSError) as error:
            skipped += 1
            log.warning("skipping %s: %s", path, error)
            continue
        image = torch.from_numpy(np.array(picture, dtype=np.uint8)).permute(2, 0, 1)
        if pending and (len(pending) == batch_size or pending[0].shape != image.shape):
            yield torch.stack(pending)
            pending = []
        pending.append(image)
    if pending:
        yield torch.stack(pending)
    if skipped:
        log.warning("%d of %d image files could not be read and were skipped", skipped, len(files))


def folder_key(files: list[Path]) -> dict:
    """Names, sizes and modification times: a folder edited since is a different reference."""
    return {"files": [(str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns) for path in files]}
