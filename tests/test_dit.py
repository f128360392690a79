"""The DiT / SiT backbone (`model/net=dit`): the paper's initialisation, unconditional and class-conditional use,
position embeddings, and the errors that name the valid choices."""

import pytest
import torch

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
