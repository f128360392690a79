"""SD3 and Flux through the shared latent model: LoRA and full fine-tunes, exports stock diffusers loads (LoRA with
its alpha, and the kohya file), flow targets and Flux's resolution-dependent shift, the prompt and latent caches,
and SD3 without T5. Tiny random checkpoints, CPU, no download."""

import functools

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors.torch import load_file

from diffusion_lab.core import FlowMatching
from diffusion_lab.core.schedulers import scheduler_from_name
from diffusion_lab.core.timesteps import LogitNormal, shift_noise_level
from diffusion_lab.data import LatentCacheDataModule
from diffusion_lab.data.digits import DigitsDataModule
from diffusion_lab.errors import ConfigError
from diffusion_lab.families import LatentEncoder, family_named, load_sampler
from diffusion_lab.families.checkpoints import read_checkpoint
from diffusion_lab.families.lora import KOHYA_FILE, from_kohya, lora_state_dict
from diffusion_lab.generation import SampleSettings
from diffusion_lab.models import LatentDiffusion
from tests.conftest import bare_trainer

CAPTION = "a handwritten digit {label}"
PROMPT = "a handwritten digit 3"


@pytest.fixture(params=["sd3", "flux", "z_image"])
def tiny(request):
    """(family name, its tiny checkpoint folder)."""
    return request.param, request.getfixturevalue(f"tiny_{request.param}")


def _model(folder, **overrides) -> LatentDiffusion:
    settings = dict(
        pretrained=str(folder), optimizer=functools.partial(torch.optim.AdamW), lr=1e-2,
        objective=functools.partial(FlowMatching, timesteps=LogitNormal()), caption_dropout=0.2,
    )  # fmt: skip
    return LatentDiffusion(**{**settings, **overrides})


def _digits(batch_size: int = 4) -> DigitsDataModule:
    return DigitsDataModule(image_size=32, channels=3, batch_size=batch_size, caption_template=CAPTION)


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


def _denoised(model_or_net, family, inputs) -> torch.Tensor:
    """The family's network called as in training on fixed inputs."""
    with torch.no_grad():
        return family.denoiser(model_or_net)(*inputs["args"], **inputs["kwargs"]).sample


def _inputs(model: LatentDiffusion) -> dict:
    generator = torch.Generator().manual_seed(0)
    x_t = torch.randn(2, 16, 16, 16, generator=generator)
    prompts = model.encoder.encode_prompts([PROMPT, ""], "cpu")
    conditioning = model.family.conditioning(prompts, {}, torch.float32, "cpu")
    return {"args": (x_t, torch.tensor([250.0, 750.0])), "kwargs": conditioning}


def test_lora_trains_only_the_adapters_and_leaves_base_and_frozen_parts_bit_identical(tiny):
    name, folder = tiny
    model = _model(
        folder, lora_rank=4, lora_alpha=8, gradient_checkpointing=True
    )  # adapters still get gradients
    assert model.family.name == name and model.net.is_gradient_checkpointing
    frozen_before = {part: _snapshot(getattr(model, part)) for part in model._frozen_modules}
    net_before = _snapshot(model.net)
    bare_trainer(3).fit(model, datamodule=_digits())
    after = model.net.state_dict()
    changed = {key for key, value in net_before.items() if not torch.equal(value, after[key])}
    adapters = {key for key in after if "lora_" in key}
    assert changed and changed <= adapters  # some adapters moved (B starts at zero, so A may wait a step)
    assert any("lora_B" in key for key in changed)
    for part, before in frozen_before.items():
        assert all(
            torch.equal(value, getattr(model, part).state_dict()[key]) for key, value in before.items()
        ), part


def test_the_lora_export_reloads_with_load_lora_weights_and_reproduces_the_checkpoint(tiny, tmp_path):
    name, folder = tiny
    model = _model(folder, lora_rank=4, lora_alpha=16)  # alpha / rank = 4: lost if the file dropped alpha
    trainer = bare_trainer(2)
    trainer.fit(model, datamodule=_digits())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    family = family_named(name)
    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    assert all("lora_" in key for key in checkpoint["state_dict"])  # no frozen weight, no tied alias of one
    parts = family.parts_from_checkpoint(checkpoint)
    exported = model.save_pipeline(tmp_path / "lora")
    pipeline = DiffusionPipeline.from_pretrained(folder)
    pipeline.load_lora_weights(exported)
    inputs = _inputs(model)
    from_checkpoint = _denoised(parts.net, family, inputs)
    reloaded = _denoised(pipeline.transformer, family, inputs)
    torch.testing.assert_close(reloaded, from_checkpoint, rtol=1e-4, atol=1e-6)
    base = _denoised(DiffusionPipeline.from_pretrained(folder).transformer, family, inputs)
    assert (reloaded - base).abs().max() > 1e-4  # the adapters are applied, not dropped

    # the kohya file: the family's prefix, the trained alpha, and back to the same weights
    family.save_kohya(parts, tmp_path / "lora")
    kohya = load_file(str(tmp_path / "lora" / KOHYA_FILE))
    assert all(key.startswith(family.kohya_prefix + "_") for key in kohya)
    assert {float(value) for key, value in kohya.items() if key.endswith(".alpha")} == {16.0}
    back = from_kohya(kohya, parts.net)
    ours = lora_state_dict(parts.net)
    assert back.keys() == ours.keys() and all(torch.equal(back[key], ours[key]) for key in ours)
    if name == "z_image":  # diffusers' own converter reads Z-Image's kohya naming: the same adapter applied
        pipeline = DiffusionPipeline.from_pretrained(folder)
        pipeline.load_lora_weights(str(tmp_path / "lora"), weight_name=KOHYA_FILE)
        torch.testing.assert_close(
            _denoised(pipeline.transformer, family, inputs), from_checkpoint, rtol=1e-4, atol=1e-6
        )


def test_a_unet_kohya_file_loads_in_diffusers_and_applies_the_trained_adapter(tiny_sd, tmp_path):
    """SD's `lora_unet_*` file goes through diffusers' own kohya converter: the UNet output equals ours."""
    model = _model(tiny_sd, objective=None, lora_rank=4, lora_alpha=8)
    bare_trainer(2).fit(model, datamodule=_digits())
    parts = model.parts()
    model.family.save_kohya(parts, tmp_path)
    pipeline = DiffusionPipeline.from_pretrained(tiny_sd)
    pipeline.load_lora_weights(str(tmp_path), weight_name=KOHYA_FILE)
    x_t, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    context = model.encoder.encode_prompts([PROMPT], "cpu").hidden
    with torch.no_grad():
        ours = model.net(x_t, t, encoder_hidden_states=context).sample
        theirs = pipeline.unet(x_t, t, encoder_hidden_states=context).sample
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-6)


def test_a_full_fine_tune_exports_a_stock_pipeline_whose_samples_equal_the_training_grid(tiny, tmp_path):
    """With a prompt cache (the text encoders not part of the model), the export still holds them."""
    name, folder = tiny
    model = _model(folder, prompt_cache=str(tmp_path / "prompts"))
    before = _snapshot(model.net)
    bare_trainer(2).fit(model, datamodule=_digits())
    assert any(not torch.equal(value, model.net.state_dict()[key]) for key, value in before.items())
    exported = model.save_pipeline(tmp_path / "pipeline")
    pipeline = DiffusionPipeline.from_pretrained(exported)
    assert type(pipeline).__name__ in model.family.pipeline_classes
    assert all(
        torch.equal(a, b)
        for a, b in zip(pipeline.transformer.parameters(), model.net.parameters(), strict=True)
    )
    settings = SampleSettings(num_inference_steps=3, guidance_scale=2.0, height=32, width=32)
    grid = model.sampler().generate([5, 6], settings, prompts=[PROMPT, PROMPT])
    sampler, _ = load_sampler(pretrained=str(exported))
    torch.testing.assert_close(
        sampler.generate([5, 6], settings, prompts=[PROMPT, PROMPT]), grid, atol=1e-5, rtol=0
    )


def test_flow_targets_and_noise_levels_stay_in_range(tiny_sd3):
    model = _model(tiny_sd3)
    objective = model.objective
    x0 = torch.randn(64, 16, 16, 16)
    keys = list(range(64))
    times, noise = objective.draws(x0, keys)
    assert times.min() >= 0 and times.max() <= 1
    assert torch.equal(objective.target(x0, noise, times), noise - x0)
    # a network that predicts nothing is charged exactly the velocity's square
    zero = lambda x_t, t, **kwargs: type("Out", (), {"sample": torch.zeros_like(x_t)})  # noqa: E731
    torch.testing.assert_close(objective.loss(zero, x0, keys), ((noise - x0) ** 2).mean())


def test_flux_shifts_training_noise_with_resolution_exactly_as_its_pipeline_samples(tiny_flux):
    model = _model(tiny_flux)
    objective, config = model.objective, model.objective.noise_scheduler.config
    keys = list(range(256))
    for side in (16, 64, 128):  # 64, 1,024 and 4,096 image tokens in 2x2 patches
        tokens = (side // 2) ** 2
        mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                             config.max_shift)  # fmt: skip
        assert objective.shift_for((16, side, side)) == pytest.approx(np.exp(mu))
        fractions = objective.timesteps.fractions(keys, (16, side, side), "cpu")
        drawn = objective.draw_times(keys, (16, side, side), "cpu")
        torch.testing.assert_close(drawn, shift_noise_level(fractions, np.exp(mu)))
        assert drawn.min() >= 0 and drawn.max() <= 1
        # the pipeline's sampler on the same latent size: the same map from uniform levels to sigmas
        scheduler = model.family.sampling_scheduler(model.parts())
        levels = np.linspace(1.0, 1 / 20, 20)
        scheduler.set_timesteps(sigmas=levels, mu=mu)
        expected = shift_noise_level(torch.tensor(levels, dtype=torch.float32), float(np.exp(mu)))
        torch.testing.assert_close(scheduler.sigmas[:-1], expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(ConfigError, match="unipc"):
        scheduler_from_name("unipc", config)


def test_a_cached_run_equals_an_uncached_one_and_never_loads_a_text_encoder(tiny, tmp_path, monkeypatch):
    name, folder = tiny
    uncached = _model(folder, lr=1e-3)
    torch.manual_seed(0)
    bare_trainer(3).fit(uncached, datamodule=_digits())

    def cached_run():
        data = LatentCacheDataModule(
            _digits(), encoder=LatentEncoder(str(folder), text_encoder_dtype="float32"),
            cache_dir=str(tmp_path / "latents"),
        )  # fmt: skip
        model = _model(folder, lr=1e-3, prompt_cache=str(tmp_path / "prompts"), text_encoder_dtype="float32")
        torch.manual_seed(0)
        bare_trainer(3).fit(model, datamodule=data)
        return model

    cached_run()  # the first run fills both caches
    family, loaded = family_named(name), []
    original = type(family).load_frozen
    monkeypatch.setattr(type(family), "load_frozen",
                        lambda self, *args, **kwargs: loaded.append(args[3:4] or kwargs.get("components")) or
                        original(self, *args, **kwargs))  # fmt: skip
    rerun = cached_run()
    assert loaded and all(components in (("vae",), "vae") for components in loaded), loaded
    assert not rerun.encoder.text_loaded and not any("text_encoder" in part for part in rerun._frozen_modules)
    # equal up to float noise: the embeddings are computed in batches of other compositions (CPU kernels differ in
    # the last bits), which Adam's normalised steps carry into the weights at ~1e-5
    for key, value in uncached.net.state_dict().items():
        torch.testing.assert_close(rerun.net.state_dict()[key], value, atol=1e-4, rtol=1e-3)


def test_sd3_trains_and_samples_without_t5_and_flux_refuses_to(tiny_sd3, tiny_flux, tmp_path):
    model = _model(tiny_sd3, use_t5=False)
    assert "text_encoder_3" not in model._frozen_modules
    assert (
        model.encoder.encode_prompts([PROMPT], "cpu").hidden[0, 77:].abs().max() == 0
    )  # zeros in T5's place
    bare_trainer(2).fit(model, datamodule=_digits())
    settings = SampleSettings(num_inference_steps=2, guidance_scale=2.0, height=32, width=32)
    grid = model.sampler().generate([0], settings, prompts=[PROMPT])
    folder = model.save_pipeline(
        tmp_path / "pipeline"
    )  # T5 null in its index: diffusers loads it when told so
    exported = DiffusionPipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)
    assert exported.text_encoder_3 is None and torch.isfinite(grid).all()
    sampler, _ = load_sampler(pretrained=str(tmp_path / "pipeline"))
    torch.testing.assert_close(sampler.generate([0], settings, prompts=[PROMPT]), grid, atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="use_t5"):
        _model(tiny_flux, use_t5=False)


def test_settings_that_do_not_fit_the_family_are_refused_with_the_key(
    tiny_sd, tiny_sd3, tiny_flux, tiny_z_image
):
    with pytest.raises(ConfigError, match="model.max_sequence_length"):
        _model(tiny_sd, max_sequence_length=77)
    with pytest.raises(ConfigError, match="model.training_guidance"):
        _model(tiny_sd3, training_guidance=3.5)
    with pytest.raises(ConfigError, match="model.attention=eager"):
        _model(tiny_sd3, attention="eager")
    with pytest.raises(ConfigError, match="between 1 and 256"):
        _model(tiny_sd3, max_sequence_length=300)
    with pytest.raises(ConfigError, match="only euler"):  # ZImagePipeline sets sigmas the others do not take
        load_sampler(pretrained=str(tiny_z_image))[0].scheduler(SampleSettings(scheduler="unipc"))
    with pytest.raises(ConfigError, match="use_dynamic_shifting=false"):  # Flux's shift follows resolution
        _model(tiny_flux, objective=functools.partial(FlowMatching, shift=2.0))
    _model(tiny_flux, objective=functools.partial(FlowMatching, shift=2.0),
           noise_scheduler={"use_dynamic_shifting": False})  # fmt: skip


def test_qlora_on_an_int8_base_trains_float32_adapters_and_exports_them_for_the_full_precision_base(
    tiny_flux, tmp_path
):
    """model.quantize=int8 (torchao, which runs on a CPU): the base stays quantised and unchanged, only the
    adapters train, in float32; the checkpoint holds the adapters alone and they load on the unquantised base.
    torchao is the `quant` extra, not `dev` (importing it makes diffusers print warnings on every command):
    `pip install -e '.[dev,quant]'` runs this test."""
    pytest.importorskip("torchao")
    model = _model(tiny_flux, lora_rank=4, lora_alpha=4, quantize="int8")
    layer = model.net.transformer_blocks[0].attn.to_q
    assert type(layer.base_layer.weight).__name__ == "Int8Tensor"
    trainable = {name: p for name, p in model.net.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name and p.dtype == torch.float32 for name, p in trainable.items())
    before = {name: p.detach().clone() for name, p in trainable.items()}
    trainer = bare_trainer(2)
    trainer.fit(model, datamodule=_digits())
    assert any(not torch.equal(before[name], p) for name, p in trainable.items())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = read_checkpoint(tmp_path / "last.ckpt")["state_dict"]
    assert saved and all("lora_" in key for key in saved)
    pipeline = DiffusionPipeline.from_pretrained(tiny_flux)
    pipeline.load_lora_weights(model.save_pipeline(tmp_path / "lora"))
    inputs = _inputs(model)
    full_base = _denoised(pipeline.transformer, model.family, inputs)
    x_t, t = inputs["args"]
    quantised = _denoised(model.net, model.family, {**inputs, "args": (x_t.to(torch.bfloat16), t)})
    assert (full_base - quantised.float()).abs().mean() < 0.05 * full_base.abs().mean()  # int8 rounding only


def test_a_bf16_base_trains_float32_adapters_keeps_its_weights_and_draws_from_cached_prompts(tiny, tmp_path):
    """model.base_dtype=bfloat16: the frozen base at half fp32's memory, the adapters in float32, the base's bf16
    weights bit-identical after training, and the grid drawn from float32 cached embeddings (the pipelines take
    their latents' dtype from the embeddings: they are cast to the transformer's)."""
    name, folder = tiny
    model = _model(folder, lora_rank=4, base_dtype="bfloat16", prompt_cache=str(tmp_path / "prompts"))
    base = {name: p.detach().clone() for name, p in model.net.named_parameters() if not p.requires_grad}
    assert {p.dtype for p in base.values()} == {torch.bfloat16}
    trainable = {name: p for name, p in model.net.named_parameters() if p.requires_grad}
    assert {p.dtype for p in trainable.values()} == {torch.float32}
    before = {name: p.detach().clone() for name, p in trainable.items()}
    bare_trainer(2).fit(model, datamodule=_digits())
    assert all(torch.equal(p, dict(model.net.named_parameters())[name]) for name, p in base.items())
    assert any(not torch.equal(before[name], p) for name, p in trainable.items())
    settings = SampleSettings(num_inference_steps=2, guidance_scale=2.0, height=32, width=32)
    assert torch.isfinite(model.sampler().generate([0], settings, prompts=[PROMPT])).all()


def test_quantisation_is_refused_where_it_cannot_apply(tiny_sd, tiny_flux):
    with pytest.raises(ConfigError, match="model.lora_rank"):
        _model(tiny_flux, quantize="int8")  # a full fine-tune cannot step quantised weights
    with pytest.raises(ConfigError, match="choose one of"):
        _model(tiny_flux, lora_rank=4, quantize="fp4")
    with pytest.raises(ConfigError, match="transformer families"):
        _model(tiny_sd, lora_rank=4, quantize="int8")
    with pytest.raises(ConfigError, match="model.lora_rank"):
        _model(tiny_flux, base_dtype="bfloat16")  # a full fine-tune keeps fp32 weights
    with pytest.raises(ConfigError, match="base_dtype null"):
        _model(tiny_flux, lora_rank=4, quantize="int8", base_dtype="bfloat16")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            _model(tiny_flux, lora_rank=4, quantize="nf4")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_bucketed_latents_from_the_cache_train_and_the_model_draws_at_a_bucket_size(name, request, tmp_path):
    """Mixed aspect ratios in buckets of about 32^2 px (32x32, 40x24, 24x40), cached as for SDXL: every batch is
    one bucket; Flux's shift follows each bucket's token count."""
    from diffusion_lab.data import ImageDataModule
    from tests import builders

    folder = request.getfixturevalue(f"tiny_{name}")
    root = builders.write_mixed_aspect_folder(tmp_path / "images")
    images = ImageDataModule(
        path=str(root), streaming=False, label_column="label", caption_template="a photo of a {label} flower",
        image_size=32, bucket_step=8, buckets=True, batch_size=4, num_workers=0, val_size=2,
    )  # fmt: skip
    data = LatentCacheDataModule(images, encoder=LatentEncoder(str(folder), text_encoder_dtype="float32"),
                                 cache_dir=str(tmp_path / "latents"))  # fmt: skip
    model = _model(folder, lora_rank=4, prompt_cache=str(tmp_path / "prompts"))
    shapes = []
    original = model.clean_inputs
    model.clean_inputs = lambda batch, keys: (
        shapes.append(tuple(batch["latent_mean"].shape[-2:])) or original(batch, keys)
    )
    trainer = bare_trainer(6)
    trainer.fit(model, datamodule=data)
    assert torch.isfinite(trainer.callback_metrics["train/loss"]) and len(set(shapes)) > 1, shapes
    settings = SampleSettings(num_inference_steps=2, guidance_scale=2.0, height=24, width=40)
    assert model.sampler().generate([0], settings, prompts=["a photo of a rose flower"]).shape == (
        1,
        3,
        24,
        40,
    )


def test_drawing_with_uncached_prompts_loads_the_text_encoders_only_for_that_drawing(tiny_flux, tmp_path):
    model = _model(tiny_flux, lora_rank=4, prompt_cache=str(tmp_path / "prompts"))
    assert not model.encoder.text_loaded
    settings = SampleSettings(num_inference_steps=2, guidance_scale=1.0, height=32, width=32)
    first = model.sampler().generate([0], settings, prompts=[PROMPT])
    assert not model.encoder.text_loaded and model.prompt_cache.encoded == 1
    again = model.sampler().generate([0], settings, prompts=[PROMPT])  # from the cache now
    assert model.prompt_cache.encoded == 1 and torch.equal(first, again)


def test_a_lora_trained_on_another_shift_exports_that_schedule_and_sample_uses_it(tiny_sd3, tmp_path):
    model = _model(tiny_sd3, lora_rank=4, objective=functools.partial(FlowMatching, shift=2.0))
    exported = model.save_pipeline(tmp_path / "lora")
    sampler, details = load_sampler(pretrained=str(tiny_sd3), lora=str(exported))
    assert details["scheduler_from"] == str(exported)
    assert sampler.scheduler(SampleSettings()).config.shift == 2.0
    same = _model(tiny_sd3, lora_rank=4).save_pipeline(tmp_path / "same")
    assert not (same / "scheduler").exists()  # the base's own schedule: nothing to carry
