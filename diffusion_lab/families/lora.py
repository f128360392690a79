"""LoRA adapters on a latent model's denoiser (peft), saved in the diffusers LoRA format or, on request, in the
single-file kohya format that ComfyUI, A1111 / Forge and kohya sd-scripts load."""

from collections.abc import Sequence
from pathlib import Path

import diffusers
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
KOHYA_FILE = "lora_kohya.safetensors"


def add_lora(
    net: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
) -> None:
    """Freeze the network and add trainable low-rank adapters (Hu et al. 2021, arXiv:2106.09685) to the
    named projections; only those train. alpha / rank scales the update (alpha defaults to rank: 1.0)."""
    from peft import LoraConfig  # (peft loads only where a LoRA is made: `sample` of a full model needs none)

    if rank < 1:
        raise ValueError(f"model.lora_rank must be a positive integer, got {rank}")
    net.requires_grad_(False)
    net.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=alpha if alpha is not None else rank,
            init_lora_weights="gaussian",
            target_modules=list(target_modules),
        )
    )
    # Adapters on a bf16 base (a quantised one computes in bf16) are made in bf16, where an update of lr 1e-4
    # rounds away: they train in float32, as diffusers' scripts do (`cast_training_params`).
    for parameter in net.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def lora_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights in peft's naming (`<module>.lora_A.weight`, `<module>.lora_B.weight`)."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(net)


def save_lora(
    net: torch.nn.Module,
    out_dir: str | Path,
    pipeline_class=StableDiffusionPipeline,
    scheduler=None,
    component: str = "unet",
) -> Path:
    """`pytorch_lora_weights.safetensors`, written by `pipeline_class.save_lora_weights` (the family's pipeline),
    which `pipeline.load_lora_weights(out_dir)` reads, with the adapter's config (rank, alpha, target modules) in
    its metadata: without it diffusers reloads with alpha = rank, so an adapter trained at alpha 16, rank 4 would
    sample at scale 1 instead of 4 (what diffusers' own scripts pass via `_collate_lora_metadata`). `component`
    is the denoiser's pipeline name: `unet` (SD, SDXL) or `transformer` (SD3, Flux, ...), whose loaders take
    peft's naming as it is. `scheduler`, when given, goes to `scheduler/`: a sampler on the schedule the adapter
    was trained for, where it differs from the base model's."""
    layers = lora_state_dict(net)
    if component == "unet":
        layers = convert_state_dict_to_diffusers(layers)
    pipeline_class.save_lora_weights(
        save_directory=str(out_dir),
        **{f"{component}_lora_layers": layers,
           f"{component}_lora_adapter_metadata": net.peft_config["default"].to_dict()},
    )  # fmt: skip
    if scheduler is not None:
        scheduler.save_pretrained(Path(out_dir) / "scheduler")
    return Path(out_dir)


def kohya_state_dict(net: torch.nn.Module, prefix: str = "lora_unet") -> dict[str, torch.Tensor]:
    """The adapters as kohya names them, through diffusers' `convert_state_dict_to_kohya`: `<prefix>_<path>`, dots
    in the module path as underscores, `.lora_down.weight` / `.lora_up.weight` and an `.alpha` per module. The
    prefix is the family's: `lora_unet` (SD, SDXL; and Z-Image, as musubi-tuner and diffusers' converter name it)
    or `lora_transformer` (SD3, Flux: what ComfyUI maps for diffusers-layout transformers, OneTrainer's naming).
    diffusers writes alpha = rank; the adapter's own `lora_alpha` replaces it, so the file applies the scale that
    was trained."""
    from diffusers.utils import convert_state_dict_to_kohya

    config = net.peft_config["default"]
    prefixed = {f"unet.{key}": value for key, value in lora_state_dict(net).items()}
    converted = convert_state_dict_to_kohya(prefixed)
    out = {}
    for key, value in converted.items():
        key = key.replace("lora_unet_", f"{prefix}_", 1)
        if key.endswith(".alpha"):
            module = key[: -len(".alpha")].split("_", 2)[2]
            value = torch.tensor(float(_alpha_of(config, module)))
        out[key] = value.contiguous()
    return out


def _alpha_of(config, module_key: str) -> float:
    """A module's alpha: peft's `alpha_pattern` can set one per module (none here), else `lora_alpha`."""
    for pattern, alpha in (config.alpha_pattern or {}).items():
        if module_key.endswith(pattern.replace(".", "_")):
            return alpha
    return config.lora_alpha


def from_kohya(state_dict: dict[str, torch.Tensor], net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The inverse of `kohya_state_dict` for `net`: peft's names and the up weights with alpha / rank folded
    back out (so a file written with another alpha maps to the weights it applies)."""
    config = net.peft_config["default"]
    modules = {name.replace(".", "_"): name for name, _ in net.named_modules() if name}
    out = {}
    for key, value in state_dict.items():
        if key.endswith(".alpha"):
            continue
        stem, kind = key.split(".", 1)
        module = modules[stem.split("_", 2)[2]]
        if kind == "lora_down.weight":
            out[f"{module}.lora_A.weight"] = value
        else:
            scale = float(state_dict[f"{stem}.alpha"]) / config.lora_alpha
            out[f"{module}.lora_B.weight"] = value * scale
    return out


def save_kohya(net: torch.nn.Module, out_dir: str | Path, prefix: str = "lora_unet") -> Path:
    """`lora_kohya.safetensors` beside the diffusers-format file, with the rank and alpha in its metadata."""
    from safetensors.torch import save_file

    config = net.peft_config["default"]
    path = Path(out_dir) / KOHYA_FILE
    save_file(kohya_state_dict(net, prefix), str(path),
              metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(config.r),
                        "ss_network_alpha": str(config.lora_alpha), "format": "pt"})  # fmt: skip
    return path


def lora_scheduler(lora_dir: str | Path):
    """The scheduler a LoRA folder carries (see `save_lora`), or None."""
    folder = Path(lora_dir) / "scheduler"
    if not (folder / "scheduler_config.json").is_file():
        return None
    class_name = diffusers.DDPMScheduler.load_config(folder)["_class_name"]
    return getattr(diffusers, class_name).from_pretrained(folder)
