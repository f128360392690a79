"""EMA: averages only the trainable net, only on optimizer steps, and swaps back cleanly."""

import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.callbacks import EMA
from tests.conftest import TINY, bare_trainer


def _fit(compose_config, callback, *overrides, max_steps=2):
    cfg = compose_config(*TINY, *overrides)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    trainer = bare_trainer(
        max_steps, callbacks=[callback], accumulate_grad_batches=int(cfg.trainer.accumulate_grad_batches)
    )
    trainer.fit(model, datamodule=data)
    return model, trainer


def test_ema_counts_optimizer_steps_not_micro_batches(compose_config):
    ema = EMA(decay=0.9)
    model, trainer = _fit(compose_config, ema, "trainer.accumulate_grad_batches=2", max_steps=3)
    assert trainer.global_step == 3
    assert ema.ema.optimization_step == 3
    assert len(ema.ema.shadow_params) == len(list(model.net.parameters()))


def test_averaged_weights_are_swapped_in_and_out(compose_config):
    ema = EMA(decay=0.5)
    model, _ = _fit(compose_config, ema, max_steps=4)
    raw = [p.detach().clone() for p in model.net.parameters()]
    assert any(not torch.equal(r, s) for r, s in zip(raw, ema.ema.shadow_params, strict=True))
    with ema.averaged_weights(model):
        for parameter, shadow in zip(model.net.parameters(), ema.ema.shadow_params, strict=True):
            assert torch.equal(parameter, shadow)
    for parameter, before in zip(model.net.parameters(), raw, strict=True):
        assert torch.equal(parameter, before)


def test_ema_follows_decay(compose_config):
    """With decay 0 the average is the latest weights; a high decay keeps it near the start."""
    follow = EMA(decay=0.0)
    model, _ = _fit(compose_config, follow, max_steps=3)
    for parameter, shadow in zip(model.net.parameters(), follow.ema.shadow_params, strict=True):
        torch.testing.assert_close(parameter, shadow)


class _Module(torch.nn.Module):
    """Just what the EMA callback reads of a LightningModule: the network and the device."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.net = torch.nn.Linear(1, 1, bias=False).to(dtype)
        torch.nn.init.ones_(self.net.weight)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def _steps(ema: EMA, module: _Module, steps: int, weight=None) -> dict[int, float]:
    """Drive the callback through `steps` optimizer steps; the decay used at each update, by step."""
    from types import SimpleNamespace

    ema.on_fit_start(None, module)
    decays = {}
    for step in range(1, steps + 1):
        if weight is not None:
            module.net.weight.data.fill_(weight(step))
        ema.on_train_batch_end(SimpleNamespace(global_step=step), module, None, None, 0)
        if step % ema.update_every == 0:
            decays[step] = ema.ema.cur_decay_value
    return decays


def test_the_average_is_float32_and_follows_a_slow_drift_under_bf16():
    """A bf16 weight drifting 1.0 -> 1.2 over 4,000 steps, decay 0.995: the average reaches it."""
    from diffusers.training_utils import EMAModel

    def drift(step: int) -> float:
        return 1.0 + 0.2 * step / 4000

    ema, module = EMA(decay=0.995), _Module(torch.bfloat16)
    _steps(ema, module, 4000, drift)
    assert ema.ema.shadow_params[0].dtype == torch.float32
    assert ema.ema.shadow_params[0].item() == pytest.approx(1.19, abs=0.01)
    # Negative control: diffusers' EMAModel as it comes, in the weights' bf16, never leaves 1.0.
    parameter = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    plain = EMAModel([parameter], decay=0.995)
    for step in range(1, 4001):
        parameter.data.fill_(drift(step))
        plain.step([parameter])
    assert plain.shadow_params[0].item() == 1.0


def test_bf16_true_training_keeps_a_float32_average_that_moves(compose_config):
    ema = EMA(decay=0.5)
    cfg = compose_config(*TINY)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    start = [
        p.detach().to(torch.bfloat16).float() for p in model.net.parameters()
    ]  # what bf16 training starts from
    bare_trainer(3, callbacks=[ema], precision="bf16-true").fit(model, datamodule=data)
    assert next(model.net.parameters()).dtype == torch.bfloat16
    assert all(shadow.dtype == torch.float32 for shadow in ema.ema.shadow_params)
    assert any(not torch.equal(s, b) for s, b in zip(ema.ema.shadow_params, start, strict=True))


@pytest.mark.parametrize("update_every", [1, 10])
def test_the_warm_up_counts_optimizer_steps_like_ema_pytorch(compose_config, update_every):
    """The flowers recipe's EMA (decay 0.995, power 2/3, 100 steps before averaging; every 10 steps, and every
    step) against ema-pytorch's own `get_current_decay`, the class denoising_diffusion_pytorch trains with."""
    from ema_pytorch import EMA as ReferenceEMA

    cfg = compose_config("experiment=ddpm_flowers_128", f"callbacks.ema.update_every={update_every}")
    ema = instantiate(cfg.callbacks.ema)
    decays = _steps(ema, _Module(), 3000)
    reference = ReferenceEMA(torch.nn.Linear(1, 1), beta=0.995, update_after_step=100, power=2 / 3)
    for step, decay in decays.items():
        reference.step.fill_(step)
        assert decay == pytest.approx(reference.get_current_decay(), abs=1e-6), step
    assert decays[3000] == pytest.approx(0.995)  # reached by step 2,900, as ema-pytorch does
    assert max(s for s, d in decays.items() if d < 0.995) < 2930
