"""The pixel family: a `UNet2DModel` (unconditional or class-conditional) on pixels in [-1, 1]."""

from pathlib import Path

from diffusers import UNet2DModel

from diffusion_lab.families.base import Family, ModelParts
from diffusion_lab.families.checkpoints import load_trained_weights, rebuild_component
from diffusion_lab.families.registry import register
from diffusion_lab.generation.samplers import PixelSampler
from diffusion_lab.pipelines.pixel import (
    ClassConditionalDDPMPipeline,
    is_class_conditional_export,
    load_class_conditional_export,
    save_pixel_pipeline,
)


@register
class Pixel(Family):
    """Pixels pass to the network unchanged; a class-conditional net also gets the batch's `label`. Exports are
    a `DDPMPipeline` folder, or a `ClassConditionalDDPMPipeline` one (its code in the folder)."""

    name = "pixel"
    grid = "image"
    pipeline_classes = ("DDPMPipeline", ClassConditionalDDPMPipeline.__name__)
    tiny_overrides = ("debug=fast", "data.image_size=8")

    def owns_network(self, net) -> bool:
        return isinstance(net, UNet2DModel)

    def owns_legacy_checkpoint(self, checkpoint: dict) -> bool:
        return "net" in checkpoint.get("diffusers_components", {})

    def parts_from_checkpoint(self, checkpoint: dict) -> ModelParts:
        descriptions = checkpoint["diffusers_components"]
        net = rebuild_component(descriptions["net"])
        load_trained_weights(net, checkpoint)
        return ModelParts(net, rebuild_component(descriptions["noise_scheduler"]))

    def load_pipeline(self, name_or_path: str, **kwargs):
        if Path(name_or_path).is_dir() and is_class_conditional_export(name_or_path):
            # this package's class over the folder's weights: the folder's own copy of the code is not run
            return load_class_conditional_export(name_or_path, kwargs.get("torch_dtype"))
        return super().load_pipeline(name_or_path, **kwargs)

    def conditioning(self, batch: dict, net) -> dict:
        """The network's keyword arguments besides (x_t, t): the class labels of a class-conditional net."""
        return {"class_labels": batch["label"]} if net.config.num_class_embeds else {}

    def parts_from_pipeline(self, pipeline) -> ModelParts:
        return ModelParts(pipeline.unet, pipeline.scheduler)

    def sampler(self, parts: ModelParts) -> PixelSampler:
        return PixelSampler(parts.net, parts.noise_scheduler)

    def save_pipeline(self, parts: ModelParts, folder: Path) -> Path:
        return save_pixel_pipeline(parts.net, parts.noise_scheduler, folder)
