"""Writing a model family's pipeline folder: from a live model or from a Lightning checkpoint."""

from collections.abc import Callable
from pathlib import Path

import torch

from diffusion_lab.families.checkpoints import load_checkpoint
from diffusion_lab.runs.atomic import write_folder
from diffusion_lab.runs.finite import require_finite_modules


def write_pipeline(
    out_dir: str | Path, networks: list[torch.nn.Module], save: Callable[[Path], object]
) -> Path:
    """`save(folder)` written then renamed to `out_dir`, after checking the `networks` it saves are finite:
    a diverged model is refused, not exported."""
    require_finite_modules(networks, f"to export {out_dir}")
    return write_folder(out_dir, save)


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True) -> dict:
    """Checkpoint -> its family's pipeline folder (DDPMPipeline, StableDiffusionPipeline, ... or LoRA weights)."""
    family, parts, details = load_checkpoint(ckpt_path, use_ema)
    path = write_pipeline(out_dir, [parts.net], lambda folder: family.save_pipeline(parts, folder))
    return {"pipeline": str(path), "family": family.name, "used_ema": details["used_ema"],
            "global_step": details["global_step"]}  # fmt: skip
