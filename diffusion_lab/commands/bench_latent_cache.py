"""`diffusion-lab bench latent_cache`: training images/s with and without the latent cache, same run."""

import functools
import json
import tempfile

import torch
from omegaconf import DictConfig
from torch.utils.data import default_collate

from diffusion_lab.benchmarks.latent_cache import (
    build_cache_images_per_second,
    digits,
    images_per_second,
    to_device,
)
from diffusion_lab.data import LatentCacheDataModule
from diffusion_lab.models import LatentDiffusion
from diffusion_lab.tiny_sd import ensure_tiny_sd


def bench_latent_cache(cfg: DictConfig) -> dict:
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
        cache = LatentCacheDataModule(images, pretrained, cache_dir, encode_batch_size=cfg.batch_size)
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
