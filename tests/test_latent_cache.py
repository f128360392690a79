"""The latent / text-embedding cache: same training signal as encoding live, keyed on everything that
changes it, and training from it never runs the frozen models."""

import functools
import os

import pytest
import torch

from diffusion_lab.data import DigitsDataModule, ImageDataModule, LatentCacheDataModule
from diffusion_lab.data.transforms import to_signed_unit
from diffusion_lab.families import LatentEncoder
from diffusion_lab.models import LatentDiffusion
from tests.builders import write_caption_table
from tests.conftest import bare_trainer

CAPTION = "a handwritten digit {label}"


def _model(tiny_sd, **overrides):
    settings = dict(pretrained=str(tiny_sd), optimizer=functools.partial(torch.optim.AdamW), lr=1e-3)
    return LatentDiffusion(**{**settings, **overrides})


def _digits(batch_size=8):
    return DigitsDataModule(image_size=32, channels=3, batch_size=batch_size, caption_template=CAPTION)


def _encoder(tiny_sd, **overrides):
    """The frozen parts' encoder as the config builds it (text encoders in float32)."""
    return LatentEncoder(str(tiny_sd), **{"text_encoder_dtype": "float32", **overrides})


def _cached(tiny_sd, tmp_path, images=None, **overrides):
    data = LatentCacheDataModule(
        images or _digits(), encoder=_encoder(tiny_sd), cache_dir=str(tmp_path / "cache"), **overrides
    )
    data.prepare_data()
    data.setup("fit")
    return data


def _captioned_folder(tmp_path, **overrides):
    write_caption_table(tmp_path / "table", "jsonl", rows=10)
    settings = dict(
        path=str(tmp_path / "table" / "captions.jsonl"), streaming=False, caption_column="caption",
        image_size=32, batch_size=4, num_workers=0, val_size=2,
    )  # fmt: skip
    return ImageDataModule(**{**settings, **overrides})


def test_cached_and_uncached_training_give_the_same_loss_on_the_same_batch(tiny_sd, tmp_path):
    model = _model(tiny_sd, caption_dropout=0.5)  # some captions dropped: the empty prompt's embedding too
    model.log = lambda *args, **kwargs: None
    cached = _cached(tiny_sd, tmp_path)
    images = cached.images
    rows = list(range(8))
    uncached_batch = torch.utils.data.default_collate([images.train_set[i] for i in rows])
    cached_batch = torch.utils.data.default_collate([cached.train_set[i] for i in rows])
    cached_batch = cached.on_after_batch_transfer(cached_batch, 0)
    assert torch.equal(cached_batch["index"], uncached_batch["index"])
    assert cached_batch["caption"] == uncached_batch["caption"]
    assert cached_batch["latent_mean"].shape == (8, 4, 16, 16)
    torch.testing.assert_close(
        model.training_step(cached_batch, 0), model.training_step(uncached_batch, 0), rtol=1e-5, atol=1e-6
    )
    model.eval()
    losses = []
    model.log = lambda name, value, **kwargs: losses.append(value)
    model.validation_step(cached_batch, 0)
    model.validation_step(uncached_batch, 0)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_cached_and_uncached_losses_are_equal_with_random_flips(tiny_sd, tmp_path):
    """Decoded images are flipped on the device and cached latents pick an orientation, both from the same
    keyed coin per (seed, step, image): the same images are flipped, so the losses agree."""
    from diffusion_lab.data.transforms import random_flips

    cached = _cached(tiny_sd, tmp_path, images=_captioned_folder(tmp_path, random_flip=True))
    images = cached.images
    examples, _ = images.examples_for_cache("train")
    uncached_batch = torch.utils.data.default_collate(list(examples))
    by_index = {int(cached.train_set[i]["index"]): i for i in range(len(cached.train_set))}
    rows = [by_index[int(i)] for i in uncached_batch["index"]]
    cached_batch = torch.utils.data.default_collate([cached.train_set[i] for i in rows])
    flips = random_flips(images.hparams.seed, 0, uncached_batch["index"])
    assert flips.any() and not flips.all()

    class Training:  # what both DataModules read of the trainer: training, at optimizer step 0
        training, global_step = True, 0

    images.trainer = cached.trainer = Training()
    uncached_batch = images.on_after_batch_transfer(uncached_batch, 0)
    cached_batch = cached.on_after_batch_transfer(cached_batch, 0)
    model = _model(tiny_sd)
    model.log = lambda *args, **kwargs: None
    torch.testing.assert_close(
        model.training_step(cached_batch, 0), model.training_step(uncached_batch, 0), rtol=1e-5, atol=1e-6
    )
    images.trainer = None  # unflipped without a training trainer: the losses now differ
    unflipped = images.on_after_batch_transfer(torch.utils.data.default_collate(list(examples)), 0)
    assert not torch.allclose(model.training_step(unflipped, 0), model.training_step(cached_batch, 0))


def test_random_flips_cache_both_orientations_and_training_draws_both(tiny_sd, tmp_path):
    cached = _cached(tiny_sd, tmp_path, images=_captioned_folder(tmp_path))
    assert cached.train_set.orientations == 2 and cached.val_set.orientations == 1
    examples, flips = cached.images.examples_for_cache("train")
    assert flips
    example = next(iter(examples))
    pixels = to_signed_unit(example["pixels"].unsqueeze(0))
    row = next(i for i in range(len(cached.train_set)) if cached.train_set[i]["index"] == example["index"])
    model = _model(tiny_sd)
    for orientation, view in enumerate([pixels, pixels.flip(-1)]):
        mean, std = model.encoder.encode_posterior(view)
        torch.testing.assert_close(
            cached.train_set[row]["latent_mean"][orientation], mean[0], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            cached.train_set[row]["latent_std"][orientation], std[0], atol=1e-5, rtol=1e-5
        )

    class Training:  # the orientation is drawn per image and step, during training only
        training, global_step = True, 0

    cached.trainer = Training()
    batch = torch.utils.data.default_collate([cached.train_set[i] for i in range(len(cached.train_set))])
    chosen = cached.on_after_batch_transfer(batch, 0)["latent_mean"]
    flipped = [not torch.equal(chosen[i], batch["latent_mean"][i, 0]) for i in range(len(chosen))]
    assert any(flipped) and not all(flipped)


def test_random_crops_cannot_be_cached(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="center_crop=true"):
        _cached(tiny_sd, tmp_path, images=_captioned_folder(tmp_path, center_crop=False))


def test_the_cache_is_reused_and_keyed_on_what_changes_its_contents(tiny_sd, tmp_path):
    first = _cached(tiny_sd, tmp_path)
    folder = first.cache_folder("train")
    written = os.stat(folder / "latent_mean.bin").st_mtime_ns
    again = _cached(tiny_sd, tmp_path)
    assert again.cache_folder("train") == folder
    assert os.stat(folder / "latent_mean.bin").st_mtime_ns == written  # reused, not rebuilt
    assert _cached(tiny_sd, tmp_path, batch_size=4).cache_folder("train") == folder  # loader settings: same
    changed = [
        LatentCacheDataModule(_digits(), _encoder(tiny_sd), str(tmp_path / "cache"), storage_dtype="float16"),
        LatentCacheDataModule(_digits(), _encoder(tiny_sd, text_encoder_dtype="bfloat16"), str(tmp_path / "cache")),
        LatentCacheDataModule(_digits(), _encoder(tiny_sd, vae_dtype=None), str(tmp_path / "cache")),
        LatentCacheDataModule(
            DigitsDataModule(image_size=16, channels=3, caption_template=CAPTION), _encoder(tiny_sd), str(tmp_path / "cache")
        ),
        LatentCacheDataModule(
            DigitsDataModule(image_size=32, channels=3, caption_template="digit {label}"), _encoder(tiny_sd), str(tmp_path / "cache")
        ),
    ]  # fmt: skip
    folders = {data.cache_folder("train") for data in changed}
    assert folder not in folders and len(folders) == len(changed)
    # New weights in the checkpoint folder: a new key, never the stale cache.
    weights = next((tiny_sd / "vae").glob("*.safetensors"))
    os.utime(weights, ns=(written + 10**9, written + 10**9))
    try:
        assert (
            LatentCacheDataModule(_digits(), _encoder(tiny_sd), str(tmp_path / "cache")).cache_folder("train")
            != folder
        )
    finally:
        os.utime(weights, ns=(written, written))


def test_float16_storage_round_trips_within_half_precision(tiny_sd, tmp_path):
    full, half = _cached(tiny_sd, tmp_path), _cached(tiny_sd, tmp_path, storage_dtype="float16")
    torch.testing.assert_close(
        half.train_set[0]["latent_mean"], full.train_set[0]["latent_mean"], atol=2e-3, rtol=1e-3
    )
    with pytest.raises(ValueError, match="float32"):
        LatentCacheDataModule(_digits(), _encoder(tiny_sd), str(tmp_path), storage_dtype="bfloat16")


def test_training_from_the_cache_never_runs_the_frozen_models(tiny_sd, tmp_path):
    cached = _cached(tiny_sd, tmp_path)
    model = _model(tiny_sd)

    def forbidden(*args, **kwargs):
        raise AssertionError("a frozen model ran during cached training")

    model.vae.encode = forbidden
    model.text_encoder.forward = forbidden
    unet_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer = bare_trainer(3, limit_val_batches=1, val_check_interval=3)
    trainer.fit(model, datamodule=cached)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert any(not torch.equal(unet_before[k], v) for k, v in model.net.state_dict().items())


def test_a_missing_cache_names_prepare_data(tiny_sd, tmp_path):
    data = LatentCacheDataModule(_digits(), _encoder(tiny_sd), str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="prepare_data"):
        data.setup("fit")
