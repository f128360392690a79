"""Decoded pixels of a local dataset, built once and memory-mapped: training reads arrays, not JPEGs.

On flowers-12 at 32 px the loader workers that decode and resize 224 px JPEGs share the two cores with the
model, and training ran at 30 img/s where loops over preloaded tensors ran at 36-46 (issue 13). The cache
holds each row resized so its shorter side is the training size (`transforms.resize_to_cover` for the square
crop: the margin random crops need) with the file's own size, as uint8 in one flat file; crops and flips are
still drawn per step, so a cached batch is the same pixels as a decoded one. Like the latent cache it lives in
a folder named by a hash of everything that changes its contents (the rows' files, the resolution, the
channels), written then renamed.
"""

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import datasets
import numpy as np
from tqdm.auto import tqdm

from diffusion_lab.compat.datasets import dataset_fingerprint
from diffusion_lab.data.decoding import BadSample
from diffusion_lab.runs.atomic import write_folder

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: the original size of each row (SDXL conditions on it)
_PIXELS, _INDEX, _META = "pixels.u8", "index.npy", "meta.json"


def content_listing(dataset: datasets.Dataset, image_column: str) -> str:
    """A digest of what the rows are: the dataset's fingerprint and, for rows that point at files, each file's
    path, size and modification time (a file rewritten in place changes the key)."""
    digest = hashlib.sha256(dataset_fingerprint(dataset).encode())
    for row in dataset.select_columns([image_column]):  # row by row: a column access loads it whole
        value = row[image_column]
        path = value.get("path") if isinstance(value, dict) and not value.get("bytes") else value
        if isinstance(path, str) and os.path.exists(path):
            stat = os.stat(path)
            digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def cache_key(dataset: datasets.Dataset, image_column: str, image_size: int, channels: int) -> dict:
    return {
        "format": CACHE_FORMAT,
        "content": content_listing(dataset, image_column),
        "rows": len(dataset),
        "image_size": image_size,
        "channels": channels,
    }


def cache_folder(root: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    return Path(root) / digest


def estimated_bytes(rows: int, image_size: int, channels: int, aspect_margin: float = 1.5) -> int:
    """What a cache of `rows` images would take (non-square images keep their longer side's margin)."""
    return int(rows * image_size * image_size * channels * aspect_margin)


def build_pixel_cache(
    folder: Path,
    rows: Iterable[tuple[int, object]],
    count: int,
    decode: Callable[[object], tuple[np.ndarray, tuple[int, int]]],
    key: dict,
    description: str = "Caching pixels",
) -> Path:
    """Decode every row once (`decode(value) -> (uint8 HWC, the file's (width, height))`, raising BadSample
    for a bad one) into `folder`."""

    def write(staging: Path) -> None:
        # offset, height, width, original width, original height (height 0: a bad row)
        index = np.zeros((count, 5), dtype=np.int64)
        bad: dict[int, str] = {}
        offset = 0
        with open(staging / _PIXELS, "wb") as pixels:
            for row, value in tqdm(rows, total=count, desc=description, leave=False):
                try:
                    array, original = decode(value)
                    array = np.ascontiguousarray(array)
                except BadSample as error:
                    bad[row] = str(error)
                    continue
                pixels.write(array.tobytes())
                index[row] = (offset, array.shape[0], array.shape[1], *original)
                offset += array.size
        np.save(staging / _INDEX, index)
        meta = {"key": key, "rows": count, "bytes": offset, "bad_rows": bad}
        (staging / _META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    return write_folder(folder, write)


class PixelCache:
    """Read side: `cache[row]` is (the uint8 HWC array of a row, its file's (width, height)), or BadSample with
    the reason it was skipped."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        meta = json.loads((self.folder / _META).read_text())
        self.channels = meta["key"]["channels"]
        self.bad_rows = {int(row): reason for row, reason in meta["bad_rows"].items()}
        self.index = np.load(self.folder / _INDEX)
        self._pixels: np.memmap | None = None  # opened lazily: in each loader worker, not pickled to it
        self._bytes = meta["bytes"]

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_pixels": None}

    def __getitem__(self, row: int) -> tuple[np.ndarray, tuple[int, int]]:
        if row in self.bad_rows:
            raise BadSample(self.bad_rows[row])
        if self._pixels is None:
            self._pixels = np.memmap(
                self.folder / _PIXELS, dtype=np.uint8, mode="r", shape=(max(1, self._bytes),)
            )
        offset, height, width, original_width, original_height = (int(v) for v in self.index[row])
        pixels = self._pixels[offset : offset + height * width * self.channels]
        return pixels.reshape(height, width, self.channels), (original_width, original_height)
