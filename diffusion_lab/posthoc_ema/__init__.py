"""Post-hoc EMA (EDM2, arXiv:2312.02696 section 3) in one place: the power-function profiles (`core.power_ema`), the
training callback that tracks and snapshots them (`callback`), the choice of the best length as a run ends (`quality`) and the reconstruction of any EMA length after
training (`sweep`, driven by `diffusion-lab ema`)."""

from diffusion_lab.posthoc_ema.callback import PostHocEMA
from diffusion_lab.posthoc_ema.quality import PostHocQuality

__all__ = ["PostHocEMA", "PostHocQuality"]
