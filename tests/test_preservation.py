"""Output preservation (issue 25): the LoRA pulled toward the base's own prediction on the class prompt, with no
class images."""

import functools

import pytest
import torch

from diffusion_lab.core import FlowMatching
from diffusion_lab.core.random import sample_keys
from diffusion_lab.core.timesteps import LogitNormal
from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.errors import ConfigError
from diffusion_lab.models import LatentDiffusion
from diffusion_lab.models.preservation import OutputPreservation
from tests.conftest import bare_trainer

CLASS_PROMPT = "a handwritten digit"


def _model(folder, **overrides) -> LatentDiffusion:
    settings = dict(
        pretrained=str(folder), optimizer=functools.partial(torch.optim.AdamW), lr=1e-2, lora_rank=4,
        objective=functools.partial(FlowMatching, timesteps=LogitNormal()),
        preservation=OutputPreservation(CLASS_PROMPT, weight=1.0),
    )  # fmt: skip
    return LatentDiffusion(**{**settings, **overrides})


def _batch(model):
    data = DigitsDataModule(
        image_size=32, channels=3, batch_size=4, caption_template="a handwritten digit {label}"
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = data.on_after_batch_transfer(batch, 0)
    keys = sample_keys(0, 0, batch["index"])
    return batch, model.clean_inputs(batch, keys), keys


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_the_term_is_exactly_zero_at_step_zero_and_grows_as_the_lora_moves(family, request):
    model = _model(
        request.getfixturevalue(f"tiny_{family}"), **({"objective": None} if family == "sd" else {})
    )
    batch, x0, keys = _batch(model)
    assert model.preservation.loss(model, batch, x0, keys).item() == 0.0  # LoRA B starts at zero
    bare_trainer(3).fit(model, datamodule=DigitsDataModule(image_size=32, channels=3, batch_size=4,
                                                           caption_template="a handwritten digit {label}"))  # fmt: skip
    assert model.preservation.loss(model, batch, x0, keys).item() > 0


def test_the_base_pass_takes_no_gradient_and_the_lora_comes_back_even_after_an_error(tiny_sd3):
    model = _model(tiny_sd3)
    batch, x0, keys = _batch(model)
    for name, parameter in model.net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)  # a LoRA that has moved
    calls = []
    real = model.family.denoiser

    def recording(net, **options):
        inner = real(net, **options)

        def call(*args, **kwargs):
            calls.append((torch.is_grad_enabled(), net.transformer_blocks[0].attn.to_q.disable_adapters))
            return inner(*args, **kwargs)

        return call

    model.family.denoiser = recording
    try:
        term = model.preservation.loss(model, batch, x0, keys)
    finally:
        del model.family.denoiser
    assert calls == [(False, True), (True, False)]  # the base without gradient, then the LoRA with
    term.backward()
    assert all(
        p.grad is not None for n, p in model.net.named_parameters() if "lora_" in n and p.requires_grad
    )

    def failing(net, **options):
        def call(*args, **kwargs):
            raise RuntimeError("out of memory")

        return call

    model.family.denoiser = failing
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            model.preservation.loss(model, batch, x0, keys)
    finally:
        del model.family.denoiser
    assert not model.net.transformer_blocks[0].attn.to_q.disable_adapters  # restored


def test_output_preservation_needs_a_lora_and_a_prompt(tiny_sd3):
    with pytest.raises(ConfigError, match="model.lora_rank"):
        _model(tiny_sd3, lora_rank=None)
    with pytest.raises(ConfigError, match="preservation_prompt"):
        OutputPreservation(None)
