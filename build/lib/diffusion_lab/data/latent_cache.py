"""A disk cache of what the frozen VAE and text encoder make of a dataset, so training never runs them.

Per split, one folder: `latent_mean.bin` / `latent_std.bin` (N, F, C, h, w) with F = 2 when the data flips
at random (both orientations are encoded), `text_embeddings.bin` (one row per distinct caption, row 0 the
empty prompt), `caption_ids.npy`, `indices.npy` (the source's example index, which keys the noise as in
uncached training) and `meta.json` (shapes, dtype, and the key the folder is named after). The latent
*distribution* is cached, not one sample of it, so every step still draws a fresh latent.
"""

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from diffusion_lab.atomic import write_folder
from diffusion_lab.models.stable_diffusion import token_ids

CACHE_FORMAT = 1
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


def storage_dtype(name: str) -> np.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"latent_cache.storage_dtype={name!r}; choose one of {sorted(STORAGE_DTYPES)}")
    return np.dtype(STORAGE_DTYPES[name])


@torch.no_grad()
def encode_text_batches(captions: list[str], tokenizer, text_encoder, device, batch_size: int) -> np.ndarray:
    rows = []
    for start in range(0, len(captions), batch_size):
        ids = token_ids(tokenizer, captions[start : start + batch_size]).to(device)
        rows.append(text_encoder(ids)[0].float().cpu().numpy())
    return np.concatenate(rows)


@torch.no_grad()
def write_latent_cache(
    out_dir: Path,
    examples: Dataset,
    prepare_batch: Callable[[dict], dict],
    parts: dict,
    *,
    flips: bool,
    key: dict,
    device: torch.device,
    batch_size: int = 32,
    dtype: str = "float32",
    description: str = "Caching latents",
) -> Path:
    """One pass of the VAE over `examples` (dicts with `pixels`, `caption`, `index`), then of the text
    encoder over the distinct captions; written to a temporary folder renamed to `out_dir` at the end."""
    stored = storage_dtype(dtype)
    vae, text_encoder = parts["vae"].to(device), parts["text_encoder"].to(device)

    def write(folder: Path) -> None:
        captions: dict[str, int] = {"": 0}
        caption_ids, indices, latent_shape = [], [], None
        loader = DataLoader(examples, batch_size=batch_size, num_workers=0)
        total = len(loader) if hasattr(examples, "__len__") else None
        with open(folder / "latent_mean.bin", "wb") as means, open(folder / "latent_std.bin", "wb") as stds:
            for batch in tqdm(loader, desc=description, total=total, unit="batch"):
                batch = prepare_batch({**batch, "pixels": batch["pixels"].to(device)})
                if "caption" not in batch:
                    raise ValueError(
                        "the latent cache needs captions: configure the data's caption column or template"
                    )
                pixels = batch["pixels"].to(vae.dtype)
                views = [pixels, pixels.flip(-1)] if flips else [pixels]
                posteriors = [vae.encode(view).latent_dist for view in views]
                mean = torch.stack([p.mean for p in posteriors], dim=1).float().cpu().numpy()
                std = torch.stack([p.std for p in posteriors], dim=1).float().cpu().numpy()
                means.write(mean.astype(stored).tobytes())
                stds.write(std.astype(stored).tobytes())
                latent_shape = list(mean.shape[1:])
                caption_ids += [captions.setdefault(caption, len(captions)) for caption in batch["caption"]]
                indices += torch.as_tensor(batch["index"]).tolist()
        if not indices:
            raise ValueError(f"{description}: the data yielded no examples")
        embeddings = encode_text_batches(list(captions), parts["tokenizer"], text_encoder, device, batch_size)
        (folder / "text_embeddings.bin").write_bytes(embeddings.astype(stored).tobytes())
        np.save(folder / "caption_ids.npy", np.asarray(caption_ids, dtype=np.int64))
        np.save(folder / "indices.npy", np.asarray(indices, dtype=np.int64))
        (folder / "captions.json").write_text(json.dumps(list(captions)))
        meta = {
            "count": len(indices),
            "latent_shape": latent_shape,
            "text_shape": list(embeddings.shape[1:]),
            "num_captions": len(captions),
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
                "mean": mapped("latent_mean.bin", [meta["count"], *meta["latent_shape"]]),
                "std": mapped("latent_std.bin", [meta["count"], *meta["latent_shape"]]),
                "text": mapped("text_embeddings.bin", [meta["num_captions"], *meta["text_shape"]]),
                "caption_ids": np.load(self.folder / "caption_ids.npy"),
                "indices": np.load(self.folder / "indices.npy"),
            }
        return self._arrays

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def orientations(self) -> int:
        return self.meta["latent_shape"][0]

    def __getitem__(self, i: int) -> dict:
        arrays = self._open()
        caption_id = int(arrays["caption_ids"][i])

        def tensor(array) -> torch.Tensor:
            return torch.from_numpy(np.array(array, dtype=np.float32))

        return {
            "latent_mean": tensor(arrays["mean"][i]),
            "latent_std": tensor(arrays["std"][i]),
            "text_embedding": tensor(arrays["text"][caption_id]),
            "empty_text_embedding": tensor(arrays["text"][0]),
            "caption": self.captions[caption_id],
            "index": int(arrays["indices"][i]),
        }
