"""Zero terminal SNR (arXiv:2305.08891) as one switch: training betas, trailing spacing in every sampler and
the export, CFG rescale at sampling, epsilon refused."""

from unittest import mock

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from hydra.utils import instantiate

from diffusion_lab.generation import PixelSampler, SampleSettings
from diffusion_lab.generation.samplers import TextToImageSampler
from tests.conftest import DDPM_LINEAR, TINY

ZERO_SNR = [
    *DDPM_LINEAR,
    "model.noise_scheduler.rescale_betas_zero_snr=true",
    "model.noise_scheduler.prediction_type=v_prediction",
]


def _first_timestep(sampler, name: str, steps: int = 50) -> int:
    scheduler = sampler.scheduler(SampleSettings(scheduler=name, num_inference_steps=steps))
    scheduler.set_timesteps(steps)
    return int(scheduler.timesteps[0])


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++", "dpm++-sde", "euler", "euler-a", "unipc"])
def test_every_sampler_starts_at_the_last_training_timestep(compose_config, name):
    model = instantiate(compose_config(*TINY, *ZERO_SNR).model)
    assert model.noise_scheduler.alphas_cumprod[-1] < 1e-6  # the last step is (numerically) pure noise
    assert _first_timestep(PixelSampler(model.net, model.noise_scheduler), name) == 999
    plain = instantiate(compose_config(*TINY, *DDPM_LINEAR).model)
    assert (
        _first_timestep(PixelSampler(plain.net, plain.noise_scheduler), "ddim") == 980
    )  # `leading` misses it


@pytest.mark.parametrize("name", ["pndm", "heun", "lms"])
def test_samplers_without_zero_snr_support_are_refused_with_those_that_have_it(compose_config, name):
    from diffusion_lab.errors import ConfigError

    model = instantiate(compose_config(*TINY, *ZERO_SNR).model)
    with pytest.raises(
        ConfigError, match=r"use one of ddpm, ddim, dpm\+\+, dpm\+\+-sde, euler, euler-a, unipc"
    ):
        _first_timestep(PixelSampler(model.net, model.noise_scheduler), name)


def test_the_exported_pipeline_keeps_the_zero_snr_schedule(compose_config, tmp_path):
    model = instantiate(compose_config(*TINY, *ZERO_SNR).model)
    model.save_pipeline(tmp_path / "pipeline")
    scheduler = DiffusionPipeline.from_pretrained(tmp_path / "pipeline").scheduler
    scheduler.set_timesteps(50)
    assert int(scheduler.timesteps[0]) == 999 and scheduler.config.rescale_betas_zero_snr


def test_epsilon_with_zero_terminal_snr_is_refused(compose_config, tiny_sd):
    from diffusion_lab.errors import ConfigError
    from diffusion_lab.models import LatentDiffusion

    with pytest.raises(Exception, match="v_prediction") as raised:
        instantiate(
            compose_config(*TINY, *DDPM_LINEAR, "model.noise_scheduler.rescale_betas_zero_snr=true").model
        )
    assert isinstance(raised.value.__cause__, ConfigError)
    with pytest.raises(ConfigError, match="v_prediction"):
        LatentDiffusion(
            str(tiny_sd),
            optimizer=torch.optim.AdamW,
            lr=1e-3,
            noise_scheduler={"rescale_betas_zero_snr": True},
        )


def test_a_v_prediction_override_survives_zero_snr_on_a_base_that_leaves_prediction_type_unset(
    tiny_sd, tmp_path
):
    """SD 1.5's scheduler config has no prediction_type: diffusers lists it among the defaults, and rebuilding the
    scheduler would have put epsilon back."""
    import json
    import shutil

    from diffusion_lab.models import LatentDiffusion

    base = tmp_path / "base"
    shutil.copytree(tiny_sd, base)
    config_path = base / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.pop("prediction_type")
    config_path.write_text(json.dumps(config))
    model = LatentDiffusion(
        str(base),
        optimizer=torch.optim.AdamW,
        lr=1e-3,
        noise_scheduler={"prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    )
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    assert model.noise_scheduler.config.rescale_betas_zero_snr


def test_guidance_rescale_reaches_the_pipeline_that_takes_it(tiny_sd):
    from diffusion_lab.models import LatentDiffusion

    settings = dict(pretrained=str(tiny_sd), optimizer=torch.optim.AdamW, lr=1e-3)
    calls = []

    def takes_it(pipeline, prompt, guidance_rescale=0.0, **kwargs):  # StableDiffusionPipeline's signature
        calls.append(guidance_rescale)
        return mock.Mock(images=torch.zeros(len(prompt), 3, 32, 32))

    def does_not(pipeline, prompt, **kwargs):  # Kolors, SAG, ...
        calls.append(kwargs.get("guidance_rescale", "absent"))
        return mock.Mock(images=torch.zeros(len(prompt), 3, 32, 32))

    def run(zero_snr: bool, given: float | None, call) -> None:
        model = LatentDiffusion(
            **settings,
            noise_scheduler={"prediction_type": "v_prediction", "rescale_betas_zero_snr": zero_snr},
        )
        sampler = TextToImageSampler(model.family.pipeline(model.parts()))
        with mock.patch.object(StableDiffusionPipeline, "__call__", call):
            sampler.generate(
                [0], SampleSettings(num_inference_steps=2, guidance_rescale=given), prompts=["a digit"]
            )

    for zero_snr, given, expected in [(True, None, 0.7), (True, 0.3, 0.3), (False, None, 0.0)]:
        run(zero_snr, given, takes_it)
        assert calls[-1] == expected
    run(False, None, does_not)
    assert calls[-1] == "absent"
    with pytest.raises(ValueError, match="takes no guidance_rescale"):
        run(True, None, does_not)
