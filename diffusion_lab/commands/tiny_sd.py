"""`diffusion-lab tiny-sd out_dir=DIR [variant=sdxl]`: write a tiny random Stable Diffusion (or SDXL) folder."""

import json

from omegaconf import DictConfig

from diffusion_lab.families import family_named


def tiny_sd(cfg: DictConfig) -> None:
    variant = cfg.get("variant", "sd")
    path = family_named(variant).build_tiny(cfg.out_dir, sample_size=cfg.sample_size, seed=cfg.seed)
    print(json.dumps({"tiny_sd": str(path), "variant": variant}))
