"""Networks of this package's own (diffusers has the UNets): what checkpoints, exports and pipelines name."""

from diffusion_lab.networks.dit import DiffusionTransformer, build_dit

__all__ = ["DiffusionTransformer", "build_dit"]
