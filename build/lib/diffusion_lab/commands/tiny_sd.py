"""`diffusion-lab tiny-sd out=DIR`: write a tiny random Stable Diffusion checkpoint folder."""

import json

from omegaconf import DictConfig

from diffusion_lab.tiny_sd import build_tiny_sd


def tiny_sd(cfg: DictConfig) -> None:
    path = build_tiny_sd(cfg.out, sample_size=cfg.sample_size, seed=cfg.seed)
    print(json.dumps({"tiny_sd": str(path)}))
