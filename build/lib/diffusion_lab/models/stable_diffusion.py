"""Loading the parts of a Stable Diffusion checkpoint, and naming exactly which checkpoint they came from."""

import hashlib
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

FROZEN_SUBFOLDERS = ("vae", "text_encoder", "tokenizer")


def token_ids(tokenizer: CLIPTokenizer, captions: list[str]) -> torch.Tensor:
    """CLIP input ids, padded to the tokenizer's full context (77) as Stable Diffusion was trained."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def load_text_and_vae(pretrained: str, revision: str | None = None) -> dict:
    """The frozen parts: tokenizer, CLIP text encoder and VAE, `requires_grad_(False)` and in eval mode."""
    source = {"pretrained_model_name_or_path": pretrained, "revision": revision}
    parts = {
        "tokenizer": CLIPTokenizer.from_pretrained(**source, subfolder="tokenizer"),
        "text_encoder": CLIPTextModel.from_pretrained(**source, subfolder="text_encoder"),
        "vae": AutoencoderKL.from_pretrained(**source, subfolder="vae"),
    }
    for name in ("text_encoder", "vae"):
        parts[name].requires_grad_(False).eval()
    return parts


def load_unet_and_scheduler(pretrained: str, revision: str | None = None) -> dict:
    source = {"pretrained_model_name_or_path": pretrained, "revision": revision}
    return {
        "unet": UNet2DConditionModel.from_pretrained(**source, subfolder="unet"),
        "noise_scheduler": DDPMScheduler.from_pretrained(**source, subfolder="scheduler"),
    }


def frozen_parts_fingerprint(pretrained: str, revision: str | None = None) -> str:
    """Names the exact VAE / text encoder / tokenizer files: a hub snapshot's commit, or a local folder's
    file sizes and modification times. Anything cached from their outputs is keyed on this."""
    folder = Path(pretrained)
    if folder.is_dir():
        files = sorted(p for sub in FROZEN_SUBFOLDERS for p in (folder / sub).rglob("*") if p.is_file())
        listing = [f"{p.relative_to(folder)}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files]
        return f"local:{folder.resolve()}:" + hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    from huggingface_hub import snapshot_download

    snapshot = snapshot_download(
        pretrained, revision=revision, allow_patterns=[f"{sub}/*" for sub in FROZEN_SUBFOLDERS]
    )
    return f"hub:{pretrained}@{Path(snapshot).name}"  # the snapshot folder is named by its commit
