"""A disk cache of a frozen encoder's patch tokens for each training image and orientation: REPA's targets
(`models.repa.RepresentationAlignment`), so a run over local data encodes each image once, not once a step.

One folder per key, named like the latent cache's (a hash of the encoder, the data's identity and file listing,
the orientations and the storage dtype): `features.bin` (rows (F, N, D), F = 2 when training flips at random:
both orientations are encoded), `indices.npy` (the source example index of each row) and `meta.json`. Written to
a temporary folder and renamed, so a killed build leaves no cache that looks complete.
"""

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_lab.data.latent_cache import storage_dtype
from diffusion_lab.data.transforms import to_signed_unit
from diffusion_lab.runs.atomic import write_folder

CACHE_FORMAT = 1


def feature_cache_folder(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / digest


@torch.no_grad()
def write_feature_cache(
    out_dir: Path,
    batches: Iterable[dict],
    encode: Callable[[torch.Tensor], torch.Tensor],
    *,
    flips: bool,
    key: dict,
    device: torch.device,
    dtype: str = "float32",
) -> Path:
    """`encode` (images in [-1, 1] -> (B, N, D) tokens) over every batch (uint8 `pixels`, `index`), each image
    as stored and, with `flips`, mirrored."""
    stored = storage_dtype(dtype)

    def write(folder: Path) -> None:
        indices, shape = [], None
        with open(folder / "features.bin", "wb") as rows:
            for batch in tqdm(batches, desc="Caching encoder features", unit="batch"):
                pixels = to_signed_unit(batch["pixels"].to(device))
                views = [pixels, pixels.flip(-1)] if flips else [pixels]
                features = torch.stack([encode(view) for view in views], dim=1).float().cpu().numpy()
                if not np.isfinite(features).all():
                    raise ValueError("the encoder gave non-finite features: REPA would align to NaN")
                rows.write(features.astype(stored).tobytes())
                shape = list(features.shape[1:])
                indices += torch.as_tensor(batch["index"]).tolist()
        if not indices:
            raise ValueError("caching encoder features: the data yielded no examples")
        np.save(folder / "indices.npy", np.asarray(indices, dtype=np.int64))
        meta = {"count": len(indices), "shape": shape, "dtype": dtype, "key": key}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=str))

    return write_folder(out_dir, write)


class CachedFeatures:
    """Reads a feature cache through a memory map: the rows of a batch's images in the orientations it has."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        self.features = np.memmap(folder / "features.bin", dtype=storage_dtype(meta["dtype"]), mode="r",
                                  shape=(meta["count"], *meta["shape"]))  # fmt: skip
        self.row_of = {int(index): row for row, index in enumerate(np.load(folder / "indices.npy"))}
        self.orientations = meta["shape"][0]

    def __call__(
        self, index: torch.Tensor, flipped: torch.Tensor | None, device: torch.device
    ) -> torch.Tensor:
        """(B, N, D) tokens of the images `index`, mirrored where `flipped`."""
        try:
            rows = [self.row_of[int(i)] for i in index.tolist()]
        except KeyError as missing:
            raise KeyError(
                f"example {missing} is not in the encoder-feature cache (built from another split?)"
            ) from None
        orientation = (
            flipped.long().cpu().numpy() if flipped is not None else np.zeros(len(rows), dtype=np.int64)
        )
        if orientation.max(initial=0) >= self.orientations:
            raise ValueError("a flipped image, but the encoder-feature cache holds one orientation")
        return torch.from_numpy(np.asarray(self.features[rows, orientation], dtype=np.float32)).to(device)
