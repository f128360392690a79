"""Post-hoc EMA (EDM2, arXiv:2312.02696 section 3) in one place: the power-function profiles (`power`), the
training callback that tracks and snapshots them (`callback`) and the reconstruction of any EMA length after
training (`sweep`, driven by `diffusion-lab ema`)."""

from diffusion_lab.posthoc_ema.callback import PostHocEMA

__all__ = ["PostHocEMA"]
