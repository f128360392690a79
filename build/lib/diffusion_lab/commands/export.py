"""`diffusion-lab export ckpt=PATH out=DIR`: a Lightning checkpoint as a diffusers pipeline folder."""

import json

from omegaconf import DictConfig

from diffusion_lab.export import export_checkpoint


def export(cfg: DictConfig) -> None:
    result = export_checkpoint(cfg.ckpt, cfg.out, use_ema=cfg.use_ema)
    print(json.dumps(result))
