"""Per-pixel loss weights from a mask (kohya `masked_loss`, OneTrainer `masked_losses`): the subject counts, the
background does not leak in.

A mask is in [0, 1] per pixel (grey is a partial weight), given at image resolution and brought to the network's
resolution by area averaging (a latent pixel's weight is the mean of the 8 x 8 image pixels it encodes). The
weight is `unmasked_weight + (1 - unmasked_weight) * mask`: a floor for what the mask leaves out, so the model
still sees the whole picture a little. Without `normalize_by_area` the weighted error is averaged over every
pixel (a small subject contributes a small loss, as kohya computes it); with it, over the weight itself (the loss
no longer depends on how much of the image the subject covers, OneTrainer's `normalize_masked_area_loss`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from diffusion_lab.errors import ConfigError


@dataclass(frozen=True)
class LossMask:
    unmasked_weight: float = 0.0
    normalize_by_area: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.unmasked_weight <= 1.0:
            raise ConfigError(f"model.loss_mask.unmasked_weight={self.unmasked_weight}: between 0 and 1")

    def weights(self, mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(N, 1, *size) weights for an (N, 1, H, W) mask in [0, 1]."""
        if tuple(mask.shape[-2:]) != tuple(size):
            mask = F.interpolate(mask.float(), size=size, mode="area")
        return self.unmasked_weight + (1.0 - self.unmasked_weight) * mask.float().clamp(0, 1)

    def per_image(self, squared_error: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The weighted mean squared error of each image: over all its pixels, or over the weight's area."""
        weights = self.weights(mask, tuple(squared_error.shape[-2:])).expand_as(squared_error)
        weighted = squared_error * weights
        if not self.normalize_by_area:
            return weighted.flatten(1).mean(dim=1)
        return weighted.flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(1e-8)
