"""What `pretrained=` may name, loaded as a sampler: a Lightning checkpoint, a pipeline folder or a hub id."""

from pathlib import Path

import torch

from diffusion_lab.finite import require_finite_modules
from diffusion_lab.generation.samplers import PixelSampler, Sampler, TextToImageSampler
from diffusion_lab.models.serialization import is_pixel_checkpoint
from diffusion_lab.pipelines.pixel import is_class_conditional_export, load_class_conditional_export


def sampler_for_module(pl_module) -> Sampler:
    """A sampler over a live LightningModule's own networks (no copies): what training callbacks use."""
    if callable(getattr(pl_module, "pipeline", None)):
        return TextToImageSampler(pl_module.pipeline())
    return PixelSampler(pl_module.net, pl_module.noise_scheduler)


def _from_checkpoint(path: Path, use_ema: bool) -> tuple[Sampler, dict]:
    from diffusion_lab.export import load_checkpoint_components, load_latent_checkpoint

    header = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    details = {"source": "lightning_checkpoint", "global_step": header.get("global_step")}
    if is_pixel_checkpoint(header):
        components = load_checkpoint_components(path, use_ema=use_ema)
        sampler = PixelSampler(components["net"], components["noise_scheduler"])
        return sampler, {**details, "used_ema": components["used_ema"]}
    if "pretrained" in header.get("hyper_parameters", {}):
        model, used_ema = load_latent_checkpoint(path, use_ema=use_ema)
        return TextToImageSampler(model.pipeline()), {**details, "used_ema": used_ema}
    raise ValueError(f"{path} is not a diffusion_lab checkpoint (no diffusers parts, no 'pretrained')")


def _from_pipeline(
    name_or_path: str, revision: str | None, lora: str | None, dtype: torch.dtype | None
) -> tuple[Sampler, dict]:
    from diffusers import DiffusionPipeline

    kwargs = {"revision": revision} if revision else {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    local = Path(name_or_path).is_dir()
    if local and is_class_conditional_export(name_or_path):  # our class, not the folder's copy of its code
        pipeline = load_class_conditional_export(name_or_path, dtype)
    else:
        pipeline = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    source = "pipeline_folder" if local else "hub"
    details = {"source": source, "pipeline_class": type(pipeline).__name__}
    if lora:
        from diffusion_lab.models.lora import lora_scheduler  # peft: imported only when a LoRA is asked for

        pipeline.load_lora_weights(lora)
        trained_for = lora_scheduler(lora)  # e.g. a v-prediction adapter on an epsilon base
        if trained_for is not None:
            pipeline.scheduler = trained_for
            details["scheduler_from"] = str(lora)
    if getattr(pipeline, "text_encoder", None) is not None:
        return TextToImageSampler(pipeline), details
    if lora:
        raise ValueError("lora= applies to text-to-image pipelines; this one has no text encoder")
    return PixelSampler(pipeline.unet, pipeline.scheduler), details


def load_sampler(
    pretrained: str,
    use_ema: bool = True,
    revision: str | None = None,
    lora: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Sampler, dict]:
    """(sampler on the CPU, details of what was loaded). A `.ckpt` file loads with its EMA weights when
    `use_ema` and it has them; anything else goes to `DiffusionPipeline.from_pretrained` (folder or hub id).
    `lora` names LoRA weights (a folder `diffusion-lab export` wrote for a LoRA run) to load on top."""
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        if lora:
            raise ValueError("lora= is for pipelines; a LoRA run's checkpoint already carries its adapters")
        sampler, details = _from_checkpoint(path, use_ema)
        if dtype is not None:
            sampler.to("cpu", dtype)
        return _finite(sampler, pretrained), details
    if not path.exists() and (str(pretrained).startswith((".", "/", "~")) or str(pretrained).count("/") > 1):
        raise FileNotFoundError(f"pretrained={pretrained}: no such checkpoint file or pipeline folder")
    sampler, details = _from_pipeline(str(path) if path.exists() else str(pretrained), revision, lora, dtype)
    return _finite(sampler, pretrained), details


def _finite(sampler: Sampler, pretrained: str) -> Sampler:
    """A diverged model would sample black images and exit 0: refuse it."""
    require_finite_modules([sampler.net], f"to sample from {pretrained}")
    return sampler
