"""Model families (pixel UNet, Stable Diffusion, SDXL) in one registry; see `families.base`.

Lightning-free: `sample` and `eval` load models through this package alone.
"""

from diffusion_lab.families.base import Family, ModelParts
from diffusion_lab.families.checkpoints import load_checkpoint
from diffusion_lab.families.latent_encoder import LatentEncoder
from diffusion_lab.families.loading import load_sampler
from diffusion_lab.families.registry import (
    families,
    family_named,
    family_of_checkpoint,
    family_of_pipeline,
    register,
)

__all__ = [
    "Family",
    "LatentEncoder",
    "ModelParts",
    "families",
    "family_named",
    "family_of_checkpoint",
    "family_of_pipeline",
    "load_checkpoint",
    "load_sampler",
    "register",
]
