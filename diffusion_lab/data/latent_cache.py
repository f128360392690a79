"""A disk cache of what the frozen VAE and text encoder(s) make of a dataset, so training never runs them.

Per split, one folder: `latent_mean.bin` / `latent_std.bin` (each row (F, C, h, w) at its own `latent_offsets`
and `latent_shapes`, F = 2 when the data flips at random (both orientations are encoded); rows of different
aspect-ratio buckets differ in (h, w)), `crop_geometry.npy` (the crop each latent was encoded from),
`text_embeddings.bin` (one row per distinct caption, row 0 the empty prompt; SDXL also
`pooled_embeddings.bin`), with masked data `loss_mask.bin` (each image's loss mask at its latents' resolution,
by area, unflipped, float32) and `mask_offsets.npy`, `caption_ids.npy`, `indices.npy` (the source's example index, which keys the noise
as in uncached training) and `meta.json` (shapes, dtype, and the key the folder is named after). The latent
*distribution* is cached, not one sample of it, so every step still draws a fresh latent.
"""

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from diffusion_lab.core.crop_geometry import batch_crop_geometry
from diffusion_lab.runs.atomic import write_folder

CACHE_FORMAT = 2  # 2: rows of any latent shape (buckets), crop geometry, pooled embeddings
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def storage_dtype(name: str) -> np.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"latent_cache.storage_dtype={name!r}; choose one of {sorted(STORAGE_DTYPES)}")
    return np.dtype(STORAGE_DTYPES[name])


@torch.no_grad()
def encode_captions(
    captions: list[str], encoder, device, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(context rows, pooled rows or None) for `captions`, through the family's own prompt encoding."""
    hidden, pooled = [], []
    for start in range(0, len(captions), batch_size):
        embeddings = encoder.encode_prompts(captions[start : start + batch_size], device)
        hidden.append(embeddings.hidden.float().cpu().numpy())
        if embeddings.pooled is not None:
            pooled.append(embeddings.pooled.float().cpu().numpy())
    return np.concatenate(hidden), np.concatenate(pooled) if pooled else None


@torch.no_grad()
def write_latent_cache(
    out_dir: Path,
    batches: Iterable[dict],
    prepare_batch: Callable[[dict], dict],
    encoder,
    *,
    flips: bool,
    key: dict,
    device: torch.device,
    batch_size: int = 32,
    dtype: str = "float32",
    description: str = "Caching latents",
) -> Path:
    """One pass of the family's `encoder` (`families.LatentEncoder`: `encode_posterior`, `encode_prompts`) over
    `batches` (of one shape each, with `pixels`, `caption`, `index`, `crop_geometry`), the VAE over the images
    and the text encoder(s) over the distinct captions; written to a temporary folder renamed to `out_dir` at
    the end."""
    stored = storage_dtype(dtype)

    def write(folder: Path) -> None:
        captions: dict[str, int] = {"": 0}
        caption_ids, indices, shapes, geometry = [], [], [], []
        mask_sizes: list[int] = []
        with (
            open(folder / "latent_mean.bin", "wb") as means,
            open(folder / "latent_std.bin", "wb") as stds,
            open(folder / "loss_mask.bin", "wb") as masks,
        ):
            for batch in tqdm(batches, desc=description, unit="batch"):
                batch = prepare_batch({**batch, "pixels": batch["pixels"].to(device)})
                if "caption" not in batch:
                    raise ValueError(
                        "the latent cache needs captions: configure the data's caption column or template"
                    )
                pixels = batch["pixels"]
                views = [pixels, pixels.flip(-1)] if flips else [pixels]
                posteriors = [encoder.encode_posterior(view) for view in views]
                mean = torch.stack([p[0] for p in posteriors], dim=1).cpu().numpy()
                std = torch.stack([p[1] for p in posteriors], dim=1).cpu().numpy()
                if not (np.isfinite(mean).all() and np.isfinite(std).all()):
                    raise ValueError(
                        f"{description}: the VAE ({encoder.vae.dtype}) gave non-finite latents, which would train on NaN. "
                        "SD and SDXL VAEs overflow in float16: set model.vae_dtype=float32, or use an fp16-safe VAE "
                        "(model.vae=madebyollin/sdxl-vae-fp16-fix)"
                    )
                means.write(mean.astype(stored).tobytes())
                stds.write(std.astype(stored).tobytes())
                if (
                    "loss_mask" in batch
                ):  # at the latents' resolution, by area, unflipped: as training weighs it
                    latent_mask = F.interpolate(batch["loss_mask"].float(), size=mean.shape[-2:], mode="area")
                    masks.write(latent_mask.cpu().numpy().astype(np.float32).tobytes())
                    mask_sizes += [int(np.prod(latent_mask.shape[1:]))] * len(mean)
                shapes += [list(mean.shape[1:])] * len(mean)
                geometry += batch_crop_geometry(batch).tolist()
                caption_ids += [captions.setdefault(caption, len(captions)) for caption in batch["caption"]]
                indices += torch.as_tensor(batch["index"]).tolist()
        if not indices:
            raise ValueError(f"{description}: the data yielded no examples")
        sizes = [int(np.prod(shape)) for shape in shapes]
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        hidden, pooled = encode_captions(list(captions), encoder, device, batch_size)
        (folder / "text_embeddings.bin").write_bytes(hidden.astype(stored).tobytes())
        if pooled is not None:
            (folder / "pooled_embeddings.bin").write_bytes(pooled.astype(stored).tobytes())
        np.save(folder / "latent_offsets.npy", offsets)
        np.save(folder / "latent_shapes.npy", np.asarray(shapes, dtype=np.int64))
        np.save(folder / "crop_geometry.npy", np.asarray(geometry, dtype=np.int64))
        np.save(folder / "caption_ids.npy", np.asarray(caption_ids, dtype=np.int64))
        np.save(folder / "indices.npy", np.asarray(indices, dtype=np.int64))
        (folder / "captions.json").write_text(json.dumps(list(captions)))
        if mask_sizes:
            np.save(
                folder / "mask_offsets.npy",
                np.concatenate([[0], np.cumsum(mask_sizes)[:-1]]).astype(np.int64),
            )
        meta = {
            "count": len(indices),
            "elements": int(sum(sizes)),
            "orientations": 2 if flips else 1,
            "latent_shapes": sorted({tuple(shape) for shape in shapes}),
            "text_shape": list(hidden.shape[1:]),
            "pooled_shape": None if pooled is None else list(pooled.shape[1:]),
            "num_captions": len(captions),
            "loss_mask_elements": int(sum(mask_sizes)) if mask_sizes else None,  # float32, (1, h, w) a row
            "dtype": dtype,
            "key": key,
        }
        (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

    return write_folder(out_dir, write)


class CachedLatents(Dataset):
    """Reads one split of the cache through memory maps (opened lazily, so loader workers open their own)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / "meta.json").read_text())
        self.captions = json.loads((self.folder / "captions.json").read_text())
        self._arrays: dict | None = None

    def _open(self) -> dict:
        if self._arrays is None:
            meta, dtype = self.meta, storage_dtype(self.meta["dtype"])

            def mapped(name: str, shape: list[int]) -> np.memmap:
                return np.memmap(self.folder / name, dtype=dtype, mode="r", shape=tuple(shape))

            self._arrays = {
                "mean": mapped("latent_mean.bin", [meta["elements"]]),
                "std": mapped("latent_std.bin", [meta["elements"]]),
                "text": mapped("text_embeddings.bin", [meta["num_captions"], *meta["text_shape"]]),
                **{name: np.load(self.folder / f"{name}.npy") for name in _ROW_ARRAYS},
            }
            if meta["pooled_shape"] is not None:
                shape = [meta["num_captions"], *meta["pooled_shape"]]
                self._arrays["pooled"] = mapped("pooled_embeddings.bin", shape)
            if meta.get("loss_mask_elements"):
                self._arrays["mask"] = np.memmap(self.folder / "loss_mask.bin", dtype=np.float32, mode="r",
                                                 shape=(meta["loss_mask_elements"],))  # fmt: skip
                self._arrays["mask_offsets"] = np.load(self.folder / "mask_offsets.npy")
        return self._arrays

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def orientations(self) -> int:
        return self.meta["orientations"]

    def __getitem__(self, i: int) -> dict:
        arrays = self._open()
        caption_id = int(arrays["caption_ids"][i])
        offset, shape = int(arrays["latent_offsets"][i]), tuple(int(n) for n in arrays["latent_shapes"][i])
        size = int(np.prod(shape))

        def tensor(array) -> torch.Tensor:
            return torch.from_numpy(np.array(array, dtype=np.float32))

        row = {
            "latent_mean": tensor(arrays["mean"][offset : offset + size]).view(shape),
            "latent_std": tensor(arrays["std"][offset : offset + size]).view(shape),
            "text_embedding": tensor(arrays["text"][caption_id]),
            "empty_text_embedding": tensor(arrays["text"][0]),
            "crop_geometry": torch.from_numpy(arrays["crop_geometry"][i].copy()),
            "caption": self.captions[caption_id],
            "index": int(arrays["indices"][i]),
        }
        if "pooled" in arrays:
            row["pooled_text_embedding"] = tensor(arrays["pooled"][caption_id])
            row["empty_pooled_text_embedding"] = tensor(arrays["pooled"][0])
        if "mask" in arrays:
            start, area = int(arrays["mask_offsets"][i]), shape[-2] * shape[-1]
            row["loss_mask"] = tensor(arrays["mask"][start : start + area]).view(1, *shape[-2:])
        return row


_ROW_ARRAYS = ("latent_offsets", "latent_shapes", "crop_geometry", "caption_ids", "indices")
