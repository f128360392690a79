"""Masked loss (issue 25): per-pixel weights from a mask, a floor for the unmasked part, and normalisation by area."""

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from diffusion_lab.core import DDPM, FlowMatching
from diffusion_lab.core.loss_mask import LossMask
from diffusion_lab.core.timesteps import LogitNormal
from diffusion_lab.core.weighting import MinSNR
from diffusion_lab.errors import ConfigError

OBJECTIVES = {
    "ddpm_epsilon": lambda: DDPM(DDPMScheduler()),
    "ddpm_v_min_snr": lambda: DDPM(DDPMScheduler(prediction_type="v_prediction"), weighting=MinSNR(5.0)),
    "flow_logit_normal": lambda: FlowMatching(FlowMatchEulerDiscreteScheduler(shift=3.0), timesteps=LogitNormal()),
}


class Conv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, t, **kwargs):
        return type("Out", (), {"sample": self.conv(x)})


def _batch():
    torch.manual_seed(0)
    return Conv(), torch.randn(3, 4, 8, 8), [11, 12, 13]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_an_all_ones_mask_equals_the_plain_loss_exactly(name):
    objective, (net, x0, keys) = OBJECTIVES[name](), _batch()
    plain = objective.loss(net, x0, keys)
    ones = torch.ones(3, 1, 64, 64)  # at image resolution: area-averaged to the 8 x 8 latents
    assert torch.equal(objective.loss(net, x0, keys, mask=ones, loss_mask=LossMask()), plain)
    assert torch.equal(objective.loss(net, x0, keys, mask=ones, loss_mask=LossMask(unmasked_weight=0.3)), plain)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_a_zero_region_gets_zero_gradient_and_a_floor_gives_it_some(name):
    objective = OBJECTIVES[name]()
    x0 = torch.randn(2, 4, 8, 8)
    mask = torch.ones(2, 1, 8, 8)
    mask[..., :, :4] = 0  # the left half does not count
    prediction = torch.zeros(2, 4, 8, 8, requires_grad=True)
    net = lambda x, t, **kwargs: type("Out", (), {"sample": prediction})  # noqa: E731
    objective.loss(net, x0, [1, 2], mask=mask, loss_mask=LossMask()).backward()
    assert prediction.grad[..., :4].abs().max() == 0 and prediction.grad[..., 4:].abs().max() > 0
    prediction.grad = None
    objective.loss(net, x0, [1, 2], mask=mask, loss_mask=LossMask(unmasked_weight=0.1)).backward()
    assert prediction.grad[..., :4].abs().max() > 0


def test_grey_is_a_partial_weight_and_normalising_by_area_removes_the_area():
    error = torch.ones(1, 4, 8, 8)  # the same error everywhere
    loss_mask, normalised = LossMask(), LossMask(normalize_by_area=True)
    per_area = []
    for columns in (2, 4, 8):
        mask = torch.zeros(1, 1, 8, 8)
        mask[..., :columns] = 1
        assert loss_mask.per_image(error, mask).item() == pytest.approx(columns / 8)  # kohya: grows with the area
        per_area.append(normalised.per_image(error, mask).item())
    assert per_area == pytest.approx([1.0, 1.0, 1.0])  # normalised: the same whatever the area
    grey = torch.full((1, 1, 8, 8), 0.5)
    assert loss_mask.per_image(error, grey).item() == pytest.approx(0.5)
    assert LossMask(unmasked_weight=0.2).per_image(error, torch.zeros(1, 1, 8, 8)).item() == pytest.approx(0.2)
    # an image-resolution mask reaches the latents by area: an 8 x 8 block half covered weighs a half
    fine = torch.zeros(1, 1, 64, 64)
    fine[..., :, :4] = 1
    assert loss_mask.weights(fine, (8, 8))[0, 0, 0, 0].item() == pytest.approx(0.5)


def test_a_floor_outside_zero_and_one_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="model.loss_mask.unmasked_weight"):
        LossMask(unmasked_weight=1.5)
