"""EMA: averages only the trainable net, only on optimizer steps, and swaps back cleanly."""

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


def test_an_ema_target_that_is_not_a_network_is_named(compose_config):
    import pytest

    with pytest.raises(
        ValueError, match=r"callbacks.ema.target='unet' is not a network of the model; it has \['net'"
    ):
        _fit(compose_config, EMA(target="unet"))
