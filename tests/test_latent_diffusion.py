"""Latent diffusion fine-tuning on the tiny SD checkpoint: frozen parts stay frozen, the UNet learns."""

import functools

import pytest
import torch

from diffusion_lab.core import keyed_integers, keyed_normal, salted, sample_keys
from diffusion_lab.core.random import TIMESTEP_SALT, keyed_gaussian_sample
from diffusion_lab.data import DigitsDataModule
from diffusion_lab.models import LatentDiffusion
from tests.conftest import bare_trainer


def _model(tiny_sd, **overrides):
    settings = dict(pretrained=str(tiny_sd), optimizer=functools.partial(torch.optim.AdamW), lr=1e-3)
    return LatentDiffusion(**{**settings, **overrides})


def _digits(batch_size=8):
    data = DigitsDataModule(
        image_size=32, channels=3, batch_size=batch_size, caption_template="a handwritten digit {label}"
    )
    data.setup("fit")
    return data


def test_fine_tuning_changes_only_the_unet(tiny_sd):
    model = _model(tiny_sd)
    assert model.net.training  # diffusers loads in eval mode; gradient checkpointing only acts in train mode
    frozen_before = {
        k: v.clone() for k, v in {**model.vae.state_dict(), **model.text_encoder.state_dict()}.items()
    }
    unet_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = bare_trainer(3)
    trainer.fit(model, train_dataloaders=_digits().train_dataloader())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    frozen_after = {**model.vae.state_dict(), **model.text_encoder.state_dict()}
    assert all(torch.equal(frozen_before[k], frozen_after[k]) for k in frozen_before)
    assert sum(not torch.equal(unet_before[k], v) for k, v in model.net.state_dict().items()) > 0.9 * len(
        unet_before
    )
    model.train()  # what Lightning does at fit start: only the UNet switches to training mode
    assert not model.vae.training and not model.text_encoder.training and model.net.training
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.net.parameters()}


def test_caption_dropout_rate_is_honoured_and_keyed(tiny_sd):
    model = _model(tiny_sd)
    ids = torch.arange(3000)
    dropped = model.caption_dropped(sample_keys(0, 7, ids))
    assert abs(dropped.float().mean().item() - 0.1) < 0.02
    assert torch.equal(dropped, model.caption_dropped(sample_keys(0, 7, ids)))
    assert not torch.equal(dropped, model.caption_dropped(sample_keys(0, 8, ids)))
    model.hparams.caption_dropout = 0.0
    assert not model.caption_dropped(sample_keys(0, 7, ids)).any()


def test_dropped_captions_become_the_empty_prompt(tiny_sd):
    model = _model(tiny_sd, caption_dropout=0.5)
    batch = {"caption": ["a handwritten digit 3"] * 8, "index": torch.arange(8)}
    keys = sample_keys(0, 0, batch["index"])
    dropped = model.caption_dropped(keys)
    assert dropped.any() and not dropped.all()
    context = model.conditioning(batch, keys)["encoder_hidden_states"]
    empty = model.encoder.encode_prompts([""], model.device).hidden[0]
    caption = model.encoder.encode_prompts(["a handwritten digit 3"], model.device).hidden[0]
    for row, drop in zip(context, dropped.tolist(), strict=True):
        torch.testing.assert_close(row, empty if drop else caption)
    held_out = model.conditioning(batch)["encoder_hidden_states"]  # no keys: nothing dropped
    torch.testing.assert_close(held_out, caption.expand_as(held_out))


def test_v_prediction_target_matches_a_hand_computation(tiny_sd):
    model = _model(tiny_sd, noise_scheduler={"prediction_type": "v_prediction"})
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    batch = next(iter(_digits(4).train_dataloader()))
    keys = sample_keys(0, 0, batch["index"])
    latents = model.encoder.scale_latents(
        keyed_gaussian_sample(*model.encoder.encode_posterior(batch["pixels"]), keys)
    )

    class Zero(torch.nn.Module):  # predicts 0, so the loss is the mean square of the target
        def forward(self, sample, timestep, **kwargs):
            return type("Output", (), {"sample": torch.zeros_like(sample)})

    loss = model.objective.loss(Zero(), latents, keys)
    # By hand: v = sqrt(abar_t) * eps - sqrt(1 - abar_t) * x0, with the same keyed eps and t.
    t = keyed_integers(salted(keys, TIMESTEP_SALT), 1000, latents.device)
    eps = keyed_normal(keys, tuple(latents.shape[1:]), latents.device, latents.dtype)
    abar = model.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = abar.sqrt() * eps - (1 - abar).sqrt() * latents
    torch.testing.assert_close(loss, (v**2).mean(), rtol=1e-5, atol=1e-6)


def test_validation_loss_is_deterministic(tiny_sd):
    model = _model(tiny_sd).eval()
    batch = next(iter(_digits(4).val_dataloader()))
    assert "caption" in batch and batch["caption"][0].startswith("a handwritten digit ")
    losses = []
    model.log = lambda name, value, **kwargs: losses.append(value)
    model.validation_step(batch, 0)
    model.validation_step(batch, 0)
    assert torch.isfinite(losses[0]) and torch.equal(losses[0], losses[1])


def test_model_config_builds_from_a_local_folder_through_from_pretrained(tiny_sd, compose_config):
    from hydra.utils import instantiate

    cfg = compose_config("model=latent", f"model.pretrained={tiny_sd}", "model.gradient_checkpointing=true")
    assert compose_config("model=latent").model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    model = instantiate(cfg.model)
    assert model.net.is_gradient_checkpointing and model.hparams.caption_dropout == 0.1


def test_pixel_only_callbacks_fail_at_the_start_with_a_way_out(tiny_sd, compose_config, tmp_path):
    from diffusion_lab.commands.instantiate import build_run

    cfg = compose_config("model=latent", f"model.pretrained={tiny_sd}",
                         "data.caption_template='a handwritten digit {label}'", "data.channels=3", "data.image_size=32")  # fmt: skip
    datamodule, model, trainer = build_run(cfg)
    with pytest.raises(
        ValueError,
        match=r"callbacks.sample_grid draws image grids; the sd family draws prompt grids .* ~callbacks.sample_grid",
    ):
        trainer.fit(model, datamodule=datamodule)
