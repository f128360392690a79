"""Loading the parts of a Stable Diffusion (1.x/2.x or XL) model, and naming exactly which files they came from."""

import hashlib
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusion_lab.families.base import ModelParts
from diffusion_lab.families.prompts import PromptEncoder

FROZEN_SUBFOLDERS = (
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "text_encoder_3",
    "tokenizer_3",
)


def pipeline_index(pretrained: str, revision: str | None = None) -> dict:
    """The checkpoint's `model_index.json`: which components it has (SDXL: a second text encoder)."""
    return dict(DiffusionPipeline.load_config(pretrained, revision=revision))


def has_second_text_encoder(index: dict) -> bool:
    """SDXL's layout: `text_encoder_2` (with its projection) beside `text_encoder`."""
    return any(part is not None for part in index.get("text_encoder_2") or [])


def decode_in_own_dtype(vae: AutoencoderKL) -> AutoencoderKL:
    """Cast what reaches the VAE's decoder to the VAE's dtype. Pipelines hand it latents in the UNet's dtype
    (fp32 under bf16-mixed), which an fp16 VAE that does not ask to be upcast (`force_upcast: false`, as
    madebyollin/sdxl-vae-fp16-fix) cannot take."""

    def cast(module: torch.nn.Module, args: tuple) -> tuple:
        dtype = next(module.parameters()).dtype
        return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    for part in (getattr(vae, "post_quant_conv", None), vae.decoder):
        if part is not None:
            part.register_forward_pre_hook(cast)
    return vae


def load_vae(pretrained_model_name_or_path: str, **kwargs) -> AutoencoderKL:
    """A frozen VAE (eval mode, no gradients) from a hub id or folder (`stabilityai/sd-vae-ft-ema`,
    `DIR/vae`), its decoder fed in its own dtype."""
    vae = AutoencoderKL.from_pretrained(pretrained_model_name_or_path, **kwargs)
    return decode_in_own_dtype(vae.requires_grad_(False).eval())


COMPONENTS = ("all", "vae", "text")  # which frozen parts a loader returns


def load_text_and_vae(
    pretrained: str, revision: str | None = None, vae: str | None = None, components: str = "all"
) -> dict:
    """The frozen parts, `requires_grad_(False)` and in eval mode: the tokenizer(s), text encoder(s) (SDXL:
    `text_encoder_2` with its projection) and their `prompts` encoder, and the VAE, from `pretrained`'s `vae/`
    or from `vae`, a folder or hub id of a replacement (`madebyollin/sdxl-vae-fp16-fix`: SDXL's VAE, fine-tuned
    not to overflow in fp16). `components`: all, or only the VAE or only the text side (a run whose prompts come
    from a cache never loads its text encoders)."""
    source = {"pretrained_model_name_or_path": pretrained, "revision": revision}
    parts = {}
    if components in ("all", "vae"):
        parts["vae"] = load_vae(vae) if vae else load_vae(**source, subfolder="vae")
    if components not in ("all", "text"):
        return parts
    index = pipeline_index(pretrained, revision)
    parts["tokenizer"] = CLIPTokenizer.from_pretrained(**source, subfolder="tokenizer")
    parts["text_encoder"] = CLIPTextModel.from_pretrained(**source, subfolder="text_encoder")
    if has_second_text_encoder(index):
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(**source, subfolder="tokenizer_2")
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
            **source, subfolder="text_encoder_2"
        )
    for name in ("text_encoder", "text_encoder_2"):
        if name in parts:
            parts[name].requires_grad_(False).eval()
    parts["prompts"] = PromptEncoder(
        [parts[name] for name in ("tokenizer", "tokenizer_2") if name in parts],
        [parts[name] for name in ("text_encoder", "text_encoder_2") if name in parts],
        # StableDiffusionXLPipeline's default when the folder does not say: zeros
        zeros_for_empty_prompt=zeros_for_empty_prompt(index),
    )
    return parts


def zeros_for_empty_prompt(index: dict) -> bool:
    """Whether the pipeline feeds zeros (not the encoding of "") as the unconditional prompt: SDXL's default."""
    return bool(index.get("force_zeros_for_empty_prompt", has_second_text_encoder(index)))


def load_parts(
    pretrained: str, revision: str | None = None, vae: str | None = None, components: str = "all",
    base_dtype: str | None = None,
) -> ModelParts:  # fmt: skip
    """The UNet, the training noise schedule as a DDPMScheduler (SDXL ships an Euler sampler config on the
    same betas: diffusers' SDXL training scripts read it the same way) and the frozen parts."""
    source = {"pretrained_model_name_or_path": pretrained, "revision": revision}
    frozen = load_text_and_vae(pretrained, revision, vae, components)
    scheduler = DDPMScheduler.from_pretrained(**source, subfolder="scheduler")
    base = {"pretrained": pretrained, "revision": revision, "scheduler_config": dict(scheduler.config),
            "zeros_for_empty_prompt": zeros_for_empty_prompt(pipeline_index(pretrained, revision))}  # fmt: skip
    dtype = {"torch_dtype": getattr(torch, base_dtype)} if base_dtype else {}
    unet = UNet2DConditionModel.from_pretrained(**source, subfolder="unet", **dtype)
    return ModelParts(unet, scheduler, frozen, base)


def _fingerprint(name_or_path: str, revision: str | None, subfolders: tuple[str, ...]) -> str:
    folder = Path(name_or_path)
    if folder.is_dir():
        roots = [folder / sub for sub in subfolders] if subfolders else [folder]
        files = sorted({p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()})
        files += [folder / "model_index.json"] if (folder / "model_index.json").is_file() else []
        listing = [f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return f"local:{folder.resolve()}:" + hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    from huggingface_hub import snapshot_download

    # One small file is enough: the snapshot folder is named by the commit, which pins every file in it.
    index = "model_index.json" if subfolders else "config.json"
    snapshot = snapshot_download(name_or_path, revision=revision, allow_patterns=[index])
    return f"hub:{name_or_path}@{Path(snapshot).name}"


def model_fingerprint(pretrained: str, revision: str | None = None) -> str:
    """Names the exact files of a whole pipeline (every component): what it generates depends on all of them."""
    return f"model:{_fingerprint(pretrained, revision, FROZEN_SUBFOLDERS + ('unet', 'transformer', 'scheduler'))}"


def vae_fingerprint(vae: str) -> str:
    """Names the exact files of a VAE on its own (a hub id or a folder holding its config.json)."""
    return f"vae:{_fingerprint(vae, None, ())}"


def frozen_parts_fingerprint(pretrained: str, revision: str | None = None, vae: str | None = None) -> str:
    """Names the exact VAE / text encoder(s) / tokenizer(s) files: a hub snapshot's commit, or a local folder's
    file sizes and modification times; and the replacement VAE's, if any. Anything cached from their outputs
    is keyed on this."""
    fingerprint = _fingerprint(pretrained, revision, FROZEN_SUBFOLDERS)
    return fingerprint + (f"+vae:{_fingerprint(vae, None, ())}" if vae else "")
