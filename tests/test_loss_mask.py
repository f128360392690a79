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
    "flow_logit_normal": lambda: FlowMatching(
        FlowMatchEulerDiscreteScheduler(shift=3.0), timesteps=LogitNormal()
    ),
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
    assert torch.equal(
        objective.loss(net, x0, keys, mask=ones, loss_mask=LossMask(unmasked_weight=0.3)), plain
    )


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
        assert loss_mask.per_image(error, mask).item() == pytest.approx(
            columns / 8
        )  # kohya: grows with the area
        per_area.append(normalised.per_image(error, mask).item())
    assert per_area == pytest.approx([1.0, 1.0, 1.0])  # normalised: the same whatever the area
    grey = torch.full((1, 1, 8, 8), 0.5)
    assert loss_mask.per_image(error, grey).item() == pytest.approx(0.5)
    assert LossMask(unmasked_weight=0.2).per_image(error, torch.zeros(1, 1, 8, 8)).item() == pytest.approx(
        0.2
    )
    # an image-resolution mask reaches the latents by area: an 8 x 8 block half covered weighs a half
    fine = torch.zeros(1, 1, 64, 64)
    fine[..., :, :4] = 1
    assert loss_mask.weights(fine, (8, 8))[0, 0, 0, 0].item() == pytest.approx(0.5)


def test_a_floor_outside_zero_and_one_is_refused_with_the_key():
    with pytest.raises(ConfigError, match="model.loss_mask.unmasked_weight"):
        LossMask(unmasked_weight=1.5)


# ---- masks in the data: they follow their image through resize, crop, flip and bucket -------------------------

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from diffusion_lab.data import ImageDataModule  # noqa: E402
from diffusion_lab.data.transforms import random_flips  # noqa: E402


class _Training:  # what the DataModules read of a trainer: training, at optimizer step 0
    training, global_step, global_rank, world_size = True, 0, 0, 1


def _write(root, sizes, alpha: bool):
    """Images whose red channel is a random pattern and a mask that is that pattern (a mask file beside, or the
    alpha channel with red 0, which compositing onto white turns into red = 255 - alpha)."""
    rng = np.random.default_rng(0)
    for kind in ("thing", "other"):
        (root / "train" / kind).mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (width, height) in enumerate(sizes):
        kind = ("thing", "other")[i % 2]
        pattern = rng.integers(0, 256, (height, width), dtype=np.uint8)
        if alpha:
            rgba = np.zeros((height, width, 4), dtype=np.uint8)
            rgba[..., 3] = pattern
            Image.fromarray(rgba, "RGBA").save(root / "train" / kind / f"{i}.png")
        else:
            rgb = np.zeros((height, width, 3), dtype=np.uint8)
            rgb[..., 0] = pattern
            Image.fromarray(rgb).save(root / "train" / kind / f"{i}.png")
            Image.fromarray(pattern, "L").save(root / "masks" / f"{i}.png")
    return root


def _batches(root, batch_size: int = 4, **settings):
    data = ImageDataModule(path=str(root), streaming=False, image_size=32, batch_size=batch_size, num_workers=0,
                           val_size=1, **settings)  # fmt: skip
    data.trainer = _Training()
    data.setup("fit")
    iterator = iter(data.train_dataloader())
    return [data.on_after_batch_transfer(next(iterator), 0) for _ in range(3)]


@pytest.mark.parametrize("source", ["mask_dir", "alpha"])
def test_masks_follow_their_image_through_random_crops_flips_and_buckets(source, tmp_path):
    sizes = [(60, 30), (30, 60), (40, 40), (75, 40), (45, 90)] * 3
    root = _write(tmp_path / "images", sizes, alpha=source == "alpha")
    settings = {"alpha_mask": True} if source == "alpha" else {"mask_dir": str(root / "masks")}
    shapes = set()
    for batch in _batches(root, center_crop=False, random_flip=True, buckets=True, bucket_step=8, **settings):
        red = (batch["pixels"][:, :1] + 1) / 2  # [0, 1], the pattern (alpha: its complement)
        expected = 1 - red if source == "alpha" else red
        assert batch["loss_mask"].shape == red.shape
        # (the alpha case composites onto white first, 255 - alpha, whose bilinear rounding can differ by 2/255)
        torch.testing.assert_close(
            batch["loss_mask"], expected, atol=(2.5 if source == "alpha" else 0.5) / 255, rtol=0
        )
        shapes.add(tuple(red.shape[-2:]))
    assert len(shapes) > 1  # more than one bucket was seen


def test_mask_geometry_by_hand_a_left_half_mask_at_its_columns_and_mirrored_when_flipped(tmp_path):
    """A 40 x 40 image with its left half masked, at 32 px: resized 0.8x, nothing to crop; columns 0-15 count and
    16-31 do not (up to the bilinear seam at 15 | 16), mirrored in the images the keyed coin flips."""
    (tmp_path / "train" / "thing").mkdir(parents=True)
    (tmp_path / "masks").mkdir()
    left = np.zeros((40, 40), dtype=np.uint8)
    left[:, :20] = 255
    for i in range(17):
        Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8)).save(tmp_path / "train" / "thing" / f"{i}.png")
        Image.fromarray(left, "L").save(tmp_path / "masks" / f"{i}.png")
    batch = _batches(tmp_path, batch_size=16, mask_dir=str(tmp_path / "masks"), random_flip=True)[0]
    flips = random_flips(0, 0, batch["index"])
    assert torch.equal(batch["flipped"], flips) and flips.any() and not flips.all()
    for mask, flipped in zip(batch["loss_mask"][:, 0], flips.tolist(), strict=True):
        columns = mask.mean(dim=0)  # every row alike
        if flipped:
            columns = columns.flip(0)
        assert columns[:15].min() == 1.0 and columns[17:].max() == 0.0


def test_a_missing_mask_is_skipped_and_counted_and_masks_without_a_source_are_refused(tmp_path):
    root = _write(tmp_path / "images", [(40, 40)] * 8, alpha=False)
    (root / "masks" / "3.png").unlink()
    batch = _batches(root, mask_dir=str(root / "masks"), random_flip=False, max_bad_fraction=0.5)[0]
    assert "loss_mask" in batch  # the other images train; the skip is logged and counted
    with pytest.raises(
        RuntimeError, match="no mask 3.png"
    ):  # past data.max_bad_fraction the run stops, naming it
        _batches(root, mask_dir=str(root / "masks"), random_flip=False)
    with pytest.raises(ConfigError, match="choose one"):
        ImageDataModule(path=str(root), mask_dir=str(root / "masks"), alpha_mask=True)


def test_cached_and_live_masks_give_the_same_loss_with_random_flips(tiny_sd, tmp_path):
    """The latent cache stores each mask at the latents' resolution, unflipped, and mirrors it with the latents it
    weighs: the masked loss on a cached batch equals the one on the decoded batch, flips included."""
    import functools

    from diffusion_lab.data import LatentCacheDataModule
    from diffusion_lab.families import LatentEncoder
    from diffusion_lab.models import LatentDiffusion

    root = _write(tmp_path / "images", [(40, 40), (60, 30), (30, 60)] * 4, alpha=False)
    images = ImageDataModule(path=str(root), streaming=False, image_size=32, batch_size=4, num_workers=0,
                             val_size=1, label_column="label", caption_template="a photo of a {label}", random_flip=True,
                             mask_dir=str(root / "masks"))  # fmt: skip
    cached = LatentCacheDataModule(images, encoder=LatentEncoder(str(tiny_sd), text_encoder_dtype="float32"),
                                   cache_dir=str(tmp_path / "cache"))  # fmt: skip
    cached.prepare_data()
    cached.setup("fit")
    examples, _ = images.examples_for_cache("train")
    uncached_batch = torch.utils.data.default_collate(list(examples))
    by_index = {int(cached.train_set[i]["index"]): i for i in range(len(cached.train_set))}
    cached_batch = torch.utils.data.default_collate(
        [cached.train_set[by_index[int(i)]] for i in uncached_batch["index"]]
    )
    assert cached_batch["loss_mask"].shape == (len(by_index), 1, 16, 16)
    flips = random_flips(images.hparams.seed, 0, uncached_batch["index"])
    assert flips.any() and not flips.all()
    images.trainer = cached.trainer = _Training()
    uncached_batch = images.on_after_batch_transfer(uncached_batch, 0)
    cached_batch = cached.on_after_batch_transfer(cached_batch, 0)
    settings = dict(pretrained=str(tiny_sd), optimizer=functools.partial(torch.optim.AdamW), lr=1e-3)
    model = LatentDiffusion(**settings, loss_mask={"normalize_by_area": True})
    model.log = lambda *args, **kwargs: None
    masked = model.training_step(cached_batch, 0)
    torch.testing.assert_close(masked, model.training_step(uncached_batch, 0), rtol=1e-5, atol=1e-6)
    plain = LatentDiffusion(**settings)
    plain.log = lambda *args, **kwargs: None
    assert not torch.allclose(plain.training_step(cached_batch, 0), masked)  # the mask does weigh


def test_a_mask_of_another_size_is_skipped_and_masks_without_the_masked_loss_are_refused(
    tmp_path, compose_config
):
    root = _write(tmp_path / "images", [(40, 40)] * 8, alpha=False)
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8), "L").save(root / "masks" / "3.png")  # half the size
    with pytest.raises(RuntimeError, match="its mask is 20x20, the image 40x40"):
        _batches(root, mask_dir=str(root / "masks"), random_flip=False)
    from diffusion_lab.runs.config_checks import check_run_config

    cfg = compose_config(
        "model=latent", "data=imagefolder", f"data.path={root}", f"data.mask_dir={root / 'masks'}"
    )
    with pytest.raises(ConfigError, match="model/loss_mask=masked"):
        check_run_config(cfg)
