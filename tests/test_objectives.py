"""Objectives, timestep samplers and loss weightings: their identities, densities and formulas; the DDPM
config (the default until issue 22) trains exactly what it trained before objectives existed; samplers follow
the objective."""

import math

import diffusers
import pytest
import torch
from hydra.utils import instantiate
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lab.core import DDPM, FlowMatching, sample_keys
from diffusion_lab.core import timesteps as samplers
from diffusion_lab.core import weighting as weightings
from diffusion_lab.core.schedulers import scheduler_from_name
from diffusion_lab.errors import ConfigError
from tests.conftest import DDPM_LINEAR, TINY

KEYS = sample_keys(0, 0, torch.arange(4000))


def _objectives():
    yield DDPM(diffusers.DDPMScheduler(prediction_type="epsilon"))
    yield DDPM(diffusers.DDPMScheduler(prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2"))
    yield DDPM(diffusers.DDPMScheduler(prediction_type="sample"))
    yield FlowMatching(diffusers.DDPMScheduler())
    yield FlowMatching(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))


# ---- identities ---------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), objective_index=st.integers(0, 4))
def test_x0_is_recovered_from_x_t_and_the_true_target(seed, objective_index):
    objective = list(_objectives())[objective_index]
    generator = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(6, 3, 4, 4, generator=generator), torch.randn(6, 3, 4, 4, generator=generator)
    times = objective.draw_times(sample_keys(seed, 0, torch.arange(6)), (3, 4, 4), "cpu")
    if objective.prediction_type == "epsilon":  # x0 = (x_t - sigma eps) / alpha is undefined where alpha -> 0
        times = times.clamp(max=900)
    x_t = objective.noisy(x0, noise, times)
    recovered = objective.predicted_x0(x_t, objective.target(x0, noise, times), times)
    torch.testing.assert_close(recovered, x0, rtol=1e-3, atol=2e-3)


def test_flow_matching_interpolates_and_targets_the_velocity_by_hand():
    objective = FlowMatching(diffusers.DDPMScheduler())
    x0, noise, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0.0, 0.25, 1.0])
    x_t = objective.noisy(x0, noise, t)
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], 0.75 * x0[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[2], noise[2])
    torch.testing.assert_close(objective.target(x0, noise, t), noise - x0)
    assert objective.network_timesteps(t).tolist() == [0.0, 250.0, 1000.0]  # sigma * T, as diffusers feeds it


def test_the_flow_shift_maps_training_draws_as_the_scheduler_maps_its_sigmas():
    plain = FlowMatching(diffusers.DDPMScheduler())
    shifted = FlowMatching(diffusers.DDPMScheduler(), shift=3.0)
    t = plain.draw_times(KEYS[:50], (3, 8, 8), "cpu")
    torch.testing.assert_close(shifted.draw_times(KEYS[:50], (3, 8, 8), "cpu"), 3 * t / (1 + 2 * t))
    assert isinstance(shifted.noise_scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    assert shifted.noise_scheduler.config.shift == 3.0
    unshifted = diffusers.FlowMatchEulerDiscreteScheduler(shift=1.0).sigmas
    torch.testing.assert_close(shifted.noise_scheduler.sigmas, 3 * unshifted / (1 + 2 * unshifted))


def test_the_loss_of_a_zero_network_is_the_mean_square_of_the_hand_computed_target():
    class Zero(torch.nn.Module):
        def forward(self, sample, timestep, **kwargs):
            return type("Output", (), {"sample": torch.zeros_like(sample)})

    objective = FlowMatching(diffusers.DDPMScheduler(), timesteps=samplers.LogitNormal())
    x0 = torch.randn(5, 2, 4, 4)
    keys = sample_keys(1, 2, torch.arange(5))
    loss = objective.loss(Zero(), x0, keys)
    from diffusion_lab.core import keyed_normal

    noise = keyed_normal(keys, (2, 4, 4), "cpu")
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())


# ---- timestep densities ------------------------------------------------------------------------------
QUANTILES = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])


def _normal_quantile(q: torch.Tensor) -> torch.Tensor:
    return math.sqrt(2) * torch.erfinv(2 * q - 1)


@pytest.mark.parametrize(
    ("sampler", "expected_quantiles"),
    [
        (samplers.Uniform(), QUANTILES),
        (samplers.LogitNormal(0.0, 1.0), torch.sigmoid(_normal_quantile(QUANTILES))),
        (samplers.LogitNormal(0.5, 0.6), torch.sigmoid(0.5 + 0.6 * _normal_quantile(QUANTILES))),
        # t = f(u) decreases in u for mode: its q-quantile is f(1 - q) (arXiv:2403.03206 eq. 20).
        (
            samplers.Mode(1.29),
            (lambda u: 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))(1 - QUANTILES),
        ),
        (samplers.CosMap(), 1 - 1 / (torch.tan(math.pi * QUANTILES / 2) + 1)),
        # 16 x 16 inputs at base 8: shift 2 (arXiv:2403.03206 eq. 23).
        (samplers.Shift(base_size=8), 2 * QUANTILES / (1 + QUANTILES)),
    ],
    ids=["uniform", "logit_normal", "logit_normal_shifted", "mode", "cosmap", "shift"],
)
def test_each_timestep_sampler_draws_its_density(sampler, expected_quantiles):
    t = sampler.fractions(KEYS, (3, 16, 16), "cpu")
    assert t.shape == (len(KEYS),) and t.min() >= 0 and t.max() <= 1
    torch.testing.assert_close(torch.quantile(t, QUANTILES), expected_quantiles.float(), atol=0.02, rtol=0)
    assert torch.equal(t, sampler.fractions(KEYS, (3, 16, 16), "cpu"))  # keyed: the same keys, the same draws
    steps = sampler.indices(KEYS, (3, 16, 16), 1000, "cpu")
    assert steps.dtype == torch.int64 and steps.min() >= 0 and steps.max() < 1000
    assert abs(steps.float().mean().item() / 1000 - t.mean().item()) < 0.02


def test_an_images_timestep_does_not_depend_on_its_batch():
    sampler = samplers.LogitNormal()
    whole = sampler.fractions(KEYS[:8], (3, 8, 8), "cpu")
    assert torch.equal(whole[4:], sampler.fractions(KEYS[4:8], (3, 8, 8), "cpu"))


def test_a_sampler_outside_its_range_is_refused():
    with pytest.raises(ConfigError, match=r"model.objective.timesteps.scale must lie in \[-1, 1.7519\]"):
        samplers.Mode(2.0)
    with pytest.raises(ConfigError, match="model.objective.timesteps.std must be positive"):
        samplers.LogitNormal(0.0, 0.0)


# ---- weightings ----------------------------------------------------------------------------------------
def test_each_weighting_follows_its_formula_on_flow_noise_levels():
    t = torch.tensor([0.1, 0.3, 0.5, 0.9])
    levels = FlowMatching(diffusers.DDPMScheduler()).noise_levels(t)
    torch.testing.assert_close(levels.snr, ((1 - t) / t) ** 2)
    torch.testing.assert_close(levels.sigma, t)
    assert torch.equal(weightings.NoWeighting()(levels), torch.ones(4))
    # Each literature weighting is on the x0 error, and the x0 error is t^2 times the velocity's: x0 = x_t - t v.
    torch.testing.assert_close(
        weightings.SigmaSqrt()(levels), torch.ones(4)
    )  # diffusers' preconditioned SD3 loss
    torch.testing.assert_close(weightings.CosMap()(levels), 2 / (math.pi * (1 - 2 * t + 2 * t**2)) * t**2)
    torch.testing.assert_close(
        weightings.MinSNR(5.0)(levels), torch.minimum(levels.snr, torch.tensor(5.0)) * t**2
    )
    at_clean = FlowMatching(diffusers.DDPMScheduler()).noise_levels(torch.tensor([0.0]))
    assert (
        torch.isfinite(weightings.SigmaSqrt()(at_clean)).all()
        and torch.isfinite(weightings.CosMap()(at_clean)).all()
    )


def test_ddpm_noise_levels_are_the_schedules():
    objective = DDPM(diffusers.DDPMScheduler(prediction_type="v_prediction"))
    steps = torch.tensor([0, 250, 999])
    alpha_bar = objective.noise_scheduler.alphas_cumprod[steps]
    levels = objective.noise_levels(steps)
    torch.testing.assert_close(levels.snr, alpha_bar / (1 - alpha_bar))
    torch.testing.assert_close(levels.sigma, (1 - alpha_bar).sqrt())
    torch.testing.assert_close(
        weightings.MinSNR(5.0)(levels), torch.clamp(levels.snr, max=5.0) / (levels.snr + 1)
    )
    # sigma^-2 on the x0 error is 1 on v's error: SNR + 1 = 1 / sigma^2 for a variance-preserving schedule.
    torch.testing.assert_close(weightings.SigmaSqrt()(levels), torch.ones(3), rtol=1e-4, atol=1e-4)


def test_a_checkpoints_scheduler_description_keeps_a_value_diffusers_had_listed_as_default():
    """SD 1.5's scheduler lists prediction_type among its defaults: a v-prediction fine-tune described and
    rebuilt from the checkpoint must stay v-prediction (else it samples and exports as epsilon)."""
    from diffusion_lab.families.checkpoints import describe_components, rebuild_component

    scheduler = diffusers.DDPMScheduler()
    assert "prediction_type" in scheduler.config["_use_default_values"]
    scheduler.register_to_config(prediction_type="v_prediction")
    description = describe_components(noise_scheduler=scheduler)["noise_scheduler"]
    assert rebuild_component(description).config.prediction_type == "v_prediction"
    old_style = {**description, "config": dict(scheduler.config)}  # written before: with the defaults list
    assert rebuild_component(old_style).config.prediction_type == "v_prediction"


def test_resuming_under_another_objective_is_refused(compose_config, tmp_path):
    from diffusion_lab.commands.resume import check_same_objective
    from diffusion_lab.families.checkpoints import describe_components

    flow = instantiate(
        compose_config(*TINY, "model/objective=flow_matching", "model/noise_scheduler=flow_match").model
    )
    ddpm_checkpoint = {"diffusers_components": describe_components(noise_scheduler=diffusers.DDPMScheduler())}
    with pytest.raises(
        ConfigError, match="trained with model/objective=ddpm; this config has model/objective=flow_matching"
    ):
        check_same_objective(tmp_path / "x.ckpt", ddpm_checkpoint, flow)
    flow_checkpoint = {"diffusers_components": describe_components(noise_scheduler=flow.noise_scheduler)}
    check_same_objective(tmp_path / "x.ckpt", flow_checkpoint, flow)


# ---- DDPM is what it was -------------------------------------------------------------------------------
def _loss_before_objectives(net, noise_scheduler, x0, keys):
    """`core.loss.diffusion_loss` and the keyed draws as they were before this module existed (verbatim)."""
    import torch.nn.functional as F

    generators = [torch.Generator().manual_seed(k ^ 0x5A5A5A5A) for k in keys]
    timesteps = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in generators])
    generators = [torch.Generator().manual_seed(k) for k in keys]
    noise = torch.stack(
        [torch.randn(tuple(x0.shape[1:]), generator=g, dtype=torch.float32) for g in generators]
    )
    noisy = noise_scheduler.add_noise(x0, noise, timesteps)
    prediction = net(noisy, timesteps).sample
    per_image = F.mse_loss(prediction.float(), noise.float(), reduction="none").flatten(1).mean(dim=1)
    return (per_image * torch.ones_like(per_image)).mean()


def test_the_ddpm_config_trains_bit_identically_to_before(compose_config):
    """Same seed, same weights: three optimizer steps of the DDPM objective (the default before issue 22)
    against the pre-objective loss."""
    torch.manual_seed(0)
    model = instantiate(compose_config(*TINY, *DDPM_LINEAR).model)
    assert isinstance(model.objective, DDPM) and isinstance(model.objective.timesteps, samplers.Uniform)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    reference = instantiate(compose_config(*TINY, *DDPM_LINEAR).model)
    reference.net.load_state_dict(before)
    model.log = lambda *args, **kwargs: None
    optimizers = [torch.optim.AdamW(m.net.parameters(), lr=1e-3) for m in (model, reference)]
    for step in range(3):
        x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(step))
        batch = {"pixels": x0, "index": torch.arange(4) + 4 * step}
        keys = sample_keys(model.noise_seed, 0, batch["index"])  # global_step is 0 outside a Trainer
        losses = [
            model.training_step(batch, step),
            _loss_before_objectives(reference.net, reference.noise_scheduler, x0, keys),
        ]
        assert torch.equal(losses[0], losses[1])
        for optimizer, loss in zip(optimizers, losses, strict=True):
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for name, value in model.net.state_dict().items():
        assert torch.equal(value, reference.net.state_dict()[name]), name
    assert any(not torch.equal(value, before[name]) for name, value in model.net.state_dict().items())


# ---- sampling follows the objective -------------------------------------------------------------------
def test_a_scheduler_that_does_not_fit_the_objective_is_refused_with_those_that_do():
    flow = FlowMatching(diffusers.DDPMScheduler(), shift=2.0).noise_scheduler.config
    for name in ("ddpm", "ddim", "euler-a", "pndm"):
        with pytest.raises(
            ConfigError, match=r"does not fit a flow-matching model.*use one of euler, heun, dpm\+\+, unipc"
        ):
            scheduler_from_name(name, flow)
    built = {name: scheduler_from_name(name, flow) for name in ("euler", "heun", "dpm++", "unipc")}
    assert (
        type(built["euler"]).__name__ == "FlowMatchEulerDiscreteScheduler"
        and built["euler"].config.shift == 2.0
    )
    assert type(built["heun"]).__name__ == "FlowMatchHeunDiscreteScheduler"
    for name in ("dpm++", "unipc"):
        assert built[name].config.use_flow_sigmas and built[name].config.flow_shift == 2.0
        assert built[name].config.prediction_type == "flow_prediction"
    assert type(scheduler_from_name(None, flow)).__name__ == "UniPCMultistepScheduler"  # the flow default
    ddpm = diffusers.DDPMScheduler().config
    assert (
        type(scheduler_from_name("euler", ddpm)).__name__ == "EulerDiscreteScheduler"
    )  # DDPM models: as before
    assert type(scheduler_from_name(None, ddpm)).__name__ == "DDIMScheduler"


def test_every_flow_sampler_integrates_an_exact_velocity_to_the_data():
    """With the true velocity of a single point, each flow sampler lands on it: the sigma and timestep
    conventions of training (x_t = (1 - t) x0 + t eps, timestep t * T) are the samplers' own."""
    from diffusion_lab.core import sample_images

    x0 = torch.randn(1, 2, 4, 4)
    objective = FlowMatching(diffusers.DDPMScheduler(), shift=2.0)

    class Exact(torch.nn.Module):
        def forward(self, sample, timestep, **kwargs):
            t = (torch.as_tensor(timestep, dtype=torch.float32) / 1000).clamp(min=1e-4)
            return type(
                "Output", (), {"sample": (sample - x0) / t}
            )  # eps - x0 with eps = (x_t - (1 - t) x0) / t

    for name in ("euler", "heun", "dpm++", "unipc"):
        scheduler = scheduler_from_name(name, objective.noise_scheduler.config)
        image = sample_images(
            Exact(),
            scheduler,
            1,
            (2, 4, 4),
            num_inference_steps=8,
            generator=torch.Generator().manual_seed(0),
        )
        torch.testing.assert_close(image, x0, atol=5e-3, rtol=0, msg=name)


def test_objectives_build_from_the_config_groups(compose_config):
    cfg = compose_config(*TINY, "model/objective=flow_matching", "model/noise_scheduler=flow_match",
                         "model/objective/timesteps=logit_normal",
                         "model/objective/weighting=min_snr", "model.objective.shift=2.0")  # fmt: skip
    model = instantiate(cfg.model)
    assert isinstance(model.objective, FlowMatching) and model.objective.shift == 2.0
    assert isinstance(model.objective.timesteps, samplers.LogitNormal)
    assert isinstance(model.objective.weighting, weightings.MinSNR)
    assert isinstance(model.noise_scheduler, diffusers.FlowMatchEulerDiscreteScheduler)
    with pytest.raises(ConfigError, match="DDPM-family noise scheduler"):
        DDPM(diffusers.FlowMatchEulerDiscreteScheduler())
