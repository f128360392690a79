"""The DataModule family for everything read through `load_dataset`: hub ids and local copies alike."""

import itertools
import logging
import os
from pathlib import Path

import datasets
import lightning as L
import torch

from diffusion_lab.core.crop_geometry import flip_crop_geometry
from diffusion_lab.data.buckets import Bucket, bucket_set, cover_and_crop, nearest_bucket
from diffusion_lab.data.captions import CaptionMaker
from diffusion_lab.data.decoding import BadSample, decode_image, decode_mask, mask_file
from diffusion_lab.data.identity import folder_listing
from diffusion_lab.data.loaders import (
    PrefetchAwareLoader,
    rank_and_world_size,
    require_a_batch,
    stream_loader,
)
from diffusion_lab.data.pixel_cache import (
    PixelCache,
    build_pixel_cache,
    cache_folder,
    cache_key,
    content_listing,
    estimated_bytes,
)
from diffusion_lab.data.sources import load_split
from diffusion_lab.data.stream import ImageStream
from diffusion_lab.data.transforms import (
    crop,
    flip_rows,
    random_flips,
    resize_to_cover,
    to_signed_unit,
)
from diffusion_lab.errors import ConfigError

log = logging.getLogger(__name__)


class ImageDataModule(L.LightningDataModule):
    """Images (+ labels, + captions) from `path`: a hub id (`nelorth/oxford-flowers`) or a local folder,
    parquet / arrow / CSV / JSONL file, or `save_to_disk` directory in the same schema.

    Batches: `pixels` (uint8 from the loader, [-1, 1] floats once on the device), `index`, and `label` /
    `caption` when configured. With `caption_template`
    ("a photo of a {label} flower") labels become captions, named by the dataset's ClassLabel names or by
    `label_display` (a table name in `captions.LABEL_NAME_TABLES`, or a mapping).

    Local map-style data up to `pixel_cache_max_gb` is decoded once into a memory-mapped pixel cache under
    `cache_dir` (`pixel_cache=false` turns it off) and read in the main process (`num_workers` then applies
    to the data that is decoded); crops are drawn per example and flips per step either way.

    `buckets=true` trains at mixed aspect ratios: each training image goes to the bucket of about
    `image_size`^2 pixels (a multiple of `bucket_step` per side, up to `bucket_max_aspect`) nearest its own
    aspect ratio, is resized to cover it and cropped to it, and every batch is one bucket
    (`ImageStream`, `bucket_batching`). Held-out batches stay square. Every example carries its
    `crop_geometry` (file size, crop offset, target size: SDXL's micro-conditioning).
    """

    def __init__(
        self,
        path: str,
        name: str | None = None,
        streaming: bool = True,
        train_split: str = "train",
        val_split: str | None = None,
        val_size: int = 64,
        image_column: str = "image",
        label_column: str | None = None,
        caption_column: str | None = None,
        caption_template: str | None = None,
        label_display: str | dict | None = None,
        image_size: int = 64,
        channels: int = 3,
        center_crop: bool = True,
        random_flip: bool = True,
        batch_size: int = 16,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        max_bad_fraction: float = 0.01,
        seed: int = 0,
        pixel_cache: bool = True,
        pixel_cache_max_gb: float = 2.0,
        cache_dir: str | None = None,
        buckets: bool = False,
        bucket_step: int = 64,
        bucket_max_aspect: float = 2.0,
        mask_dir: str | None = None,
        alpha_mask: bool = False,
    ) -> None:
        super().__init__()
        if mask_dir and alpha_mask:
            raise ConfigError("data.mask_dir and data.alpha_mask both name the loss mask: choose one")
        self.save_hyperparameters()
        self.train_set: ImageStream | None = None
        self.val_set: ImageStream | None = None
        self.pixel_caches: dict[str, PixelCache] = {}
        self.bucket_set = self._bucket_set() if buckets else None

    # ---- reading ------------------------------------------------------------------------------------
    def _load(self, split: str):
        h = self.hparams
        try:
            return load_split(h.path, split, streaming=h.streaming, name=h.name, image_column=h.image_column)
        except ValueError as error:
            if "corresponds to no data" in str(error):  # the datasets library's words for an empty split
                raise ValueError(f"{h.path} (split {split!r}) has no rows") from error
            raise

    def _check_columns(self, dataset, split: str) -> None:
        """Fail before training: no rows, or a configured column that is not there."""
        h = self.hparams
        if isinstance(dataset, datasets.IterableDataset):
            first = next(iter(dataset.take(1)), None)
            if first is None:
                raise ValueError(f"{h.path} (split {split!r}) has no rows")
            columns = list(first)
        else:
            if len(dataset) == 0:
                raise ValueError(f"{h.path} (split {split!r}) has no rows")
            columns = dataset.column_names
        wanted = {"data.image_column": h.image_column, "data.label_column": h.label_column}
        wanted["data.caption_column"] = h.caption_column
        missing = [f"{key}={column!r}" for key, column in wanted.items() if column and column not in columns]
        if missing:
            raise ValueError(
                f"{h.path} (split {split!r}): {', '.join(missing)} not found; its columns are {columns}"
            )

    def _label_names(self, dataset) -> list[str] | None:
        feature = (
            (dataset.features or {}).get(self.hparams.label_column) if self.hparams.label_column else None
        )
        return list(feature.names) if isinstance(feature, datasets.ClassLabel) else None

    # ---- examples ---------------------------------------------------------------------------------
    def _bucket_set(self) -> tuple[Bucket, ...]:
        h = self.hparams
        if not 0 < h.bucket_step <= h.image_size or h.bucket_max_aspect < 1:
            raise ConfigError(
                f"data.buckets needs 0 < data.bucket_step <= data.image_size and data.bucket_max_aspect >= 1, "
                f"got bucket_step={h.bucket_step}, image_size={h.image_size}, "
                f"bucket_max_aspect={h.bucket_max_aspect}"
            )
        return bucket_set(h.image_size**2, h.bucket_step, h.bucket_max_aspect)

    def _resized(self, value):
        """Decoded and resized to cover the square crop, uncropped, with the file's size: what the pixel cache
        holds."""
        h = self.hparams
        image = decode_image(value, h.channels, min_size=h.image_size)
        original = image.info["original_size"]
        return resize_to_cover(image, cover_and_crop(*original, Bucket.square(h.image_size))), original

    def _example_maker(self, dataset, center: bool, bucketed: bool, cache: PixelCache | None = None):
        h = self.hparams
        square = Bucket.square(h.image_size)
        captions = CaptionMaker(
            h.caption_column, h.caption_template, h.label_column, self._label_names(dataset), h.label_display
        )

        def to_example(row: dict, entropy: int, index: int) -> dict:
            if cache is not None:  # square plans only
                resized, original = cache[index]
                plan = cover_and_crop(*original, square, center, entropy)
            else:
                image = decode_image(row[h.image_column], h.channels, min_size=h.image_size)
                original = image.info["original_size"]
                bucket = nearest_bucket(*original, self.bucket_set) if bucketed else square
                plan = cover_and_crop(*original, bucket, center, entropy)
                resized = resize_to_cover(image, plan)
            example = {"pixels": crop(resized, plan), "crop_geometry": plan.geometry()}
            if self.masked:  # the same resize and crop as the image: the mask stays on its pixels
                mask = self._mask(row[h.image_column])
                if h.mask_dir and mask.size != tuple(original):
                    raise BadSample(
                        f"its mask is {mask.size[0]}x{mask.size[1]}, the image {original[0]}x{original[1]}"
                    )
                example["loss_mask"] = crop(resize_to_cover(mask, plan), plan)
            if h.label_column:
                example["label"] = row[h.label_column]
            if captions.enabled:
                caption = captions(row)
                if caption is None:
                    raise BadSample("missing caption")
                example["caption"] = caption
            return example

        return to_example

    @property
    def masked(self) -> bool:
        """Whether examples carry a `loss_mask` (from `mask_dir` or the alpha channel)."""
        return bool(self.hparams.mask_dir or self.hparams.alpha_mask)

    def _mask(self, value):
        h = self.hparams
        if h.alpha_mask:
            return decode_mask(value, from_alpha=True)
        path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
        return decode_mask(mask_file(h.mask_dir, path))

    def _describe_row(self, row: dict, index: int) -> str:
        image = row.get(self.hparams.image_column)
        path = image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
        return f"{self.hparams.path} row {index}" + (f" ({path})" if path else "")

    def _stream(self, dataset, train: bool, cache: PixelCache | None) -> ImageStream:
        h = self.hparams
        bucketed = train and self.bucket_set is not None
        columns = [h.image_column, h.label_column, h.caption_column]
        return ImageStream(
            dataset,
            self._example_maker(dataset, h.center_crop or not train, bucketed, cache),
            **rank_and_world_size(self.trainer),
            shuffle=train,
            seed=h.seed,
            shuffle_buffer=h.shuffle_buffer,
            epochs=None if train else 1,
            max_bad_fraction=h.max_bad_fraction,
            describe_row=self._describe_row,
            bucket_of=pixel_shape if bucketed else None,
            batch_size=h.batch_size,
            keep_columns=[column for column in columns if column],
        )

    def _splits(self) -> tuple:
        h = self.hparams
        train = self._load(h.train_split)
        self._check_columns(train, h.train_split)
        if h.val_split is not None:
            val = self._load(h.val_split)
            self._check_columns(val, h.val_split)
        elif isinstance(train, datasets.IterableDataset):  # hold out the stream's first rows
            self._check_rows_beyond_val_size(train)
            train, val = train.skip(h.val_size), train.take(h.val_size)
        else:  # hold out a fixed random slice
            parts = train.train_test_split(test_size=min(h.val_size, max(1, len(train) // 10)), seed=h.seed)
            train, val = parts["train"], parts["test"]
        return train, val

    # ---- the pixel cache -----------------------------------------------------------------------------
    def _cache_root(self) -> Path:
        if self.hparams.cache_dir:
            return Path(self.hparams.cache_dir)
        home = os.environ.get(
            "DIFFUSION_LAB_CACHE", os.path.join(os.environ.get("HOME", "."), ".cache", "diffusion_lab")
        )
        return Path(home) / "pixels"

    def _cacheable(self, dataset, split: str) -> bool:
        """Local map-style rows under the size threshold (streams are read once per pass anyway), cropped
        square (a bucketed split resizes each image for its own bucket)."""
        h = self.hparams
        if not h.pixel_cache or isinstance(dataset, datasets.IterableDataset) or self.masked:
            return False  # (the pixel cache holds no masks)
        if split == "train" and self.bucket_set is not None:
            return False
        size = estimated_bytes(len(dataset), h.image_size, h.channels)
        if size > h.pixel_cache_max_gb * 2**30:
            log.info(
                "pixel cache off: ~%.1f GB > data.pixel_cache_max_gb=%s", size / 2**30, h.pixel_cache_max_gb
            )
            return False
        return True

    def _pixel_cache(self, dataset, split: str) -> PixelCache | None:
        """The split's cache, built if missing; None where it does not apply."""
        if not self._cacheable(dataset, split):
            return None
        h = self.hparams
        key = cache_key(dataset, h.image_column, h.image_size, h.channels)
        folder = cache_folder(self._cache_root(), key)
        if not (
            folder / "meta.json"
        ).exists():  # (a concurrent builder's folder, if first, is replaced whole)
            rows = (
                (i, row[h.image_column]) for i, row in enumerate(dataset.select_columns([h.image_column]))
            )
            build_pixel_cache(folder, rows, len(dataset), self._resized, key, f"Caching pixels ({split})")
            log.info("pixel cache (%s): wrote %s", split, folder)
        cache = PixelCache(folder)
        for row, reason in list(cache.bad_rows.items())[:5]:
            log.warning("pixel cache (%s): row %d cannot be used: %s", split, row, reason)
        return cache

    def content_key(self, split: str) -> str | None:
        """A digest of what `split`'s images are (each file's path, size and modification time), for caches
        built from them; None for streamed data, which has no listing short of reading it."""
        if self.hparams.streaming:  # (a hub dataset's id is in the key; its revision is not)
            return None
        dataset = dict(zip(("train", "val"), self._splits(), strict=True))[split]
        listing = content_listing(dataset, self.hparams.image_column)
        if self.hparams.mask_dir:  # an edited mask is new content too
            listing += f"+masks:{folder_listing(self.hparams.mask_dir)}"
        return listing

    def cache_refusal(self, split: str) -> str | None:
        """Why a cache of one entry per image (and orientation) of `split`, such as REPA's encoder features,
        would not hold what training sees; None where it would."""
        if self.hparams.streaming:
            return "streamed data has no file listing to key a cache by"
        if split == "train" and (not self.hparams.center_crop or self.bucket_set is not None):
            return "random crops and aspect buckets give each step other pixels of an image"
        return None

    def num_examples(self, split: str) -> int:
        """Rows of a local split (before undecodable ones are skipped)."""
        return len(dict(zip(("train", "val"), self._splits(), strict=True))[split])

    def prepare_data(self) -> None:
        # Once per node before any rank's setup: one process builds the caches.
        if self.hparams.pixel_cache:
            for split, dataset in zip(("train", "val"), self._splits(), strict=True):
                self._pixel_cache(dataset, split)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val = self._splits()
        self.pixel_caches = {
            split: cache
            for split, dataset in (("train", train), ("val", val))
            if (cache := self._pixel_cache(dataset, split)) is not None
        }
        self.train_set = self._stream(train, train=True, cache=self.pixel_caches.get("train"))
        self.val_set = self._stream(val, train=False, cache=self.pixel_caches.get("val"))

    def _check_rows_beyond_val_size(self, stream) -> None:
        """A stream shorter than `val_size` would leave training nothing (and fail later, deep in a worker)."""
        h = self.hparams
        rows = sum(1 for _ in itertools.islice(iter(stream), h.val_size + 1))
        if rows <= h.val_size:
            raise ConfigError(
                f"data.val_size={h.val_size} holds out every row: split {h.train_split!r} has only {rows} rows. "
                f"Set data.val_size below {rows} (e.g. data.val_size={max(1, rows // 10)}) or name a data.val_split"
            )

    def examples_for_cache(self, split: str) -> tuple[ImageStream, bool]:
        """Each usable example of `split` once, unflipped and centre-cropped (in its bucket when the split is
        bucketed: batch them with `bucket_batching.batches_by_shape`), on one process; and whether training
        flips at random (then the cache holds both orientations)."""
        h = self.hparams
        if split == "train" and not h.center_crop:
            raise ValueError(
                "a latent cache holds one crop per image, so it needs centre crops: set center_crop=true "
                "on the cached data (random crops need latent_cache=null)"
            )
        self.setup()
        dataset = {"train": self.train_set, "val": self.val_set}[split].dataset
        bucketed = split == "train" and self.bucket_set is not None
        stream = ImageStream(
            dataset, self._example_maker(dataset, True, bucketed, cache=self.pixel_caches.get(split)),
            shuffle=False, seed=h.seed, epochs=1, max_bad_fraction=h.max_bad_fraction,
            describe_row=self._describe_row,
        )  # fmt: skip
        return stream, h.random_flip

    def train_dataloader(self) -> PrefetchAwareLoader:
        # The stream shards and shuffles itself; Lightning checkpoints the loader's state (the position).
        dataset, world_size = self.train_set.dataset, rank_and_world_size(self.trainer).get("world_size", 1)
        if not isinstance(dataset, datasets.IterableDataset) and self.bucket_set is None:
            # a local split is finite: a batch larger than a process's share would repeat images within it
            require_a_batch(len(dataset) // world_size, self.hparams.batch_size, len(dataset), world_size)
        return self._loader(self.train_set, "train" in self.pixel_caches)

    def val_dataloader(self) -> PrefetchAwareLoader:
        return self._loader(self.val_set, "val" in self.pixel_caches)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Workers ship uint8; the conversion to [-1, 1] floats runs on the training device, and so do the
        training flips, keyed on (seed, step, image) as the latent cache keys its choice of orientation
        (`flipped`: which were mirrored)."""
        batch = {**batch, "pixels": to_signed_unit(batch["pixels"])}
        if "loss_mask" in batch and batch["loss_mask"].dtype == torch.uint8:  # NHWC uint8 -> N1HW in [0, 1]
            batch["loss_mask"] = batch["loss_mask"].permute(0, 3, 1, 2).float().div_(255)
        trainer = self.trainer
        if self.hparams.random_flip and trainer is not None and trainer.training:
            flips = random_flips(self.hparams.seed, trainer.global_step, batch["index"])
            batch["pixels"], batch["flipped"] = flip_rows(batch["pixels"], flips), flips
            if "loss_mask" in batch:
                batch["loss_mask"] = flip_rows(batch["loss_mask"], flips)
            if "crop_geometry" in batch:
                batch["crop_geometry"] = flip_crop_geometry(batch["crop_geometry"], flips)
        return batch

    def _loader(self, stream: ImageStream, cached: bool) -> PrefetchAwareLoader:
        # Cached rows are a memory-mapped slice and a crop (~25k img/s in-process on 2 cores, `bench data`):
        # loader workers would only add IPC and take cores from the model.
        return stream_loader(stream, self.hparams.batch_size, 0 if cached else self.hparams.num_workers)


def pixel_shape(example: dict) -> tuple[int, ...]:
    """An example's bucket: the shape of its crop."""
    return tuple(example["pixels"].shape)
