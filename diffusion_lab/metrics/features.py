"""Extracting features of image sets, and caching the reference set's on disk."""

import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_lab.metrics.protocol import as_rgb_uint8, prepare_for_extractor
from diffusion_lab.runs.atomic import write_file
from diffusion_lab.runs.signals import stop_if_requested

log = logging.getLogger(__name__)
# Bumped when stored features change meaning: 2 = `clean` resizes in float like clean-fid (1 rounded to uint8).
FEATURES_FORMAT = 2


@dataclass
class ImageFeatures:
    """Features (N, D) float64 of a set of images; logits (N, K) where the extractor classifies; and, for
    reference sets with captions, the captions (prompts for text-to-image samples)."""

    features: torch.Tensor
    logits: torch.Tensor | None = None
    captions: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.features)


@torch.no_grad()
def extract_features(
    extractor: torch.nn.Module,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, list[str] | None]],
    protocol: str,
    device: torch.device | str = "cpu",
    progress: bool = False,
    description: str = "features",
) -> ImageFeatures:
    """Run `extractor` over image batches (uint8 or [-1, 1] floats, any channel count), or over
    (images, captions) pairs; the extractor comes back to where it was."""
    home = next(extractor.parameters()).device
    extractor.to(device)
    features, logits, captions = [], [], []
    try:
        for batch in tqdm(batches, desc=description, unit="batch", disable=not progress, leave=False):
            stop_if_requested()
            images, batch_captions = batch if isinstance(batch, tuple) else (batch, None)
            images = prepare_for_extractor(
                as_rgb_uint8(images), protocol, getattr(extractor, "input_size", None)
            )
            output = extractor(images.to(device))
            output = output if isinstance(output, dict) else {"features": output}
            features.append(output["features"].double().cpu())
            if output.get("logits") is not None:
                logits.append(output["logits"].double().cpu())
            captions += list(batch_captions or [])
    finally:
        extractor.to(home)
    if not features:
        raise ValueError(f"{description}: no images")
    return ImageFeatures(torch.cat(features), torch.cat(logits) if logits else None, captions)


def cache_path(cache_dir: str | Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{digest}.pt"


def cached_features(
    cache_dir: str | Path | None, key: dict, compute: Callable[[], ImageFeatures]
) -> ImageFeatures:
    """Load the features stored under `key`, or compute and store them (written then renamed)."""
    if cache_dir is None:
        return compute()
    key = {**key, "format": FEATURES_FORMAT}
    path = cache_path(cache_dir, key)
    if path.exists():
        stored = torch.load(path, map_location="cpu", weights_only=False)
        if stored.get("key") == json.loads(json.dumps(key, default=str)):
            log.info("reference features: reusing %s (%d images)", path, len(stored["features"]))
            return ImageFeatures(stored["features"], stored["logits"], stored["captions"])
    result = compute()
    stored = {
        "key": json.loads(json.dumps(key, default=str)),
        "features": result.features,
        "logits": result.logits,
        "captions": result.captions,
    }
    write_file(path, lambda temporary: torch.save(stored, temporary))
    log.info("reference features: wrote %s (%d images)", path, len(result))
    return result
