"""`device: auto` and `dtype: auto` for the commands that run a model outside a Trainer."""

import torch

from diffusion_lab.dtypes import dtype_from_name


def resolve_device(name: str) -> torch.device:
    return (
        torch.device("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else torch.device(name)
    )


def resolve_dtype(name: str, kind: str, device: torch.device) -> torch.dtype:
    """auto: float16 for text-to-image models on CUDA (as diffusers' examples sample), float32 otherwise."""
    if name == "auto":
        return torch.float16 if kind == "text" and device.type == "cuda" else torch.float32
    return dtype_from_name(name)
