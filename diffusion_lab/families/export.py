"""Writing a model family's pipeline folder: from a live model or from a Lightning checkpoint."""

from collections.abc import Callable
from pathlib import Path

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.families.checkpoints import load_checkpoint
from diffusion_lab.families.lora import KOHYA_FILE
from diffusion_lab.runs.atomic import write_folder
from diffusion_lab.runs.finite import require_finite_modules


def write_pipeline(
    out_dir: str | Path, networks: list[torch.nn.Module], save: Callable[[Path], object]
) -> Path:
    """`save(folder)` written then renamed to `out_dir`, after checking the `networks` it saves are finite:
    a diverged model is refused, not exported."""
    require_finite_modules(networks, f"to export {out_dir}")
    return write_folder(out_dir, save)


FORMATS = ("diffusers", "kohya")


def export_checkpoint(
    ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True, format: str = "diffusers"
) -> dict:
    """Checkpoint -> its family's pipeline folder (DDPMPipeline, StableDiffusionPipeline, ... or LoRA weights).
    `format=kohya` (a LoRA) adds the single-file kohya format beside the diffusers one (`lora_kohya.safetensors`)."""
    if format not in FORMATS:
        raise ConfigError(f"format={format!r}; choose one of {', '.join(FORMATS)}")
    family, parts, details = load_checkpoint(ckpt_path, use_ema)
    if format == "kohya" and not parts.has_lora:
        raise ConfigError(f"format=kohya writes LoRA adapters; {ckpt_path} is a full {family.name} fine-tune")

    def save(folder: Path) -> None:
        family.save_pipeline(parts, folder)
        if format == "kohya":
            family.save_kohya(parts, folder)

    path = write_pipeline(out_dir, [parts.net], save)
    result = {"pipeline": str(path), "family": family.name, "used_ema": details["used_ema"],
              "global_step": details["global_step"]}  # fmt: skip
    if format == "kohya":
        result["kohya"] = str(path / KOHYA_FILE)
    return result
