"""Latent diffusion training steps/s fed by images (VAE + text encoder every step) vs by the latent cache."""

import time
from collections.abc import Callable

import torch
from torch.utils.data import default_collate

from diffusion_lab.data import DigitsDataModule, LatentCacheDataModule
from diffusion_lab.models import LatentDiffusion


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(
    model: LatentDiffusion, batch: dict, optimizer: torch.optim.Optimizer, steps: int, warmup: int
) -> float:
    """Full optimizer steps (encode if uncached, UNet forward and backward, AdamW) on one resident batch."""
    device = model.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step in range(warmup + steps):
        if step == warmup:
            _synchronize(device)
            start = time.perf_counter()
        with autocast:
            loss = model.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _synchronize(device)
    return steps * len(batch["index"]) / (time.perf_counter() - start)


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def build_cache_images_per_second(
    data: LatentCacheDataModule, device: torch.device
) -> tuple[float, Callable[[int], dict]]:
    """Build the cache (timed: the one-off cost) and return a batch maker reading it."""
    data.trainer = None
    _synchronize(device)
    start = time.perf_counter()
    data.prepare_data()
    _synchronize(device)
    elapsed = time.perf_counter() - start
    data.setup("fit")
    count = len(data.train_set) + len(data.val_set)

    def batch(size: int) -> dict:
        items = default_collate([data.train_set[i] for i in range(size)])
        return data.on_after_batch_transfer(to_device(items, device), 0)

    return count / elapsed, batch


def digits(image_size: int, batch_size: int) -> DigitsDataModule:
    return DigitsDataModule(
        image_size=image_size,
        channels=3,
        batch_size=batch_size,
        caption_template="a handwritten digit {label}",
    )
