"""Training on cached latents and text embeddings instead of images (`latent_cache=disk`)."""

import gc
import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from diffusion_lab.core.crop_geometry import flip_crop_geometry
from diffusion_lab.data.bucket_batching import batches_by_shape
from diffusion_lab.data.identity import data_identity
from diffusion_lab.data.latent_cache import CACHE_FORMAT, CachedLatents, write_latent_cache
from diffusion_lab.data.latent_cache import storage_dtype as check_storage_dtype
from diffusion_lab.data.loaders import rank_and_world_size, resumable_loader, stream_loader
from diffusion_lab.data.stream import ImageStream
from diffusion_lab.data.transforms import flip_rows, random_flips

log = logging.getLogger(__name__)

SPLITS = ("train", "val")


class LatentCacheDataModule(L.LightningDataModule):
    """Wraps an image DataModule (`images`, any `data=` option with captions).

    `prepare_data` (once per node, before any rank trains) runs the model family's `encoder` (a
    `families.LatentEncoder`, built by the config: the frozen VAE and text encoder(s), loaded only when a split
    is missing) over each split once and writes the result under `cache_dir/<key>/<split>/`. The key is a hash
    of everything that changes the cache's contents: the encoder's key (the exact frozen weights, hub commit or
    local files, and their dtypes), the images' files (path, size, modification time of each), the data
    settings (source, resolution, bucket set, crop, flip, captions, held-out split) and the storage dtype. A changed setting or image gets a new folder; nothing stale is ever read
    (stale embeddings after a precision change gave NaN losses in kohya-ss/sd-scripts PR 1413; latents not
    rebuilt after a bucket change in kohya-ss/sd-scripts issue 1771).

    Batches: `latent_mean`, `latent_std` (one orientation, chosen per image and step when the data flips
    at random), `crop_geometry`, `text_embedding`, `empty_text_embedding` (SDXL: `pooled_text_embedding`,
    `empty_pooled_text_embedding`), `caption`, `index`. With bucketed images every training batch is one
    bucket, read through the same `ImageStream` as images are (exact resume, nothing dropped).
    """

    def __init__(
        self,
        images: L.LightningDataModule,
        encoder,
        cache_dir: str,
        storage_dtype: str = "float32",
        encode_batch_size: int = 32,
        batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["images", "encoder"])
        check_storage_dtype(storage_dtype)
        self.images, self.encoder = images, encoder
        self.batch_size = batch_size or images.hparams.batch_size
        self.train_set: CachedLatents | None = None
        self.val_set: CachedLatents | None = None
        self._contents: dict[str, str | None] = {}

    # ---- where ----------------------------------------------------------------------------------------
    def cache_key(self, split: str) -> dict:
        h = self.hparams
        return {
            "format": CACHE_FORMAT,
            **self.encoder.key(),
            "storage_dtype": h.storage_dtype,
            "data": data_identity(self.images),
            "content": self._content(split),
            "split": split,
        }

    def _content(self, split: str) -> str | None:
        """A digest of the split's images (each file's path, size, modification time), where the data lists
        files; memoised, as every lookup of the folder asks for it."""
        if split not in self._contents:
            content_key = getattr(self.images, "content_key", None)
            self._contents[split] = content_key(split) if content_key else None
        return self._contents[split]

    def cache_folder(self, split: str) -> Path:
        key = self.cache_key(split)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return Path(self.hparams.cache_dir) / digest / split

    # ---- building ---------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        missing = [split for split in SPLITS if not (self.cache_folder(split) / "meta.json").exists()]
        for split in SPLITS:
            if split not in missing:
                log.info("latent cache (%s): reusing %s", split, self.cache_folder(split))
        if not missing:
            return
        h = self.hparams
        self.images.prepare_data()
        self.images.setup("fit")
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.encoder.to(device)
        for split in missing:
            examples, flips = self.images.examples_for_cache(split)
            folder = write_latent_cache(
                self.cache_folder(split), batches_by_shape(examples, h.encode_batch_size),
                lambda batch: self.images.on_after_batch_transfer(batch, 0), self.encoder,
                flips=flips and split == "train", key=self.cache_key(split), device=device,
                batch_size=h.encode_batch_size, dtype=h.storage_dtype, description=f"Caching latents ({split})",
            )  # fmt: skip
            log.info("latent cache (%s): wrote %s", split, folder)
        self.encoder.release()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- reading --------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        folders = {split: self.cache_folder(split) for split in SPLITS}
        for split, folder in folders.items():
            if not (folder / "meta.json").exists():
                raise FileNotFoundError(
                    f"no latent cache for the {split} split at {folder}: prepare_data() builds it "
                    "(Trainer.fit calls it before setup)"
                )
        self.train_set, self.val_set = CachedLatents(folders["train"]), CachedLatents(folders["val"])

    def train_dataloader(self):
        if getattr(self.images, "bucket_set", None) is not None:  # one bucket a batch
            stream = ImageStream(
                self.train_set, cached_row, **rank_and_world_size(self.trainer), shuffle=True,
                seed=self.hparams.seed, epochs=None, bucket_of=latent_shape, batch_size=self.batch_size,
            )  # fmt: skip
            return stream_loader(stream, self.batch_size, self.hparams.num_workers)
        return resumable_loader(
            self.train_set, self.batch_size, shuffle=True, seed=self.hparams.seed,
            num_workers=self.hparams.num_workers, drop_last=len(self.train_set) >= self.batch_size,
            **rank_and_world_size(self.trainer),
        )  # fmt: skip

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False)

    def on_after_batch_transfer(self, batch: dict, dataloader_idx: int) -> dict:
        """Pick one orientation per image: in training the one `random_flips` picks for the image at this step
        (what the image path would have flipped), the unflipped one otherwise; `flipped` says which."""
        mean, std = batch["latent_mean"], batch["latent_std"]
        rows = torch.arange(len(mean), device=mean.device)
        if mean.shape[1] > 1 and self.trainer is not None and self.trainer.training:
            flips = random_flips(self.hparams.seed, self.trainer.global_step, batch["index"])
            choice = flips.long().to(mean.device)
        else:
            choice = torch.zeros(len(mean), dtype=torch.long, device=mean.device)
        batch = {**batch, "latent_mean": mean[rows, choice], "latent_std": std[rows, choice],
                 "flipped": choice.bool()}  # fmt: skip
        if "crop_geometry" in batch:
            batch["crop_geometry"] = flip_crop_geometry(batch["crop_geometry"], choice.bool())
        if "loss_mask" in batch:  # stored unflipped: mirrored with the latents it weighs
            batch["loss_mask"] = flip_rows(batch["loss_mask"], choice.bool())
        return batch


def cached_row(row: dict, entropy: int, index: int) -> dict:
    """A cache row is already an example (with its source's `index`, which keys its noise)."""
    return row


def latent_shape(example: dict) -> tuple[int, ...]:
    """A cached example's bucket: the shape of its latents."""
    return tuple(example["latent_mean"].shape)
