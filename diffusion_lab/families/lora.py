"""LoRA adapters on the UNet's attention (peft), saved in the diffusers LoRA format."""

from collections.abc import Sequence
from pathlib import Path

import diffusers
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def add_lora(
    unet: UNet2DConditionModel,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
) -> None:
    """Freeze the UNet and add trainable low-rank adapters (Hu et al. 2021, arXiv:2106.09685) to the
    named projections; only those train. alpha / rank scales the update (alpha defaults to rank: 1.0)."""
    from peft import LoraConfig  # (peft loads only where a LoRA is made: `sample` of a full model needs none)

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


def save_lora(
    unet: UNet2DConditionModel, out_dir: str | Path, pipeline_class=StableDiffusionPipeline, scheduler=None
) -> Path:
    """`pytorch_lora_weights.safetensors`, written by `pipeline_class.save_lora_weights` (StableDiffusionPipeline
    or StableDiffusionXLPipeline), which `pipeline.load_lora_weights(out_dir)` reads, with the adapter's
    config (rank, alpha, target modules) in its metadata: without it diffusers reloads with alpha = rank, so an
    adapter trained at alpha 16, rank 4 would sample at scale 1 instead of 4 (what diffusers' own scripts pass
    via `_collate_lora_metadata`). `scheduler`, when given, goes to `scheduler/`: a sampler on the schedule the
    adapter was trained for, where it differs from the base model's."""
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_class.save_lora_weights(
        save_directory=str(out_dir),
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
    )
    if scheduler is not None:
        scheduler.save_pretrained(Path(out_dir) / "scheduler")
    return Path(out_dir)


def lora_scheduler(lora_dir: str | Path):
    """The scheduler a LoRA folder carries (see `save_lora`), or None."""
    folder = Path(lora_dir) / "scheduler"
    if not (folder / "scheduler_config.json").is_file():
        return None
    class_name = diffusers.DDPMScheduler.load_config(folder)["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(folder)
