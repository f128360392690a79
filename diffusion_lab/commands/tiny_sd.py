"""`diffusion-lab tiny-sd out_dir=DIR [variant=sdxl]`: write a tiny random Stable Diffusion (or SDXL) folder."""

import json

from omegaconf import DictConfig

from diffusion_lab.errors import ConfigError
from diffusion_lab.tiny_sd import BUILDERS


def tiny_sd(cfg: DictConfig) -> None:
    variant = cfg.get("variant", "sd")
    if variant not in BUILDERS:
        raise ConfigError(f"variant={variant!r}; valid: {', '.join(BUILDERS)}")
    path = BUILDERS[variant](cfg.out_dir, sample_size=cfg.sample_size, seed=cfg.seed)
    print(json.dumps({"tiny_sd": str(path), "variant": variant}))
