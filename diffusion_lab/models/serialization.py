"""Describe diffusers components in a checkpoint, and rebuild them from that description."""

import diffusers
import torch


def describe_components(**components) -> dict:
    """{name: {"class": diffusers class name, "config": its init config}} for diffusers models/schedulers."""
    return {
        name: {"class": type(component).__name__, "config": dict(component.config)}
        for name, component in components.items()
    }


def rebuild_component(description: dict):
    """Instantiate a described component with fresh weights (load the state dict afterwards)."""
    component_class = getattr(diffusers, description["class"])
    return component_class.from_config(description["config"])


def current_key(key: str) -> str:
    """A checkpoint key under today's names: latent checkpoints written before the trainable network was
    called `net` named it `unet`."""
    return "net." + key[len("unet.") :] if key.startswith("unet.") else key


def submodule_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a LightningModule state dict that belong to `prefix` (e.g. 'net'), prefix removed."""
    start = prefix + "."
    return {key[len(start) :]: value for key, value in state_dict.items() if key.startswith(start)}
