"""Writing diffusers pipeline folders, from a live model or from a Lightning checkpoint."""

import functools
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch

from diffusion_lab.atomic import write_folder
from diffusion_lab.finite import require_finite_modules
from diffusion_lab.models.serialization import is_pixel_checkpoint, rebuild_component, submodule_state_dict


def write_pipeline(
    out_dir: str | Path, networks: list[torch.nn.Module], save: Callable[[Path], object]
) -> Path:
    """`save(folder)` written then renamed to `out_dir`, after checking the `networks` it saves are finite:
    a diverged model is refused, not exported."""
    require_finite_modules(networks, f"to export {out_dir}")
    return write_folder(out_dir, save)


def export_pixel_pipeline(net: torch.nn.Module, noise_scheduler, out_dir: str | Path) -> Path:
    """`unet/ + scheduler/ + model_index.json` so `DiffusionPipeline.from_pretrained(out_dir)` works."""
    from diffusion_lab.pipelines.pixel import save_pixel_pipeline

    return write_pipeline(out_dir, [net], lambda folder: save_pixel_pipeline(net, noise_scheduler, folder))


def load_ema_weights(network: torch.nn.Module, ema_state: dict) -> None:
    """Copy an EMA callback's shadow weights into the trainable parameters they average."""
    trainable = [parameter for parameter in network.parameters() if parameter.requires_grad]
    with torch.no_grad():
        for parameter, averaged in zip(trainable, ema_state["shadow_params"], strict=True):
            parameter.copy_(averaged)


def load_checkpoint_components(ckpt_path: str | Path, use_ema: bool = True) -> dict:
    """Rebuild the diffusers components saved in a PixelDiffusion checkpoint, with EMA weights if present."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if not is_pixel_checkpoint(checkpoint):
        raise ValueError(f"{ckpt_path} describes no pixel network: not a PixelDiffusion checkpoint")
    descriptions = checkpoint["diffusers_components"]
    net = rebuild_component(descriptions["net"])
    net.load_state_dict(submodule_state_dict(checkpoint["state_dict"], "net"))
    ema_state = checkpoint.get("callbacks", {}).get("EMA")
    used_ema = bool(use_ema and ema_state)
    if used_ema:
        load_ema_weights(net, ema_state)
    return {
        "net": net.eval(),
        "noise_scheduler": rebuild_component(descriptions["noise_scheduler"]),
        "used_ema": used_ema,
        "global_step": checkpoint.get("global_step"),
    }


def load_latent_checkpoint(ckpt_path: str | Path, use_ema: bool = True) -> tuple[L.LightningModule, bool]:
    """A LatentDiffusion checkpoint: frozen parts from its `pretrained`, the UNet (or LoRA) from the file, and
    the objective its saved noise scheduler implies (a flow model samples and exports as one)."""
    from diffusion_lab.core.objectives import DDPM, objective_for
    from diffusion_lab.models import LatentDiffusion

    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)  # no second copy
    options = {}
    saved = checkpoint.get("diffusers_components", {}).get("noise_scheduler")
    if saved is not None:  # written since objectives exist
        trained = rebuild_component(saved)
        options["objective"] = lambda pretrained_scheduler: objective_for(trained)
    elif checkpoint.get("hyper_parameters", {}).get("zero_terminal_snr"):  # older: a DDPM switch of the model
        options["objective"] = functools.partial(DDPM, zero_terminal_snr=True)
    model = LatentDiffusion.load_from_checkpoint(
        ckpt_path, map_location="cpu", weights_only=False, optimizer=None, lr_scheduler=None, **options
    )
    ema_state = checkpoint.get("callbacks", {}).get("EMA")
    used_ema = bool(use_ema and ema_state)
    if used_ema:
        load_ema_weights(model.net, ema_state)
    return model.eval(), used_ema


def export_checkpoint(ckpt_path: str | Path, out_dir: str | Path, use_ema: bool = True) -> dict:
    """Checkpoint -> pipeline folder (DDPMPipeline, StableDiffusionPipeline or LoRA weights)."""
    checkpoint_kind = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=True)
    step = checkpoint_kind.get("global_step")
    if is_pixel_checkpoint(checkpoint_kind):
        components = load_checkpoint_components(ckpt_path, use_ema=use_ema)
        path = export_pixel_pipeline(components["net"], components["noise_scheduler"], out_dir)
        used_ema = components["used_ema"]
    elif "pretrained" in checkpoint_kind.get("hyper_parameters", {}):
        model, used_ema = load_latent_checkpoint(ckpt_path, use_ema=use_ema)
        path = write_pipeline(out_dir, [model.net], model.save_pipeline)
    else:
        raise ValueError(
            f"{ckpt_path} is not a diffusion_lab checkpoint (no diffusers parts, no 'pretrained')"
        )
    return {"pipeline": str(path), "used_ema": used_ema, "global_step": step}
