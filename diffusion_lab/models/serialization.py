"""Describe diffusers components in a checkpoint, and rebuild them from that description."""

import diffusers
import torch

from diffusion_lab.core.schedulers import explicit_config


def describe_components(**components) -> dict:
    """{name: {"class": diffusers class name, "config": its init config}} for diffusers models/schedulers."""
    return {
        name: {"class": type(component).__name__, "config": explicit_config(component.config)}
        for name, component in components.items()
    }


def rebuild_component(description: dict):
    """Instantiate a described component with fresh weights (load the state dict afterwards)."""
    component_class = getattr(diffusers, description["class"])
    # explicit_config: a value diffusers once listed as a default (SD 1.5's prediction_type) stays as saved.
    return component_class.from_config(explicit_config(description["config"]))


def is_pixel_checkpoint(checkpoint: dict) -> bool:
    """A PixelDiffusion checkpoint describes its network; a LatentDiffusion one only its noise scheduler."""
    return "net" in checkpoint.get("diffusers_components", {})


def current_key(key: str) -> str:
    """A checkpoint key under today's names: latent checkpoints written before the trainable network was
    called `net` named it `unet`."""
    return "net." + key[len("unet.") :] if key.startswith("unet.") else key


def submodule_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a LightningModule state dict that belong to `prefix` (e.g. 'net'), prefix removed."""
    start = prefix + "."
    return {key[len(start) :]: value for key, value in state_dict.items() if key.startswith(start)}
