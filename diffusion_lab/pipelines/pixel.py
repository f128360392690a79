"""A pixel model as a diffusers pipeline folder: `DiffusionPipeline.from_pretrained(folder)` loads and runs it."""

import json
import shutil
from pathlib import Path

import torch
from diffusers import DDPMPipeline

from diffusion_lab.pipelines import class_conditional
from diffusion_lab.pipelines.class_conditional import ClassConditionalDDPMPipeline


def save_pixel_pipeline(net: torch.nn.Module, noise_scheduler, folder: str | Path) -> Path:
    """`DDPMPipeline` for an unconditional UNet. A class-conditional one gets `ClassConditionalDDPMPipeline`
    (`pipeline(class_labels=[...])`), whose code travels in the folder as `pipeline.py`: `DDPMPipeline.__call__`
    cannot pass labels, so an exported class-conditional model used to raise on its first call."""
    folder = Path(folder)
    if not net.config.num_class_embeds:
        DDPMPipeline(unet=net, scheduler=noise_scheduler).save_pretrained(folder)
        return folder
    ClassConditionalDDPMPipeline(unet=net, scheduler=noise_scheduler).save_pretrained(folder)
    shutil.copyfile(class_conditional.__file__, folder / "pipeline.py")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = ["pipeline", ClassConditionalDDPMPipeline.__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def is_class_conditional_export(folder: str | Path) -> bool:
    index = Path(folder) / "model_index.json"
    return index.is_file() and json.loads(index.read_text()).get("_class_name") == [
        "pipeline",
        ClassConditionalDDPMPipeline.__name__,
    ]


def load_class_conditional_export(folder: str | Path, dtype: torch.dtype | None = None):
    """This package's `ClassConditionalDDPMPipeline` over the folder's weights: the folder's own copy of the
    code (which diffusers runs only with `trust_remote_code=True`) is not executed."""
    import diffusers

    scheduler_config = diffusers.DDPMScheduler.load_config(Path(folder) / "scheduler")
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    unet = diffusers.UNet2DModel.from_pretrained(Path(folder) / "unet", torch_dtype=dtype)
    return ClassConditionalDDPMPipeline(unet=unet, scheduler=scheduler)
