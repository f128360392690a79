"""The latent transformer family: a DiT / SiT trained from scratch on a frozen VAE's latents (`models.LatentDiT`),
exported as a stock diffusers `DiTPipeline` folder."""

from pathlib import Path

from diffusers import DiTPipeline

from diffusion_lab.core.schedulers import flow_settings, scheduler_from_name
from diffusion_lab.errors import ConfigError
from diffusion_lab.families.base import Family, ModelParts
from diffusion_lab.families.dit import PixelTransformer
from diffusion_lab.families.registry import register
from diffusion_lab.families.sd_parts import load_vae
from diffusion_lab.generation.samplers import LatentClassSampler
from diffusion_lab.networks.dit import from_stock, to_stock


@register
class LatentTransformer(PixelTransformer):
    """The pixel DiT's conditioning on the VAE's scaled latents (a class-conditional net also gets the batch's
    `label`; an unconditional one has one class, 0, in the stock pipeline).

    The export is stock `DiTPipeline` (`pipeline(class_labels=[...], guidance_scale=1)`). Its classifier-free
    guidance hard-codes ImageNet's null class (1000), so guidance > 1 runs only for a 1000-class model. It runs
    its scheduler's `scale_model_input`, which flow-match Euler lacks: a flow (SiT) model is exported with UniPC
    on the same flow sigmas (the flow default of `sample`), a DDPM (DiT) one with its training scheduler."""

    name = "dit_latent"
    grid = "image"
    pipeline_classes = ("DiTPipeline",)
    tiny_overrides = ("experiment=dit_latent_tiny",)

    def owns_network(self, net) -> bool:
        return False  # the same network as `dit`'s: models.LatentDiT names its family itself

    def load_pipeline(self, name_or_path: str, **kwargs):
        return Family.load_pipeline(
            self, name_or_path, **kwargs
        )  # stock diffusers: not the pixel DiT's loader

    def parts_from_checkpoint(self, checkpoint: dict) -> ModelParts:
        parts = super().parts_from_checkpoint(checkpoint)  # the network and its scheduler, as the pixel DiT's
        vae = load_vae(checkpoint["vae"])  # named by the checkpoint, not copied into it
        return ModelParts(parts.net, parts.noise_scheduler, {"vae": vae}, {"vae": checkpoint["vae"]})

    def parts_from_pipeline(self, pipeline) -> ModelParts:
        config = pipeline.transformer.config
        if config.out_channels not in (None, config.in_channels):
            raise ConfigError(
                f"this DiTPipeline's transformer predicts {config.out_channels} channels for {config.in_channels} "
                "(a learned variance, as facebook/DiT-XL-2-256): diffusion_lab samples noise or velocity "
                "predictions only; call the pipeline itself"
            )
        return ModelParts(from_stock(pipeline.transformer), pipeline.scheduler, {"vae": pipeline.vae})

    def sampler(self, parts: ModelParts) -> LatentClassSampler:
        return LatentClassSampler(parts.net, parts.noise_scheduler, parts.frozen["vae"])

    def save_pipeline(self, parts: ModelParts, folder: Path) -> Path:
        scheduler = parts.noise_scheduler
        if flow_settings(scheduler.config) is not None:
            scheduler = scheduler_from_name("unipc", scheduler.config)
        DiTPipeline(
            transformer=to_stock(parts.net), vae=parts.frozen["vae"], scheduler=scheduler
        ).save_pretrained(folder)
        return Path(folder)
