"""The identities of the forward process, checked on random inputs over every beta schedule."""

import pytest
import torch
from diffusers import DDPMScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lab.core import (
    PREDICTION_TYPES,
    min_snr_weights,
    predicted_x0,
    signal_and_noise_scales,
    snr,
    training_target,
)
from diffusion_lab.core.weighting import PREDICTION_TYPES as WEIGHTED_TYPES

SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"]


def _draw(seed: int, batch: int = 4):
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 3, 4, 4, generator=generator, dtype=torch.float64)
    noise = torch.randn(batch, 3, 4, 4, generator=generator, dtype=torch.float64)
    return x0, noise


@settings(max_examples=40, deadline=None)
@given(
    schedule=st.sampled_from(SCHEDULES),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    zero_snr=st.booleans(),
    seed=st.integers(0, 2**31),
    t=st.integers(0, 999),
)
def test_x0_and_noise_are_recovered_from_x_t_and_the_target(schedule, prediction_type, zero_snr, seed, t):
    scheduler = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    alphas_cumprod = scheduler.alphas_cumprod.double()
    timesteps = torch.full((4,), t)
    alpha, sigma = (s.double() for s in signal_and_noise_scales(alphas_cumprod, timesteps))
    x0, noise = _draw(seed)
    x_t = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * noise
    target = training_target(prediction_type, x0, noise, alpha, sigma)
    # Each parametrisation is exactly invertible except where it divides by zero.
    if not (prediction_type == "epsilon" and alpha[0] < 1e-6):
        torch.testing.assert_close(
            predicted_x0(prediction_type, x_t, target, alpha, sigma), x0, rtol=1e-6, atol=1e-6
        )


def test_v_target_matches_diffusers_get_velocity():
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    x0, noise = (x.float() for x in _draw(0, batch=8))
    timesteps = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(1))
    alpha, sigma = signal_and_noise_scales(scheduler.alphas_cumprod, timesteps)
    expected = scheduler.get_velocity(x0, noise, timesteps)
    torch.testing.assert_close(training_target("v_prediction", x0, noise, alpha, sigma), expected)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_snr_falls_monotonically_and_is_zero_at_the_end_only_when_asked(schedule, zero_snr):
    scheduler = DDPMScheduler(beta_schedule=schedule, rescale_betas_zero_snr=zero_snr)
    values = snr(scheduler.alphas_cumprod, torch.arange(1000))
    assert torch.all(values[1:] < values[:-1])
    if zero_snr:
        assert values[-1].item() == pytest.approx(0.0, abs=1e-12)
    else:
        assert values[-1].item() > 0  # small (cosine: 2e-9) but not zero


@settings(max_examples=30, deadline=None)
@given(
    snr_value=st.floats(1e-4, 1e4),
    gamma=st.floats(0.5, 20.0),
    prediction_type=st.sampled_from(WEIGHTED_TYPES),
)
def test_min_snr_weight_gives_min_snr_gamma_on_the_x0_error(snr_value, gamma, prediction_type):
    # The MSE of each parametrisation is the x0-MSE times: SNR (epsilon), SNR + 1 (v), 1 (sample), and for the
    # flow velocity 1 / t^2 where t = 1 / (1 + sqrt(SNR)) (x0 = x_t - t v).
    t = 1 / (1 + snr_value**0.5)
    factor = {
        "epsilon": snr_value,
        "v_prediction": snr_value + 1.0,
        "sample": 1.0,
        "flow_prediction": 1 / t**2,
    }[prediction_type]
    weight = min_snr_weights(torch.tensor([snr_value], dtype=torch.float64), gamma, prediction_type)
    assert weight.item() * factor == pytest.approx(min(snr_value, gamma), rel=1e-9)


def test_min_snr_weights_stay_finite_at_zero_terminal_snr():
    values = torch.tensor([0.0, 1.0, 100.0])
    assert min_snr_weights(values, 5.0, "epsilon").tolist() == [1.0, 1.0, pytest.approx(0.05)]
    assert min_snr_weights(values, 5.0, "v_prediction").tolist() == [0.0, 0.5, pytest.approx(5.0 / 101.0)]
    assert min_snr_weights(values, None, "epsilon").tolist() == [1.0, 1.0, 1.0]
    clean_and_noise = torch.tensor([float("inf"), 0.0])  # flow's t = 0 and t = 1
    assert min_snr_weights(clean_and_noise, 5.0, "flow_prediction").tolist() == [0.0, 0.0]
    assert min_snr_weights(clean_and_noise, float("inf"), "flow_prediction").tolist() == [1.0, 0.0]


def test_unknown_prediction_type_is_named():
    with pytest.raises(ValueError, match="epsilon"):
        training_target("x0", torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1))
