"""The transformer family: a DiT / SiT (`networks.dit.DiffusionTransformer`) on pixels in [-1, 1]."""

import json
from pathlib import Path

import torch

from diffusion_lab.families.base import Family, ModelParts
from diffusion_lab.families.checkpoints import load_trained_weights, network_class, rebuild_component
from diffusion_lab.families.registry import register
from diffusion_lab.generation.samplers import PixelSampler
from diffusion_lab.networks.dit import DiffusionTransformer, from_stock, to_stock
from diffusion_lab.pipelines import transformer_pixel
from diffusion_lab.pipelines.folders import save_with_code, saved_scheduler
from diffusion_lab.pipelines.transformer_pixel import PixelTransformerPipeline


@register
class PixelTransformer(Family):
    """Pixels pass to the network unchanged; a class-conditional net also gets the batch's `label`. Exports are
    a `PixelTransformerPipeline` folder (its code in the folder) over a stock `DiTTransformer2DModel`."""

    name = "dit"
    grid = "image"
    pipeline_classes = (PixelTransformerPipeline.__name__,)
    tiny_overrides = ("debug=fast", "data.image_size=8", "model/net=dit", "model.net.size=tiny")

    def owns_network(self, net: torch.nn.Module) -> bool:
        return isinstance(net, DiffusionTransformer)

    def parts_from_checkpoint(self, checkpoint: dict) -> ModelParts:
        descriptions = checkpoint["diffusers_components"]
        net = rebuild_component(descriptions["net"])
        load_trained_weights(net, checkpoint)
        return ModelParts(net, rebuild_component(descriptions["noise_scheduler"]))

    def conditioning(self, batch: dict, net) -> dict:
        return {"class_labels": batch["label"]} if net.config.num_class_embeds else {}

    def load_pipeline(self, name_or_path: str, **kwargs):
        """This package's pipeline class over the folder's weights: the folder's own copy of its code is not run."""
        folder = Path(name_or_path)
        saved = json.loads((folder / "transformer" / "config.json").read_text())["_class_name"]
        transformer = network_class(saved).from_pretrained(
            folder / "transformer", torch_dtype=kwargs.get("torch_dtype")
        )  # the stock DiT, or this package's for learned position embeddings
        return PixelTransformerPipeline(transformer=transformer, scheduler=saved_scheduler(folder))

    def parts_from_pipeline(self, pipeline) -> ModelParts:
        return ModelParts(from_stock(pipeline.transformer), pipeline.scheduler)

    def sampler(self, parts: ModelParts) -> PixelSampler:
        return PixelSampler(parts.net, parts.noise_scheduler)

    def save_pipeline(self, parts: ModelParts, folder: Path) -> Path:
        pipeline = PixelTransformerPipeline(transformer=to_stock(parts.net), scheduler=parts.noise_scheduler)
        return save_with_code(pipeline, transformer_pixel, folder)
