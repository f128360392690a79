"""What a DataModule's images are, as opposed to how they are loaded: the key of caches built from them."""

import hashlib
import os

# Loader settings: they change the speed of reading, not what is read.
NOT_CONTENT = {
    "batch_size",
    "num_workers",
    "shuffle_buffer",
    "pixel_cache",
    "pixel_cache_max_gb",
    "cache_dir",
}


# Settings added after caches were first keyed: left out at their defaults, so existing caches keep their keys.
ADDED_LATER = {"mask_dir": None, "alpha_mask": False}


def data_identity(datamodule) -> dict:
    """Class and content hyperparameters (path, resolution, crop, captions, split sizes, seed)."""
    content = {
        key: value
        for key, value in dict(datamodule.hparams).items()
        if key not in NOT_CONTENT and not (key in ADDED_LATER and value == ADDED_LATER[key])
    }
    return {"class": type(datamodule).__qualname__, **content}


def folder_listing(folder: str) -> str:
    """A digest of a folder's files: each name, size and modification time."""
    entries = sorted(
        f"{entry.name}:{entry.stat().st_size}:{entry.stat().st_mtime_ns}"
        for entry in os.scandir(os.path.expanduser(folder))
        if entry.is_file()
    )
    return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16]
