"""LoRA adapters on the UNet's attention (peft), saved in the diffusers LoRA format."""

from collections.abc import Sequence
from pathlib import Path

from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(
    unet: UNet2DConditionModel,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
) -> None:
    """Freeze the UNet and add trainable low-rank adapters (Hu et al. 2021, arXiv:2106.09685) to the
    named projections; only those train. alpha / rank scales the update (alpha defaults to rank: 1.0)."""
    if rank < 1:
        raise ValueError(f"model.lora_rank must be a positive integer, got {rank}")
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights="gaussian",
            target_modules=list(target_modules),
        )
    )


def has_lora(unet: UNet2DConditionModel) -> bool:
    return bool(getattr(unet, "peft_config", None))


def save_lora(unet: UNet2DConditionModel, out_dir: str | Path) -> Path:
    """`pytorch_lora_weights.safetensors`, which `pipeline.load_lora_weights(out_dir)` reads."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(save_directory=str(out_dir), unet_lora_layers=layers)
    return Path(out_dir)
