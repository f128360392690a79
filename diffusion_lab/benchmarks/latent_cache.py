"""Latent diffusion training steps/s fed by images (VAE + text encoder every step) vs by the latent cache."""

import functools
import json
import tempfile
import time
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.utils.data import default_collate

from diffusion_lab.data import DigitsDataModule, LatentCacheDataModule
from diffusion_lab.families import LatentEncoder
from diffusion_lab.families.tiny import ensure_tiny_sd
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


def bench_latent_cache(cfg: DictConfig) -> dict:
    """`diffusion-lab bench latent_cache`: training images/s with and without the latent cache, same run."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(cfg.device)
    pretrained = cfg.pretrained or ensure_tiny_sd(f"{cfg.cache_dir}/tiny-sd-32")
    model = LatentDiffusion(
        pretrained, optimizer=functools.partial(torch.optim.AdamW), lr=1e-5,
        gradient_checkpointing=cfg.gradient_checkpointing,
    ).to(device)  # fmt: skip
    model.log = lambda *args, **kwargs: None  # no Trainer here: both sides run the same training_step
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=1e-5)
    images = digits(cfg.image_size, cfg.batch_size)
    images.setup("fit")
    uncached = to_device(default_collate([images.train_set[i] for i in range(cfg.batch_size)]), device)
    with tempfile.TemporaryDirectory() as cache_dir:  # a fresh cache: its build is timed too
        cache = LatentCacheDataModule(
            images, LatentEncoder(pretrained), cache_dir, encode_batch_size=cfg.batch_size
        )
        build_img_s, cached_batch = build_cache_images_per_second(cache, device)
        cached = cached_batch(cfg.batch_size)
        best = {"uncached": 0.0, "cached": 0.0}
        for _ in range(cfg.repeats):  # alternate; keep each side's best
            for side, batch in (("uncached", uncached), ("cached", cached)):
                speed = images_per_second(model, batch, optimizer, cfg.steps, cfg.warmup_steps)
                best[side] = max(best[side], speed)
    result = {
        "pretrained": str(pretrained),
        "device": str(device),
        "image_size": cfg.image_size,
        "batch_size": cfg.batch_size,
        "uncached_img_s": round(best["uncached"], 2),
        "cached_img_s": round(best["cached"], 2),
        "cached_vs_uncached": round(best["cached"] / best["uncached"], 3),
        "cache_build_img_s": round(build_img_s, 2),
    }
    print(json.dumps(result))
    return result
