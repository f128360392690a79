"""SDXL through the shared latent model: frozen parts, micro-conditioning from the real crop, caption dropout of
both encoders, LoRA and export that diffusers loads, bucketed and cached training, cache keys."""

import functools
from types import SimpleNamespace

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionXLPipeline
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image

from diffusion_lab.callbacks import EMA
from diffusion_lab.core.crop_geometry import batch_crop_geometry
from diffusion_lab.core.random import sample_keys
from diffusion_lab.data import ImageDataModule, LatentCacheDataModule
from diffusion_lab.data.transforms import random_flips
from diffusion_lab.families import LatentEncoder, load_sampler
from diffusion_lab.families.export import export_checkpoint
from diffusion_lab.generation.samplers import SampleSettings
from diffusion_lab.models import LatentDiffusion
from tests import builders
from tests.conftest import bare_trainer

PROMPT = "a photo of a red flower"


def _sdxl(tiny_sdxl, **overrides) -> LatentDiffusion:
    settings = dict(pretrained=str(tiny_sdxl), optimizer=functools.partial(torch.optim.AdamW), lr=1e-3)
    return LatentDiffusion(**{**settings, **overrides})


def _encoder(tiny_sdxl, **overrides) -> LatentEncoder:
    """The frozen parts' encoder as the config builds it (text encoders in float32)."""
    return LatentEncoder(str(tiny_sdxl), **{"text_encoder_dtype": "float32", **overrides})


def _mixed(root, **overrides) -> ImageDataModule:
    """Mixed aspect ratios in buckets of about 32^2 px (32x32, 40x24, 24x40): the tiny UNet's scale."""
    settings = dict(
        path=str(root), streaming=False, label_column="label", caption_template="a photo of a {label} flower",
        image_size=32, bucket_step=8, buckets=True, batch_size=4, num_workers=0, val_size=2,
    )  # fmt: skip
    return ImageDataModule(**{**settings, **overrides})


def _generate(pipeline, seed=0, **kwargs):
    options = dict(num_inference_steps=2, guidance_scale=3.0, height=24, width=40, output_type="pt")
    generator = torch.Generator().manual_seed(seed)
    return pipeline(PROMPT, generator=generator, **{**options, **kwargs}).images


class Training(SimpleNamespace):  # what the DataModules read of a trainer: training, at optimizer step 0
    training, global_step, global_rank, world_size = True, 0, 0, 1


def test_tiny_sdxl_fine_tunes_the_unet_on_buckets_and_leaves_the_frozen_parts_bit_identical(
    tiny_sdxl, tmp_path
):
    model = _sdxl(tiny_sdxl)
    assert model.family.name == "sdxl" and model.text_encoder_2 is not None
    frozen = {"vae": model.vae, "text_encoder": model.text_encoder, "text_encoder_2": model.text_encoder_2}
    before = {name: {k: v.clone() for k, v in part.state_dict().items()} for name, part in frozen.items()}
    unet_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    shapes = []
    step = model.training_step

    def recording(batch, *args):
        shapes.append(tuple(batch["pixels"].shape[2:]))
        return step(batch, *args)

    model.training_step = recording
    data = _mixed(builders.write_mixed_aspect_folder(tmp_path / "mixed"))
    bare_trainer(4).fit(model, datamodule=data)
    for name, part in frozen.items():
        assert all(torch.equal(before[name][k], v) for k, v in part.state_dict().items()), name
        assert not part.training
    assert any(not torch.equal(unet_before[k], v) for k, v in model.net.state_dict().items())
    assert len(set(shapes)) >= 2  # trained on more than one bucket


def test_time_ids_are_the_real_size_and_crop_by_hand_flips_included(tiny_sdxl, tmp_path):
    # A 1175 x 600 JPEG (decoded at 1/8 scale: the size must still be the file's) into the 40x24 bucket:
    # scale max(40/1175, 24/600) = 0.04 -> resized 47 x 24, centred crop left (47 - 40) // 2 = 3, top 0.
    # Mirrored, the crop's left edge in the flipped image is 47 - 3 - 40 = 4.
    for i in range(12):
        folder = tmp_path / "one" / "train" / ("rose", "daisy")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        builders.random_image(1175, 600).save(folder / f"{i}.jpg", quality=90)
    data = _mixed(tmp_path / "one")
    data.trainer = Training()
    data.setup()
    batch = next(iter(data.train_dataloader()))
    assert tuple(batch["pixels"].shape[1:3]) == (24, 40)
    model = _sdxl(tiny_sdxl)
    unflipped = batch_crop_geometry(batch)[:, :6]
    assert unflipped.tolist() == [[600, 1175, 0, 3, 24, 40]] * 4
    batch = data.on_after_batch_transfer(batch, 0)  # the training flips, keyed per (seed, step, image)
    flips = random_flips(data.hparams.seed, 0, batch["index"])
    assert flips.any() and not flips.all()
    keys = sample_keys(0, 0, batch["index"])
    time_ids = model.conditioning(batch, keys)["added_cond_kwargs"]["time_ids"]
    for row, flipped in zip(time_ids.tolist(), flips.tolist(), strict=True):
        assert row == [600, 1175, 0, 4 if flipped else 3, 24, 40]


def test_both_prompts_are_dropped_together_at_the_configured_rate(tiny_sdxl):
    model = _sdxl(tiny_sdxl, caption_dropout=0.25)
    assert model.encoder.frozen[
        "prompts"
    ].zeros_for_empty_prompt  # SDXL base's pipeline: zeros for the unconditional input
    batch = {"caption": [PROMPT] * 400, "index": torch.arange(400), "pixels": torch.zeros(400, 3, 24, 40)}
    condition = model.conditioning(batch, sample_keys(0, 0, batch["index"]))
    hidden, pooled = condition["encoder_hidden_states"], condition["added_cond_kwargs"]["text_embeds"]
    caption = model.encoder.encode_prompts([PROMPT], model.device)
    first, second = hidden[..., :32], hidden[..., 32:]  # the two encoders' halves of the context
    dropped = (pooled == 0).all(dim=1)
    assert abs(dropped.float().mean().item() - 0.25) < 0.06
    for i in range(400):
        if dropped[i]:
            assert not first[i].any() and not second[i].any()
        else:
            torch.testing.assert_close(hidden[i], caption.hidden[0])
            torch.testing.assert_close(pooled[i], caption.pooled[0])
    assert caption.hidden[0, :, :32].any() and caption.hidden[0, :, 32:].any() and caption.pooled.any()


def test_sdxl_lora_saves_and_load_lora_weights_reproduces_the_trained_output(tiny_sdxl, tmp_path):
    model = _sdxl(tiny_sdxl, lora_rank=4, lora_alpha=8, lr=1e-2)
    data = _mixed(builders.write_mixed_aspect_folder(tmp_path / "mixed"))
    bare_trainer(2).fit(model, datamodule=data)
    model.eval()
    pipeline = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    trained = _generate(model.family.pipeline(model.parts(), scheduler=pipeline.scheduler))
    model.save_pipeline(tmp_path / "lora")
    base = _generate(pipeline)
    pipeline.load_lora_weights(tmp_path / "lora")
    torch.testing.assert_close(_generate(pipeline), trained, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(base, trained, atol=1e-3)


def test_an_exported_sdxl_checkpoint_generates_at_a_bucket_size_with_a_negative_prompt(tiny_sdxl, tmp_path):
    model = _sdxl(tiny_sdxl)
    ema = EMA(decay=0.5)
    data = _mixed(builders.write_mixed_aspect_folder(tmp_path / "mixed"))
    checkpoints = ModelCheckpoint(tmp_path / "checkpoints", save_last=True)
    bare_trainer(3, callbacks=[ema, checkpoints], enable_checkpointing=True).fit(model, datamodule=data)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    summary = export_checkpoint(ckpt, tmp_path / "pipeline")
    assert summary["used_ema"] and summary["family"] == "sdxl"
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(pipeline, StableDiffusionXLPipeline)
    shadow = ema.state_dict()["shadow_params"]
    exported = [p for p in pipeline.unet.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(exported, shadow, strict=True))  # the EMA UNet
    assert not all(torch.equal(a, b) for a, b in zip(model.net.parameters(), shadow, strict=True))
    images = _generate(pipeline, negative_prompt="blurry, dark", height=24, width=40)
    assert images.shape == (1, 3, 24, 40) and torch.isfinite(images).all()
    with_negative, without = _generate(pipeline, negative_prompt="blurry"), _generate(pipeline)
    assert not torch.allclose(with_negative, without)
    # `diffusion-lab sample` loads the checkpoint itself and samples a portrait bucket.
    sampler, details = load_sampler(ckpt_path=str(ckpt))
    assert (
        details["used_ema"]
        and details["family"] == "sdxl"
        and type(sampler.pipeline).__name__ == "StableDiffusionXLPipeline"
    )
    settings = SampleSettings(
        num_inference_steps=2, guidance_scale=3.0, negative_prompt="blurry", height=40, width=24
    )
    assert sampler.generate([0, 1], settings, prompts=[PROMPT] * 2).shape == (2, 3, 40, 24)


def test_cached_bucketed_sdxl_batches_give_the_loss_of_images(tiny_sdxl, tmp_path):
    model = _sdxl(tiny_sdxl, caption_dropout=0.5)
    model.log = lambda *args, **kwargs: None
    images = _mixed(builders.write_mixed_aspect_folder(tmp_path / "mixed"), random_flip=True)
    cached = LatentCacheDataModule(images, encoder=_encoder(tiny_sdxl), cache_dir=str(tmp_path / "cache"))
    cached.prepare_data()
    cached.setup("fit")
    assert cached.train_set.meta["pooled_shape"] == [32] and len(cached.train_set.meta["latent_shapes"]) >= 2
    examples, _ = images.examples_for_cache("train")
    examples = list(examples)
    shape = max({tuple(e["pixels"].shape) for e in examples}, key=lambda s: s[1])  # a landscape bucket
    chosen = [e for e in examples if tuple(e["pixels"].shape) == shape][:3]
    by_index = {int(cached.train_set[i]["index"]): i for i in range(len(cached.train_set))}
    rows = [cached.train_set[by_index[int(e["index"])]] for e in chosen]
    images.trainer = cached.trainer = Training()
    uncached_batch = images.on_after_batch_transfer(torch.utils.data.default_collate(chosen), 0)
    cached_batch = cached.on_after_batch_transfer(torch.utils.data.default_collate(rows), 0)
    torch.testing.assert_close(cached_batch["crop_geometry"], uncached_batch["crop_geometry"])
    torch.testing.assert_close(
        model.training_step(cached_batch, 0), model.training_step(uncached_batch, 0), rtol=1e-5, atol=1e-6
    )
    cached.trainer = None
    for _, batch in zip(range(6), cached.train_dataloader(), strict=False):  # one bucket a batch
        assert batch["latent_mean"].ndim == 5 and len(batch["latent_mean"]) <= 4


def test_cache_keys_follow_the_bucket_set_and_each_images_bytes(tiny_sdxl, tmp_path):
    root = builders.write_mixed_aspect_folder(tmp_path / "mixed")

    def folder(**overrides):
        return LatentCacheDataModule(
            _mixed(root, **overrides), encoder=_encoder(tiny_sdxl), cache_dir=str(tmp_path / "cache")
        ).cache_folder("train")

    key = folder()
    assert folder() == key  # stable
    assert len({key, folder(bucket_step=16), folder(bucket_max_aspect=1.5), folder(buckets=False)}) == 4
    image = next((root / "train" / "rose").glob("*.png"))
    pixels = Image.open(image).convert("RGB")
    pixels.putpixel((0, 0), (1, 2, 3))
    pixels.save(image)
    assert folder() != key


def test_an_fp16_safe_vae_replaces_the_vae_samples_beside_an_fp32_unet_and_exports_in_fp32(
    tiny_sdxl, tmp_path
):
    from diffusers import AutoencoderKL

    replacement = tmp_path / "vae_fix"  # the fix's layout: a bare AutoencoderKL folder that needs no upcast
    AutoencoderKL.from_pretrained(tiny_sdxl, subfolder="vae", force_upcast=False).save_pretrained(replacement)
    model = _sdxl(tiny_sdxl, vae=str(replacement), vae_dtype="float16")
    assert model.vae.dtype == torch.float16 and model.net.dtype == torch.float32
    images = _generate(model.family.pipeline(model.parts()))  # fp32 latents into the fp16 decoder
    assert images.shape == (1, 3, 24, 40) and torch.isfinite(images).all()
    model.save_pipeline(tmp_path / "pipeline")
    assert model.vae.dtype == torch.float16  # restored after saving
    exported = DiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert exported.vae.dtype == torch.float32 and _generate(exported).shape == (1, 3, 24, 40)
    data = _mixed(builders.write_mixed_aspect_folder(tmp_path / "mixed"))
    plain = LatentCacheDataModule(data, encoder=_encoder(tiny_sdxl), cache_dir=str(tmp_path / "c"))
    fixed = LatentCacheDataModule(
        data, encoder=_encoder(tiny_sdxl, vae=str(replacement)), cache_dir=str(tmp_path / "c")
    )
    assert plain.cache_folder("train") != fixed.cache_folder("train")


def test_prompts_and_time_ids_are_what_the_sdxl_pipeline_builds(tiny_sdxl):
    model = _sdxl(tiny_sdxl)
    pipeline = model.family.pipeline(model.parts())
    hidden, _, pooled, _ = pipeline.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    ours = model.encoder.encode_prompts([PROMPT], model.device)
    torch.testing.assert_close(ours.hidden, hidden)
    torch.testing.assert_close(ours.pooled, pooled)
    _, negative, _, negative_pooled = pipeline.encode_prompt(
        PROMPT, device="cpu", do_classifier_free_guidance=True
    )
    unconditional = model.encoder.encode_prompts(
        [""], model.device
    )  # a dropped caption: the pipeline's input without a negative prompt
    torch.testing.assert_close(unconditional.hidden, negative)
    torch.testing.assert_close(unconditional.pooled, negative_pooled)
    geometry = torch.tensor([[600, 1175, 0, 3, 24, 40, 24, 47]])
    expected = pipeline._get_add_time_ids((600, 1175), (0, 3), (24, 40), torch.float32, 32)
    batch = {"crop_geometry": geometry, "caption": [PROMPT], "index": torch.arange(1)}
    torch.testing.assert_close(model.conditioning(batch)["added_cond_kwargs"]["time_ids"], expected)


def test_a_vae_that_overflows_is_refused_before_a_cache_of_nan_is_written(tiny_sdxl, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    encode = AutoencoderKL.encode

    def overflowing(self, pixels, return_dict=True):
        output = encode(self, pixels)
        output.latent_dist.mean.fill_(float("inf"))
        return output

    monkeypatch.setattr(AutoencoderKL, "encode", overflowing)
    data = _mixed(builders.write_mixed_aspect_folder(tmp_path / "mixed"))
    cache = LatentCacheDataModule(data, encoder=_encoder(tiny_sdxl), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="non-finite latents.*vae_dtype=float32"):
        cache.prepare_data()
    assert not list((tmp_path / "cache").rglob("meta.json"))


def test_a_lora_checkpoint_loads_weights_only_passes_the_resume_check_and_a_full_model_does_not(
    tiny_sdxl, tmp_path
):
    from omegaconf import OmegaConf

    from diffusion_lab.commands.resume import check_same_architecture
    from diffusion_lab.errors import ConfigError

    targets = OmegaConf.create(["to_q", "to_k", "to_v", "to_out.0"])  # what Hydra passes
    model = _sdxl(tiny_sdxl, lora_rank=4, lora_target_modules=targets)
    trainer = bare_trainer(1)
    trainer.fit(model, datamodule=_mixed(builders.write_mixed_aspect_folder(tmp_path / "mixed")))
    trainer.save_checkpoint(tmp_path / "lora.ckpt")  # the adapters only: the UNet's own weights are frozen
    torch.load(tmp_path / "lora.ckpt", weights_only=True)  # how Lightning reads it back on resume
    cfg = OmegaConf.create({"model": {}})
    assert check_same_architecture(tmp_path / "lora.ckpt", _sdxl(tiny_sdxl, lora_rank=4), cfg) == 1
    with pytest.raises(ConfigError, match="does not fit this model"):
        check_same_architecture(tmp_path / "lora.ckpt", _sdxl(tiny_sdxl), cfg)
