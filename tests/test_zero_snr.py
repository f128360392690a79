"""Zero terminal SNR (arXiv:2305.08891) as one switch: training betas, trailing spacing in every sampler and
the export, CFG rescale at sampling, epsilon refused."""

from unittest import mock

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from hydra.utils import instantiate

from diffusion_lab.generation import PixelSampler, SampleSettings
from diffusion_lab.generation.samplers import TextToImageSampler
from tests.conftest import TINY

ZERO_SNR = ["model.zero_terminal_snr=true", "model.noise_scheduler.prediction_type=v_prediction"]


def _first_timestep(sampler, name: str, steps: int = 50) -> int:
    scheduler = sampler.scheduler(SampleSettings(scheduler=name, steps=steps))
    scheduler.set_timesteps(steps)
    return int(scheduler.timesteps[0])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++", "euler", "euler-a", "unipc", "pndm"])
def test_every_sampler_starts_at_the_last_training_timestep(compose_config, name):
    model = instantiate(compose_config(*TINY, *ZERO_SNR).model)
    assert model.noise_scheduler.alphas_cumprod[-1] < 1e-6  # the last step is (numerically) pure noise
    assert _first_timestep(PixelSampler(model.net, model.noise_scheduler), name) == 999
    plain = instantiate(compose_config(*TINY).model)
    assert (
        _first_timestep(PixelSampler(plain.net, plain.noise_scheduler), "ddim") == 980
    )  # `leading` misses it


def test_the_exported_pipeline_keeps_the_zero_snr_schedule(compose_config, tmp_path):
    model = instantiate(compose_config(*TINY, *ZERO_SNR).model)
    model.save_pipeline(tmp_path / "pipeline")
    scheduler = DiffusionPipeline.from_pretrained(tmp_path / "pipeline").scheduler
    scheduler.set_timesteps(50)
    assert int(scheduler.timesteps[0]) == 999 and scheduler.config.rescale_betas_zero_snr


def test_epsilon_with_zero_terminal_snr_is_refused(compose_config):
    with pytest.raises(Exception, match="v_prediction"):
        instantiate(compose_config(*TINY, "model.zero_terminal_snr=true").model)


def test_guidance_rescale_reaches_the_pipeline(tiny_sd):
    from diffusion_lab.models import LatentDiffusion

    settings = dict(
        pretrained=str(tiny_sd), optimizer=torch.optim.AdamW, lr=1e-3, prediction_type="v_prediction"
    )
    calls = []

    def record(pipeline, **kwargs):
        calls.append(kwargs)
        return mock.Mock(images=torch.zeros(len(kwargs["prompt"]), 3, 32, 32))

    for zero_snr, given, expected in [(True, None, 0.7), (True, 0.3, 0.3), (False, None, 0.0)]:
        model = LatentDiffusion(**settings, zero_terminal_snr=zero_snr)
        sampler = TextToImageSampler(model.pipeline())
        with mock.patch.object(StableDiffusionPipeline, "__call__", record):
            sampler.generate([0], SampleSettings(steps=2, guidance_rescale=given), prompts=["a digit"])
        assert calls[-1]["guidance_rescale"] == expected
