"""A pixel model as a diffusers pipeline folder: `DiffusionPipeline.from_pretrained(folder)` loads and runs it."""

import json
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from diffusion_lab.pipelines import class_conditional
from diffusion_lab.pipelines.class_conditional import ClassConditionalDDPMPipeline
from diffusion_lab.pipelines.folders import save_with_code, saved_scheduler


def save_pixel_pipeline(net: torch.nn.Module, noise_scheduler, folder: str | Path) -> Path:
    """`DDPMPipeline` for an unconditional UNet. A class-conditional one gets `ClassConditionalDDPMPipeline`
    (`pipeline(class_labels=[...])`), whose code travels in the folder as `pipeline.py`: `DDPMPipeline.__call__`
    cannot pass labels, so an exported class-conditional model used to raise on its first call."""
    folder = Path(folder)
    if not net.config.num_class_embeds:
        DDPMPipeline(unet=net, scheduler=noise_scheduler).save_pretrained(folder)
        return folder
    return save_with_code(
        ClassConditionalDDPMPipeline(unet=net, scheduler=noise_scheduler), class_conditional, folder
    )


def is_class_conditional_export(folder: str | Path) -> bool:
    index = Path(folder) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == [
        "pipeline",
        ClassConditionalDDPMPipeline.__name__,
    ]


def load_class_conditional_export(folder: str | Path, dtype: torch.dtype | None = None):
    """This package's `ClassConditionalDDPMPipeline` over the folder's weights: the folder's own copy of the
    code (which diffusers runs only with `trust_remote_code=True`) is not executed."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(Path(folder) / "unet", torch_dtype=dtype)
    return ClassConditionalDDPMPipeline(unet=unet, scheduler=saved_scheduler(folder))
