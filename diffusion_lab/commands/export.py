"""`diffusion-lab export ckpt_path=FILE out_dir=DIR`: a Lightning checkpoint as a diffusers pipeline folder."""

import json

from omegaconf import DictConfig

from diffusion_lab.families.export import export_checkpoint


def export(cfg: DictConfig) -> None:
    result = export_checkpoint(cfg.ckpt_path, cfg.out_dir, use_ema=cfg.use_ema, format=cfg.format)
    print(json.dumps(result))
