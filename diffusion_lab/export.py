"""Writing diffusers pipeline folders, from a live model or from a Lightning checkpoint."""

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from diffusion_lab.models.serialization import rebuild_component, submodule_state_dict


def save_ddpm_pipeline(net: torch.nn.Module, noise_scheduler, out_dir: str | Path) -> Path:
    """Save `unet/ + scheduler/ + model_index.json` so `DiffusionPipeline.from_pretrained(out_dir)` works.

    Written into a sibling temporary folder and renamed into place: an interrupted export never leaves a
    half-written pipeline where a complete one was.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    DDPMPipeline(unet=net, scheduler=noise_scheduler).save_pretrained(staging)
    if out_dir.exists():
        previous = out_dir.with_name(f".{out_dir.name}.old")
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(out_dir, previous)
        os.replace(staging, out_dir)
        shutil.rmtree(previous)
    else:
        os.replace(staging, out_dir)
    return out_dir


def load_checkpoint_components(ckpt_path: str | Path, use_ema: bool = True) -> dict:
    """Rebuild the diffusers components saved in a PixelDiffusion checkpoint, with EMA weights if present."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    descriptions = checkpoint.get("diffusers_components")
    if descriptions is None:
        raise ValueError(f"{ckpt_path} has no 'diffusers_components': not a diffusion_lab checkpoint")
    net = rebuild_component(descriptions["net"])
    net.load_state_dict(submodule_state_dict(checkpoint["state_dict"], "net"))
    ema_state = checkpoint.get("callbacks", {}).get("EMA")
    used_ema = bool(use_ema and ema_state)
    if used_ema:
        with torch.no_grad():
            for parameter, averaged in zip(net.parameters(), ema_state["shadow_params"], strict=True):
                parameter.copy_(averaged)
    return {
        "net": net.eval(),
        "noise_scheduler": rebuild_component(descriptions["noise_scheduler"]),
        "used_ema": used_ema,
        "global_step": checkpoint.get("global_step"),
    }


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True) -> dict:
    """Checkpoint -> DDPMPipeline folder. Returns what was written and whether EMA weights were used."""
    components = load_checkpoint_components(ckpt_path, use_ema=use_ema)
    path = save_ddpm_pipeline(components["net"], components["noise_scheduler"], out_dir)
    return {
        "pipeline": str(path),
        "used_ema": components["used_ema"],
        "global_step": components["global_step"],
    }
