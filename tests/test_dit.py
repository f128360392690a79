"""The DiT / SiT backbone (`model/net=dit`): the paper's initialisation, unconditional and class-conditional use,
position embeddings, and the errors that name the valid choices."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffusion_lab.core import FlowMatching
from diffusion_lab.networks import build_dit


def tiny(**overrides):
    torch.manual_seed(0)
    return build_dit(**{"sample_size": 8, "in_channels": 3, "size": "tiny", "patch_size": 2, **overrides})


def test_adaln_zero_makes_every_block_the_identity_and_the_output_zero_at_initialisation():
    net = tiny()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 900])
    seen = []
    for block in net.transformer_blocks:
        block.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    assert torch.equal(net(x, t).sample, torch.zeros_like(x))
    assert len(seen) == len(net.transformer_blocks)
    for before, after in seen:
        assert torch.equal(before, after)


def test_a_scalar_timestep_serves_the_batch_and_an_unconditional_net_needs_no_labels():
    net = tiny()
    with torch.no_grad():  # move off the zero init so outputs depend on t
        for parameter in net.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    x = torch.randn(3, 3, 8, 8)
    assert torch.allclose(net(x, 500).sample, net(x, torch.full((3,), 500)).sample)
    conditional = tiny(num_class_embeds=10)
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x, 500)
    assert conditional(x, 500, class_labels=torch.tensor([0, 4, 9])).sample.shape == x.shape


def test_learned_position_embeddings_are_trained_and_sincos_ones_are_fixed():
    learned, fixed = tiny(position_embedding="learned"), tiny()
    assert isinstance(learned.pos_embed.pos_embed, torch.nn.Parameter)
    assert torch.equal(learned.pos_embed.pos_embed, fixed.pos_embed.pos_embed)  # starts at the sin-cos values
    assert "pos_embed.pos_embed" not in dict(fixed.named_parameters())
    with torch.no_grad():
        learned.proj_out_2.weight.normal_()
    learned(torch.randn(2, 3, 8, 8), 100).sample.square().mean().backward()
    assert learned.pos_embed.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "named"),
    [({"size": "M"}, "tiny, S, B, L, XL"), ({"patch_size": 3}, "[1, 2, 4, 8]"),
     ({"position_embedding": "rope"}, "sincos")],
)  # fmt: skip
def test_a_wrong_size_patch_or_embedding_names_the_choices(overrides, named):
    with pytest.raises(ValueError, match=named.replace("[", r"\[")):
        tiny(**overrides)


@pytest.mark.parametrize(
    ("overrides", "labels"),
    [({"num_class_embeds": 10}, [1, 7]), ({"position_embedding": "learned"}, None)],
    ids=["class-conditional, stock network", "learned positions, diffusion_lab network"],
)
def test_the_exported_folder_loads_in_diffusers_and_draws_what_the_sampler_draws(tmp_path, overrides, labels):
    from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline

    from diffusion_lab.families import ModelParts, family_named
    from diffusion_lab.generation import SampleSettings

    net = tiny(**overrides).eval()
    with torch.no_grad():  # a trained-looking network: the zero init would draw noise alone
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    family, scheduler = family_named("dit"), DDPMScheduler()
    family.save_pipeline(ModelParts(net, scheduler), tmp_path)
    ours = family.sampler(ModelParts(net, scheduler)).generate(
        [3, 4], SampleSettings(scheduler="ddim", num_inference_steps=3), class_labels=labels
    )
    pipeline = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    pipeline.scheduler = DDIMScheduler.from_config(scheduler.config)
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in (3, 4)]
    arguments = {"class_labels": labels} if labels else {"num_images": 2}
    theirs = pipeline(**arguments, generator=generators, num_inference_steps=3, output_type="pt").images
    torch.testing.assert_close(((ours + 1) / 2).clamp(0, 1), theirs, atol=1e-5, rtol=0)
    # and the family reads the folder back as the network it exported, weights and all
    loaded = family.parts_from_pipeline(family.load_pipeline(str(tmp_path))).net

    def settings(model):
        return {key: value for key, value in model.config.items() if not key.startswith("_")}

    assert type(loaded) is type(net) and settings(loaded) == settings(net)
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_the_exported_pipeline_runs_with_the_flow_scheduler_it_was_trained_with(tmp_path):
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from diffusion_lab.families import ModelParts, family_named

    family_named("dit").save_pipeline(ModelParts(tiny().eval(), FlowMatchEulerDiscreteScheduler()), tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    images = pipeline(num_images=2, num_inference_steps=2, output_type="pt").images
    assert images.shape == (2, 3, 8, 8) and images.min() >= 0 and images.max() <= 1


def test_a_tiny_dit_overfits_eight_images():
    torch.manual_seed(0)
    net = build_dit(8, 3, "tiny", 2)
    objective = FlowMatching(FlowMatchEulerDiscreteScheduler())
    images = torch.rand(8, 3, 8, 8) * 2 - 1
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(100):  # the same keys every step: the same noise and levels, which it can memorise
        loss = objective.loss(net, images, list(range(8)))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.1 * first, (first, last)


def test_ddp_on_two_cpu_processes_trains_a_dit_with_sra_as_one_process_does(tmp_path):
    """Two ranks of half the batch each end on one process's weights: the DiT, SRA's projector (in the graph at
    zero after its stop step) and the EMA teacher all stay in step."""
    from tests.test_commands import cli
    from tests.test_families import run

    common = ["debug=fast", "data.image_size=8", "model/net=dit", "model.net.size=tiny", "model/alignment=sra",
              "model.alignment.student_block=2", "model.alignment.teacher_block=4",
              "model.alignment.projector_width=16", "model.alignment.stop_step=2", "trainer.max_steps=3",
              "val_every_n_steps=100", "callbacks.model_checkpoint.every_n_train_steps=3",
              "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false",
              f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    run("train", *common, "trainer=cpu", "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}")
    cli("train", *common, "trainer=ddp_cpu", "data.batch_size=4", f"hydra.run.dir={tmp_path / 'two'}")
    one, two = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=False) for run in ("one", "two")
    )
    assert two["global_step"] == one["global_step"] == 3
    assert any(key.startswith("alignment.projector.") for key in two["state_dict"])
    for name, value in two["state_dict"].items():
        torch.testing.assert_close(value, one["state_dict"][name], atol=2e-5, rtol=1e-4, msg=name)


def test_the_latent_dit_keeps_its_vae_frozen_and_out_of_checkpoints_and_names_the_latent_size(compose_config):
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from diffusion_lab.errors import ConfigError

    cfg = compose_config("experiment=dit_latent_tiny")
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    vae = model.encoder.vae
    assert not [key for key in model.state_dict() if "vae" in key or "encoder" in key]
    assert not any(parameter.requires_grad for parameter in vae.parameters())
    batch = {
        "pixels": torch.rand(2, 3, 32, 32) * 2 - 1,
        "label": torch.tensor([3, 7]),
        "index": torch.arange(2),
    }
    x0 = model.clean_inputs(batch, [0, 1])
    assert x0.shape == (2, 4, 16, 16)  # the tiny VAE halves each side
    model.objective.loss(model.net, x0, [0, 1], **model.conditioning(batch)).backward()
    assert all(parameter.grad is None for parameter in vae.parameters())
    wrong = instantiate(compose_config("experiment=dit_latent_tiny", "model.net.sample_size=8").model)
    with pytest.raises(ConfigError, match="set model.net.sample_size=16"):
        wrong.clean_inputs(batch, [0, 1])
    ddpm = ["experiment=dit_latent_tiny", "model/objective=ddpm", "model/noise_scheduler=ddpm_linear"]
    with pytest.raises(
        InstantiationException, match="clip_sample=false"
    ):  # clipping x0 to [-1, 1] clips latents
        instantiate(compose_config(*ddpm).model)
    assert not instantiate(
        compose_config(*ddpm, "model.noise_scheduler.clip_sample=false").model
    ).noise_scheduler.config.clip_sample


def test_a_latent_dit_with_the_text_to_image_latent_cache_is_refused(capsys, tmp_path):
    from tests.test_renamed import refused

    output = refused(
        capsys, "train", "experiment=dit_latent_tiny", "latent_cache=disk", f"hydra.run.dir={tmp_path}"
    )
    assert "latent_cache=disk with model=latent_dit" in output


def test_the_latent_export_is_a_stock_dit_pipeline_that_draws_what_sample_draws(tmp_path):
    from diffusers import DiTPipeline

    from diffusion_lab.families import ModelParts, family_named
    from diffusion_lab.families.sd_parts import load_vae
    from diffusion_lab.families.tiny import ensure_tiny_vae
    from diffusion_lab.generation import SampleSettings

    vae = load_vae(ensure_tiny_vae(tmp_path / "tiny-sd", sample_size=16))
    net = tiny(sample_size=8, in_channels=4, num_class_embeds=10).eval()
    with torch.no_grad():  # a trained-looking network: the zero init would draw noise alone
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    family, parts = (
        family_named("dit_latent"),
        ModelParts(net, FlowMatchEulerDiscreteScheduler(), {"vae": vae}),
    )
    family.save_pipeline(parts, tmp_path / "export")
    ours = family.sampler(parts).generate([3, 4], SampleSettings(num_inference_steps=3), class_labels=[5, 9])
    pipeline = DiTPipeline.from_pretrained(tmp_path / "export")  # stock diffusers, as a user loads it
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in (3, 4)]
    theirs = pipeline(class_labels=[5, 9], guidance_scale=1.0, generator=generators, num_inference_steps=3,
                      output_type="pt").images  # fmt: skip
    assert theirs.shape == (2, 3, 16, 16)
    torch.testing.assert_close(((ours + 1) / 2).clamp(0, 1), theirs, atol=1e-5, rtol=0)


def test_a_latent_dit_resumed_on_another_vae_is_refused(capsys, tmp_path):
    from tests.test_families import run
    from tests.test_renamed import refused

    common = ["experiment=dit_latent_tiny", "data.batch_size=4", "callbacks.progress_bar.refresh_rate=0",
              "callbacks.sample_grid.num_images=2", "callbacks.sample_grid.num_inference_steps=1",
              f"hydra.run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    run("train", *common, "trainer.max_steps=1")
    other = ["model.vae._target_=diffusion_lab.families.tiny.ensure_tiny_vae", f"model.vae.out_dir={tmp_path / 'other'}",
             "model.vae.seed=1"]  # fmt: skip
    output = refused(capsys, "train", *common, *other, "trainer.max_steps=2", "ckpt_path=last")
    assert "is another VAE" in output and "resume with model.vae=" in output
