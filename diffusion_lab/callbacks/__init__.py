"""Training-time behaviour that is not the model's job: averaging, sampling, scoring, exporting."""

from diffusion_lab.callbacks.checkpoint import RunCheckpoint
from diffusion_lab.callbacks.ema import EMA, ema_weights
from diffusion_lab.callbacks.final_metrics import FinalStepMetrics
from diffusion_lab.callbacks.nonfinite_guard import Diverged, NonFiniteGuard
from diffusion_lab.callbacks.pipeline_export import PipelineExport
from diffusion_lab.callbacks.prompt_grid import PromptGrid
from diffusion_lab.callbacks.rng_state import RNGStates
from diffusion_lab.callbacks.sample_grid import SampleGrid
from diffusion_lab.callbacks.sample_quality import SampleQuality

__all__ = [
    "EMA",
    "Diverged",
    "NonFiniteGuard",
    "FinalStepMetrics",
    "PipelineExport",
    "PromptGrid",
    "RNGStates",
    "RunCheckpoint",
    "SampleGrid",
    "SampleQuality",
    "ema_weights",
]
