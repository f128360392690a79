"""Lightning checkpoints read without Lightning: described diffusers components, trained and EMA weights."""

import zipfile
from pathlib import Path

import diffusers
import torch

from diffusion_lab.compat.diffusers import explicit_config
from diffusion_lab.errors import ConfigError
from diffusion_lab.families.base import Family, ModelParts
from diffusion_lab.families.registry import family_of_checkpoint
from diffusion_lab.runs.checksums import verify_checkpoint


def describe_components(**components) -> dict:
    """{name: {"class": diffusers class name, "config": its init config}} for diffusers models/schedulers."""
    return {
        name: {"class": type(component).__name__, "config": explicit_config(component.config)}
        for name, component in components.items()
    }


def network_class(name: str) -> type:
    """A diffusers model or scheduler class by name, or one of this package's networks (`DiffusionTransformer`)."""
    from diffusion_lab import networks

    found = getattr(diffusers, name, None) or getattr(networks, name, None)
    if found is None:
        raise ConfigError(
            f"the checkpoint names a component class {name!r} that neither diffusers nor diffusion_lab has"
        )
    return found


def rebuild_component(description: dict):
    """Instantiate a described component with fresh weights (load the state dict afterwards)."""
    component_class = network_class(description["class"])
    # explicit_config: a value diffusers once listed as a default (SD 1.5's prediction_type) stays as saved.
    return component_class.from_config(explicit_config(description["config"]))


def current_key(key: str) -> str:
    """A checkpoint key under today's names: latent checkpoints written before the trainable network was
    called `net` named it `unet`."""
    return "net." + key[len("unet.") :] if key.startswith("unet.") else key


def net_state_dict(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The checkpoint's `net.*` tensors, prefix removed."""
    start = "net."
    state = {current_key(key): value for key, value in checkpoint["state_dict"].items()}
    return {key[len(start) :]: value for key, value in state.items() if key.startswith(start)}


def load_trained_weights(net: torch.nn.Module, checkpoint: dict) -> None:
    """The network's weights from the checkpoint; a slim checkpoint holds only the trainable ones (frozen
    weights stay as loaded from the base model), but every tensor it holds must find its place."""
    missing, unexpected = net.load_state_dict(net_state_dict(checkpoint), strict=False)
    trainable = {name for name, parameter in net.named_parameters() if parameter.requires_grad}
    if unexpected or trainable & set(missing):
        raise ConfigError(
            f"the checkpoint's network does not fit its family's architecture: unexpected {unexpected[:3]}, "
            f"missing {sorted(trainable & set(missing))[:3]}"
        )


def load_ema_weights(network: torch.nn.Module, ema_state: dict) -> None:
    """Copy an EMA callback's shadow weights into the trainable parameters they average."""
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    with torch.no_grad():
        for parameter, averaged in zip(trainable, ema_state["shadow_params"], strict=True):
            parameter.copy_(averaged)


def trained_scheduler(checkpoint: dict):
    """The objective's noise scheduler the checkpoint was trained with (a flow model's is flow-match)."""
    saved = checkpoint.get("diffusers_components", {}).get("noise_scheduler")
    return None if saved is None else rebuild_component(saved)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint as a dict, memory-mapped (no second copy of its tensors)."""
    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):
        raise ConfigError(f"ckpt_path={path}: not a Lightning checkpoint (not a torch.save archive)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as error:
        raise ConfigError(f"ckpt_path={path}: not a readable Lightning checkpoint ({error})") from None
    verify_checkpoint(checkpoint, f"ckpt_path={path}")
    return checkpoint


def load_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[Family, ModelParts, dict]:
    """(family, parts in eval mode, details) of a Lightning checkpoint: the EMA weights when `use_ema` and the
    checkpoint has them."""
    checkpoint = read_checkpoint(path)
    family = family_of_checkpoint(checkpoint, where=f"ckpt_path={path}")
    parts = family.parts_from_checkpoint(checkpoint)
    ema_state = checkpoint.get("callbacks", {}).get("EMA")
    used_ema = bool(use_ema and ema_state)
    if used_ema:
        load_ema_weights(parts.net, ema_state)
    parts.net.eval()
    details = {"source": "lightning_checkpoint", "family": family.name,
               "global_step": checkpoint.get("global_step"), "used_ema": used_ema}  # fmt: skip
    return family, parts, details
