"""Every objective trains both models through the one shared step, and a flow model leaves as a pipeline
folder that stock diffusers loads and samples."""

import functools

import pytest
import torch
from diffusers import DiffusionPipeline
from hydra.utils import instantiate

from diffusion_lab.core import DDPM, FlowMatching
from diffusion_lab.core import timesteps as samplers
from diffusion_lab.core import weighting as weightings
from diffusion_lab.data import DigitsDataModule
from diffusion_lab.generation import PixelSampler, SampleSettings
from diffusion_lab.models import LatentDiffusion
from tests.conftest import DDPM_LINEAR, TINY, bare_trainer

OBJECTIVES = {
    "ddpm": DDPM_LINEAR,
    "ddpm_v_min_snr": [
        *DDPM_LINEAR,
        "model.noise_scheduler.prediction_type=v_prediction",
        "model/objective/weighting=min_snr",
    ],
    "flow_uniform": ["model/objective=flow_matching", "model/noise_scheduler=flow_match"],
    "flow_logit_normal_cosmap": [
        "model/objective=flow_matching",
        "model/noise_scheduler=flow_match",
        "model/objective/timesteps=logit_normal",
        "model/objective/weighting=cosmap",
    ],
    "flow_mode_shift": [
        "model/objective=flow_matching",
        "model/noise_scheduler=flow_match",
        "model/objective/timesteps=mode",
        "model.objective.shift=3.0",
    ],
}


def _trains(model, loader, steps: int = 2) -> None:
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = bare_trainer(steps)
    trainer.fit(model, train_dataloaders=loader)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = [k for k, v in model.net.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_the_dit(compose_config, objective):
    cfg = compose_config(*TINY, "model/net=dit", "model.net.size=tiny", "model.lr_scheduler.num_warmup_steps=0",
                         *OBJECTIVES[objective])  # fmt: skip
    torch.manual_seed(0)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    data.setup("fit")
    _trains(model, data.train_dataloader(), steps=3)  # (adaLN-Zero: the blocks' weights move from step 2)


@pytest.mark.parametrize("objective", list(OBJECTIVES))
def test_every_objective_trains_the_pixel_model(compose_config, objective):
    cfg = compose_config(*TINY, "model.lr_scheduler.num_warmup_steps=0", *OBJECTIVES[objective])
    torch.manual_seed(0)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    data.setup("fit")
    _trains(model, data.train_dataloader())
    model.log = lambda *args, **kwargs: None
    model.validation_step(next(iter(data.val_dataloader())), 0)


@pytest.mark.parametrize(
    "objective",
    [
        functools.partial(DDPM, weighting=weightings.SigmaSqrt()),
        functools.partial(FlowMatching, timesteps=samplers.Shift(base_size=8)),
    ],
    ids=["ddpm_sigma_sqrt", "flow_shift_by_resolution"],
)
def test_every_objective_trains_the_latent_model(tiny_sd, objective):
    model = LatentDiffusion(str(tiny_sd), optimizer=torch.optim.AdamW, lr=1e-3, objective=objective)
    data = DigitsDataModule(
        image_size=32, channels=3, batch_size=4, caption_template="a handwritten digit {label}"
    )
    data.setup("fit")
    _trains(model, data.train_dataloader())


def test_a_flow_pixel_export_loads_in_diffusion_pipeline_and_samples(compose_config, tmp_path):
    model = instantiate(
        compose_config(
            *TINY,
            "model/objective=flow_matching",
            "model/noise_scheduler=flow_match",
            "model.objective.shift=2.0",
        ).model
    )
    model.save_pipeline(tmp_path / "pipeline")
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert pipeline.scheduler.config.shift == 2.0
    images = pipeline(
        batch_size=2, num_inference_steps=3, output_type="np", generator=torch.manual_seed(0)
    ).images
    assert images.shape == (2, 8, 8, 1) and images.min() >= 0 and images.max() <= 1
    # The folder samples as the live model does: same scheduler, same network, same seeds.
    settings = SampleSettings(scheduler="heun", num_inference_steps=3)
    live = PixelSampler(model.net, model.noise_scheduler).generate([0, 1], settings)
    loaded = PixelSampler(pipeline.unet, pipeline.scheduler).generate([0, 1], settings)
    torch.testing.assert_close(live, loaded)


def test_a_flow_latent_checkpoint_exports_a_pipeline_with_flow_sigmas(tiny_sd, tmp_path, compose_config):
    """From the .ckpt file alone: the checkpoint's hyperparameters say nothing of the objective, its saved
    noise scheduler does."""
    from diffusion_lab.errors import ConfigError
    from diffusion_lab.families import load_sampler
    from diffusion_lab.families.export import export_checkpoint
    from diffusion_lab.runs.config_checks import check_run_config

    model = LatentDiffusion(str(tiny_sd), optimizer=torch.optim.AdamW, lr=1e-3, objective=FlowMatching)
    data = DigitsDataModule(
        image_size=32, channels=3, batch_size=2, caption_template="a handwritten digit {label}"
    )
    data.setup("fit")
    trainer = bare_trainer(1)
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    trainer.save_checkpoint(tmp_path / "flow.ckpt")
    sampler, _ = load_sampler(ckpt_path=str(tmp_path / "flow.ckpt"))
    assert type(sampler.scheduler(SampleSettings())).__name__ == "UniPCMultistepScheduler"  # the flow default
    for name in ("euler", "heun", "dpm++"):  # through StableDiffusionPipeline, which reads init_noise_sigma
        image = sampler.generate(
            [0], SampleSettings(scheduler=name, num_inference_steps=2), prompts=["a digit"]
        )
        assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
    export_checkpoint(tmp_path / "flow.ckpt", tmp_path / "pipeline")
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    scheduler = pipeline.scheduler
    assert type(scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert scheduler.config.use_flow_sigmas and scheduler.config.prediction_type == "flow_prediction"
    pipeline.set_progress_bar_config(disable=True)
    image = pipeline(
        "a digit", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)
    ).images
    assert image.shape == (1, 32, 32, 3)
    flow_with_v = compose_config(
        "model=latent", f"model.pretrained={tiny_sd}", "model/objective=flow_matching",
        "model.noise_scheduler.prediction_type=v_prediction",
    )  # fmt: skip
    with pytest.raises(ConfigError, match="prediction_type"):
        check_run_config(flow_with_v)
