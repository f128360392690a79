"""Preservation (issue 25): prior preservation with class pictures the base generates once (keyed, resumable), and
output preservation, the LoRA pulled toward the base's own prediction on the class prompt, with none."""

import functools

import numpy as np
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


# ---- prior preservation -----------------------------------------------------------------------------------

from diffusion_lab.models.preservation import PriorPreservation  # noqa: E402


def _prior(tmp_path, **overrides) -> PriorPreservation:
    settings = dict(class_prompt=CLASS_PROMPT, num_class_images=5, class_dir=str(tmp_path / "class"),
                    resolution=32, num_inference_steps=2, guidance_scale=2.0, sample_batch_size=2)  # fmt: skip
    return PriorPreservation(**{**settings, **overrides})


def test_class_images_are_generated_once_reused_and_regenerated_when_the_prompt_changes(
    tiny_sd, tmp_path, monkeypatch
):
    import diffusion_lab.models.preservation as preservation

    loads = []
    real = preservation.load_sampler
    monkeypatch.setattr(preservation, "load_sampler", lambda **kw: loads.append(kw) or real(**kw))
    prior = _prior(tmp_path)
    folder = prior.generate(str(tiny_sd), None, "cpu")
    assert sorted(p.name for p in folder.iterdir()) == [f"{k:05d}.png" for k in range(5)] and len(loads) == 1
    assert prior.generate(str(tiny_sd), None, "cpu") == folder and len(loads) == 1  # reused: no model loaded
    other = _prior(tmp_path, class_prompt="a handwritten number").generate(str(tiny_sd), None, "cpu")
    assert other != folder and len(loads) == 2
    more = _prior(tmp_path, num_class_images=7)
    assert more.generate(str(tiny_sd), None, "cpu") == folder and len(list(folder.iterdir())) == 7


def test_a_generation_killed_part_way_resumes_with_the_missing_images_only(tiny_sd, tmp_path, monkeypatch):
    import diffusion_lab.models.preservation as preservation

    straight = _prior(tmp_path / "straight").generate(str(tiny_sd), None, "cpu")
    saved, real_save = [], preservation.save_image

    def dying_save(image, path):
        if len(saved) == 3:
            raise KeyboardInterrupt  # a Ctrl-C after three pictures
        saved.append(path)
        return real_save(image, path)

    monkeypatch.setattr(preservation, "save_image", dying_save)
    prior = _prior(tmp_path / "killed")
    with pytest.raises(KeyboardInterrupt):
        prior.generate(str(tiny_sd), None, "cpu")
    folder = prior.folder(str(tiny_sd))
    assert sorted(p.name for p in folder.iterdir()) == ["00000.png", "00001.png", "00002.png"]  # no torn file
    monkeypatch.setattr(
        preservation, "save_image", lambda image, path: saved.append(path) or real_save(image, path)
    )
    prior.generate(str(tiny_sd), None, "cpu")
    assert [p.name for p in saved[3:]] == ["00003.png", "00004.png"]  # only the missing ones, once
    for k in range(5):  # the same pictures as a generation that was never interrupted
        assert (folder / f"{k:05d}.png").read_bytes() == (straight / f"{k:05d}.png").read_bytes()


def test_a_prior_loss_weight_of_zero_trains_exactly_as_instance_only(tiny_sd, tmp_path):
    def data():
        return DigitsDataModule(
            image_size=32, channels=3, batch_size=4, caption_template="a handwritten digit {label}"
        )

    prior = _prior(tmp_path, prior_loss_weight=0.0)
    prior.generate(str(tiny_sd), None, "cpu")
    torch.manual_seed(
        0
    )  # the LoRA's A starts random: the same for both, as seed_everything makes it in a run
    with_zero = _model(tiny_sd, objective=None, preservation=prior)
    torch.manual_seed(0)
    alone = _model(tiny_sd, objective=None, preservation=None)
    for model in (with_zero, alone):
        bare_trainer(3).fit(model, datamodule=data())
    for key, value in alone.net.state_dict().items():
        assert torch.equal(with_zero.net.state_dict()[key], value), key
    torch.manual_seed(0)
    weighted = _model(tiny_sd, objective=None, preservation=_prior(tmp_path, prior_loss_weight=1.0))
    bare_trainer(3).fit(weighted, datamodule=data())
    assert any(not torch.equal(weighted.net.state_dict()[k], v) for k, v in alone.net.state_dict().items())


@pytest.mark.parametrize("family", ["sdxl", "flux", "z_image"])
def test_both_terms_train_every_latent_family(family, request, tmp_path):
    """SDXL (micro-conditioning for the square class pictures), Flux (its own pipeline generating them) and
    Z-Image take both terms as SD and SD3 do."""
    folder = request.getfixturevalue(f"tiny_{family}")
    flow = {} if family == "sdxl" else {"objective": functools.partial(FlowMatching, timesteps=LogitNormal())}
    prior = _prior(tmp_path, num_class_images=2, guidance_scale=1.0)
    for term in (prior, OutputPreservation(CLASS_PROMPT)):
        model = _model(folder, **{**flow, "objective": flow.get("objective")}, preservation=term)
        losses: list = []

        def log(name, value, losses=losses, **kwargs):
            losses.append((name, float(value)))

        model.log = log
        if term is prior:
            prior.generate(str(folder), None, "cpu")
        bare_trainer(2).fit(model, datamodule=DigitsDataModule(image_size=32, channels=3, batch_size=2,
                                                               caption_template="a handwritten digit {label}"))  # fmt: skip
        kept = [value for name, value in losses if name == "train/preservation_loss"]
        assert len(kept) == 2 and all(np.isfinite(kept))
