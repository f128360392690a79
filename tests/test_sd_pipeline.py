"""Using a fine-tuned latent model: prompt grids, pipeline export (full and LoRA), checkpoints, levers."""

import functools

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
)
from PIL import Image

from diffusion_lab.callbacks import EMA, PromptGrid
from diffusion_lab.data import DigitsDataModule
from diffusion_lab.families.export import export_checkpoint
from diffusion_lab.models import LatentDiffusion
from tests.conftest import bare_trainer

PROMPTS = ["a handwritten digit 1", "a handwritten digit 7"]


def _model(tiny_sd, **overrides):
    settings = dict(pretrained=str(tiny_sd), optimizer=functools.partial(torch.optim.AdamW), lr=1e-3)
    return LatentDiffusion(**{**settings, **overrides})


def _digits():
    data = DigitsDataModule(
        image_size=32, channels=3, batch_size=8, caption_template="a handwritten digit {label}"
    )
    data.setup("fit")
    return data


def _unet_output(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 77, 32, generator=generator)
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), encoder_hidden_states=context).sample


@pytest.fixture(scope="module")
def fine_tuned(tiny_sd, tmp_path_factory):
    """Four steps with EMA, a prompt grid and a checkpoint: (model, ema callback, run folder)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    run = tmp_path_factory.mktemp("sd_run")
    ema = EMA(decay=0.5)
    grid = PromptGrid(
        run / "samples", PROMPTS, seeds=[0, 1, 2], guidance_scale=3.0, num_inference_steps=2, every_n_steps=2
    )
    checkpoint = ModelCheckpoint(run / "checkpoints", save_last=True)
    model = _model(tiny_sd)
    trainer = bare_trainer(4, callbacks=[ema, grid, checkpoint], enable_checkpointing=True)
    trainer.fit(model, train_dataloaders=_digits().train_dataloader())
    return model, ema, run


def test_prompt_grid_has_a_row_per_prompt_and_a_column_per_seed(fine_tuned):
    _, _, run = fine_tuned
    names = sorted(p.name for p in (run / "samples").glob("*.png"))
    assert names == ["final.png", "step_0000002.png", "step_0000004.png"]
    grid = Image.open(run / "samples" / "final.png")
    # 3 columns, 2 rows of 32 px images with 1 px borders, upscaled x2.
    assert grid.size == (2 * (3 * 33 + 1), 2 * (2 * 33 + 1))


def test_prompt_grid_refuses_a_pixel_model(compose_config):
    from hydra.utils import instantiate

    model = instantiate(compose_config("model/net=unet_tiny", "data.image_size=8").model)
    with pytest.raises(
        ValueError,
        match=r"callbacks.prompt_grid draws prompt grids; the pixel family draws image grids .*~callbacks.prompt_grid",
    ):
        PromptGrid("unused", PROMPTS).setup(None, model, "fit")


def test_export_loads_with_from_pretrained_and_answers_prompts_with_three_schedulers(fine_tuned, tmp_path):
    model, ema, _ = fine_tuned
    with ema.averaged_weights(model):
        model.save_pipeline(tmp_path / "pipeline")
        ema_output = _unet_output(model.net)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert type(pipeline).__name__ == "StableDiffusionPipeline"
    torch.testing.assert_close(_unet_output(pipeline.unet), ema_output)  # the EMA UNet was exported
    assert not torch.allclose(_unet_output(model.net), ema_output)
    for scheduler_class in (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler):
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
        images = pipeline(
            PROMPTS, negative_prompt=["a handwritten digit 0"] * 2, guidance_scale=5.0, num_inference_steps=3,
            generator=torch.Generator().manual_seed(0), output_type="np",
        ).images  # fmt: skip
        assert images.shape == (2, 32, 32, 3) and (images >= 0).all() and (images <= 1).all()
    # guidance and the negative prompt change the picture
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    run = functools.partial(pipeline, PROMPTS[0], num_inference_steps=3, output_type="np")
    plain = run(guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    guided = run(guidance_scale=7.0, generator=torch.Generator().manual_seed(0)).images
    negative = run(
        guidance_scale=7.0,
        negative_prompt="a handwritten digit 0",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert not (plain == guided).all() and not (guided == negative).all()


def test_checkpoints_hold_the_unet_not_the_frozen_parts_and_export_from_them(fine_tuned, tmp_path):
    model, ema, run = fine_tuned
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    prefixes = {key.split(".")[0] for key in checkpoint["state_dict"]}
    assert prefixes == {"net"}
    result = export_checkpoint(run / "checkpoints" / "last.ckpt", tmp_path / "exported")
    assert result["used_ema"] and result["global_step"] == 4 and result["family"] == "sd"
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "exported")
    with ema.averaged_weights(model):
        torch.testing.assert_close(_unet_output(pipeline.unet), _unet_output(model.net))
    assert all(
        torch.equal(a, b) for a, b in zip(pipeline.vae.parameters(), model.vae.parameters(), strict=True)
    )


def test_lora_trains_only_the_adapters_and_loads_into_a_diffusers_pipeline(tiny_sd, tmp_path):
    model = _model(tiny_sd, lora_rank=4, lora_alpha=16)  # scale 4: lost without the adapter metadata
    base = {k: v.clone() for k, v in model.net.state_dict().items() if "lora" not in k}
    lora_before = {k: v.clone() for k, v in model.net.state_dict().items() if "lora" in k}
    assert lora_before and all("lora" in n for n, p in model.net.named_parameters() if p.requires_grad)
    trainer = bare_trainer(3)
    trainer.fit(model, train_dataloaders=_digits().train_dataloader())
    after = model.net.state_dict()
    assert all(torch.equal(base[k], after[k]) for k in base)
    assert any(not torch.equal(lora_before[k], after[k]) for k in lora_before)
    trained_output = _unet_output(model.net)

    model.save_pipeline(tmp_path / "lora")
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd)
    base_output = _unet_output(pipeline.unet)
    pipeline.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_unet_output(pipeline.unet), trained_output, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(base_output, trained_output)
    assert pipeline(PROMPTS[0], num_inference_steps=2, output_type="np").images.shape == (1, 32, 32, 3)
    assert not (tmp_path / "lora" / "scheduler").exists()  # trained on the base's own parametrisation


def test_a_v_prediction_lora_reloads_with_its_v_prediction_scheduler(tiny_sd, tmp_path):
    from diffusion_lab.families import load_sampler

    model = _model(tiny_sd, lora_rank=2, noise_scheduler={"prediction_type": "v_prediction"})
    model.save_pipeline(tmp_path / "lora")
    sampler, details = load_sampler(pretrained=str(tiny_sd), lora=str(tmp_path / "lora"))
    assert sampler.training_scheduler_config.prediction_type == "v_prediction"
    assert DiffusionPipeline.from_pretrained(tiny_sd).scheduler.config.prediction_type == "epsilon"


def test_an_sd_export_samples_with_ddim_on_the_training_schedule_by_default(fine_tuned, tmp_path):
    model, _, _ = fine_tuned
    model.save_pipeline(tmp_path / "pipeline")
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(pipeline.scheduler, DDIMScheduler)
    for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "clip_sample", "steps_offset"):
        assert pipeline.scheduler.config[key] == model.noise_scheduler.config[key], key
    images = pipeline(PROMPTS[0], num_inference_steps=3, output_type="np").images  # the default sampler
    assert images.shape == (1, 32, 32, 3) and pipeline.scheduler.timesteps.numel() == 3


def test_sdpa_and_eager_attention_compute_the_same_unet(tiny_sd):
    sdpa, eager = _model(tiny_sd, attention="sdpa"), _model(tiny_sd, attention="eager")
    assert type(next(iter(sdpa.net.attn_processors.values()))).__name__ == "AttnProcessor2_0"
    assert type(next(iter(eager.net.attn_processors.values()))).__name__ == "AttnProcessor"
    torch.testing.assert_close(_unet_output(sdpa.net), _unet_output(eager.net), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="eager"):
        _model(tiny_sd, attention="flash")


def test_8bit_adamw_says_it_needs_a_gpu(tiny_sd):
    from diffusion_lab.models.optimization import adamw_8bit

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = _model(tiny_sd, optimizer=functools.partial(adamw_8bit))
    with pytest.raises(RuntimeError, match="adamw_8bit needs a CUDA GPU.*model/optimizer=adamw"):
        bare_trainer(1).fit(model, train_dataloaders=_digits().train_dataloader())


def test_vae_stays_float32_under_a_bfloat16_trainer(tiny_sd):
    model = _model(tiny_sd)
    trainer = bare_trainer(1, precision="bf16-true")
    trainer.fit(model, train_dataloaders=_digits().train_dataloader())
    assert model.vae.dtype == torch.float32 and model.net.dtype == torch.bfloat16
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
