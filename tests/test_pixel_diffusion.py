"""The LightningModule learns: weights move, loss is finite and falls."""

import pytest
import torch
from hydra.utils import instantiate

from tests.conftest import DDPM_LINEAR, TINY, bare_trainer


def _tiny_model(compose_config, *overrides):
    cfg = compose_config(*TINY, *overrides)
    torch.manual_seed(0)
    return instantiate(cfg.model), instantiate(cfg.data)


def test_one_step_changes_the_weights_and_gives_a_finite_loss(compose_config):
    model, data = _tiny_model(compose_config, "model.lr_scheduler.num_warmup_steps=0")
    data.setup("fit")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = bare_trainer(1)
    trainer.fit(model, train_dataloaders=data.train_dataloader())
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    changed = [k for k, v in model.net.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 0.9 * len(before)


def test_loss_falls_on_a_fixed_batch(compose_config):
    model, data = _tiny_model(
        compose_config,
        "model.lr=3e-3",
        "model/lr_scheduler=constant",
        "model.lr_scheduler.num_warmup_steps=0",
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    optimizer = model.configure_optimizers()["optimizer"]
    losses = []
    for _ in range(60):
        # Same images, same noise every step: only the weights change.
        loss = _fixed_key_loss(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-10:]) / 10 < 0.6 * sum(losses[:10]) / 10


def _fixed_key_loss(model, batch):
    from diffusion_lab.core import sample_keys

    return model.objective.loss(model.net, batch["pixels"], sample_keys(0, 0, batch["index"]))


def test_min_snr_and_v_prediction_train(compose_config):
    model, data = _tiny_model(
        compose_config,
        *DDPM_LINEAR,
        "model/objective/weighting=min_snr",
        "model.noise_scheduler.prediction_type=v_prediction",
        "model.noise_scheduler.rescale_betas_zero_snr=true",
        "model.objective.noise_offset=0.1",
    )
    data.setup("fit")
    loss = model.training_step(next(iter(data.train_dataloader())), 0)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.net.parameters() if p.grad is not None)


def test_class_conditional_net_uses_labels(compose_config):
    model, data = _tiny_model(compose_config, "model.net.num_class_embeds=10")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert torch.isfinite(model.training_step(batch, 0))
    model.validation_step(next(iter(data.val_dataloader())), 0)


def test_compile_and_channels_last_keep_outputs_and_checkpoint_keys(compose_config):
    from diffusion_lab.runs.performance import apply_speed_settings

    model, _ = _tiny_model(compose_config)
    keys = list(model.state_dict())
    sample, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        expected = model.net(sample, t).sample
        apply_speed_settings(model.net, compile={"backend": "eager"}, channels_last=True)
        torch.testing.assert_close(model.net(sample, t).sample, expected, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys
    assert model.net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.set_float32_matmul_precision("highest")


def test_learning_rate_scaling_rules():
    from diffusion_lab.runs.performance import effective_batch_size, scaled_learning_rate

    assert effective_batch_size(16, 2, 4) == 128
    assert scaled_learning_rate(1e-4, 128, 32, "linear") == pytest.approx(4e-4)
    assert scaled_learning_rate(1e-4, 128, 32, "sqrt") == pytest.approx(2e-4)
    assert scaled_learning_rate(1e-4, 128, 32, None) == 1e-4
    with pytest.raises(ValueError, match="valid: null, linear, sqrt"):
        scaled_learning_rate(1e-4, 128, 32, "cubic")


def test_a_class_conditional_export_runs_through_from_pretrained_with_labels(compose_config, tmp_path):
    """The folder alone (its pipeline.py, hence `trust_remote_code=True`), loaded by diffusers: labels work."""
    from diffusers import DiffusionPipeline

    from diffusion_lab.families.export import write_pipeline

    model, _ = _tiny_model(compose_config, "model.net.num_class_embeds=10")
    write_pipeline(tmp_path / "pipeline", [model.net], model.save_pipeline)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipeline", trust_remote_code=True)
    assert type(pipeline).__name__ == "ClassConditionalDDPMPipeline"

    def run(labels):
        generator = torch.Generator().manual_seed(0)
        return pipeline(
            class_labels=labels, num_inference_steps=3, generator=generator, output_type="pt"
        ).images

    images = run([0, 7])
    assert images.shape == (2, 1, 8, 8) and ((images >= 0) & (images <= 1)).all()
    assert not torch.equal(run([0, 7]), run([3, 3]))  # same noise, other labels: other images
    with pytest.raises(ValueError, match="0..9"):
        pipeline(class_labels=[10], num_inference_steps=1)


def test_the_sample_command_loads_a_class_conditional_export(compose_config, tmp_path):
    from diffusion_lab.families import load_sampler
    from diffusion_lab.families.export import write_pipeline
    from diffusion_lab.generation import SampleSettings

    model, _ = _tiny_model(compose_config, *DDPM_LINEAR, "model.net.num_class_embeds=10")  # sampled with DDIM
    write_pipeline(tmp_path / "pipeline", [model.net], model.save_pipeline)
    (tmp_path / "pipeline" / "pipeline.py").write_text("raise RuntimeError('the folder code ran')\n")
    sampler, details = load_sampler(
        pretrained=str(tmp_path / "pipeline")
    )  # our class: the folder's code is not run
    assert details["pipeline_class"] == "ClassConditionalDDPMPipeline" and sampler.num_classes == 10
    images = sampler.generate(
        [0, 1], SampleSettings(scheduler="ddim", num_inference_steps=2), class_labels=[2, 5]
    )
    assert images.shape == (2, 1, 8, 8)
