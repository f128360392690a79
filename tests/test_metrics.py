"""FID / KID / IS / CLIP score with offline extractors: the numbers behave, the protocols differ as stated,
the reference cache is reused, the callback scores a training run without disturbing it, `eval` reports."""

import hashlib
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.metrics import (
    InceptionV3,
    RandomConvFeatures,
    describe_extractor,
    extract_features,
    prepare_for_extractor,
)
from diffusion_lab.metrics.features import ImageFeatures, cached_features
from diffusion_lab.metrics.scores import ClipScorer, frechet_distance, inception_score, kernel_distance

EXTRACTOR = RandomConvFeatures(input_size=32)


def _images(seed: int, n: int = 96, size: int = 16) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def _features(images: torch.Tensor, protocol: str = "legacy") -> ImageFeatures:
    return extract_features(EXTRACTOR, images.split(32), protocol)


@pytest.fixture(scope="module")
def sets():
    images = _images(0)
    shifted = (images.float() * 0.5 + 100).to(torch.uint8)  # lower contrast, brighter
    return _features(images), _features(_images(1)), _features(shifted)


def test_fid_is_zero_against_itself_larger_when_shifted_and_repeatable(sets):
    reference, _, shifted = sets
    assert abs(frechet_distance(reference.features, reference.features)) < 1e-6
    distance = frechet_distance(reference.features, shifted.features)
    assert distance > 0.5
    assert frechet_distance(reference.features, shifted.features) == distance


def test_kid_is_zero_against_itself_and_for_a_fresh_draw_larger_when_shifted_and_repeatable(sets):
    reference, fresh, shifted = sets
    self_mean, self_std = kernel_distance(reference.features, reference.features, subset_size=48, subsets=20)
    fresh_mean, _ = kernel_distance(reference.features, fresh.features, subset_size=48, subsets=20)
    shifted_mean, shifted_std = kernel_distance(
        reference.features, shifted.features, subset_size=48, subsets=20
    )
    assert abs(self_mean) < 3 * self_std + 1e-3 and abs(fresh_mean) < 0.1 * shifted_mean
    assert shifted_mean > 10 * shifted_std > 0
    assert kernel_distance(reference.features, shifted.features, subset_size=48, subsets=20) == (
        shifted_mean, shifted_std,
    )  # fmt: skip


def test_kid_leaves_the_global_rng_stream_alone(sets):
    reference, _, shifted = sets
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    kernel_distance(reference.features, shifted.features, subset_size=48, subsets=5)
    assert torch.equal(torch.rand(3), expected)


def test_inception_score_is_one_for_one_class_and_the_class_count_for_confident_even_classes():
    assert inception_score(torch.zeros(40, 8).double(), splits=4)[0] == pytest.approx(1.0)
    assert inception_score(torch.zeros(40, 8).double())[1] is None  # one split for a small set: no std
    confident = torch.eye(8).repeat(5, 1).double() * 50
    assert inception_score(confident, splits=2)[0] == pytest.approx(
        8.0, rel=0.1
    )  # random halves: near-even mixes


def _clean_fid_resize(image: np.ndarray, size: int) -> np.ndarray:
    """clean-fid's `make_resizer("PIL", False, "bicubic", (size, size))` (cleanfid/resize.py), HWC uint8 in."""
    channels = [
        np.asarray(
            Image.fromarray(image[:, :, i].astype(np.float32), mode="F").resize((size, size), Image.BICUBIC)
        )
        .clip(0, 255)
        .reshape(size, size, 1)
        for i in range(3)
    ]
    return np.concatenate(channels, axis=2).astype(np.float32)


def test_clean_protocol_is_clean_fids_float_bicubic_resize_and_legacy_hands_images_over():
    images = _images(2, n=2, size=20)
    clean = prepare_for_extractor(images, "clean", 32)
    assert clean.dtype == torch.float32 and clean.shape == (2, 3, 32, 32)
    for image, resized in zip(images, clean, strict=True):
        expected = _clean_fid_resize(image.permute(1, 2, 0).numpy(), 32)
        assert np.array_equal(resized.permute(1, 2, 0).numpy(), expected)
    assert not torch.equal(clean, clean.round())  # not rounded back to uint8 ...
    assert clean.min() == 0 and clean.max() == 255  # ... but clipped: bicubic overshoots on noise
    at_size = _images(2, n=2, size=32)
    assert torch.equal(prepare_for_extractor(at_size, "clean", 32), at_size.float())  # PIL: a copy
    assert torch.equal(prepare_for_extractor(images, "legacy", 32), images)
    assert not torch.allclose(_features(images, "clean").features, _features(images, "legacy").features)
    with pytest.raises(ValueError, match="valid: legacy, clean"):
        prepare_for_extractor(images, "tf", 32)


def test_random_conv_takes_float_images_as_their_uint8_values():
    images = _images(6, n=4, size=32)
    torch.testing.assert_close(EXTRACTOR(images.float())["features"], EXTRACTOR(images)["features"])


def test_grey_and_float_images_become_rgb_uint8_features():
    grey = torch.rand(4, 1, 16, 16) * 2 - 1
    rgb = ((grey + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1)
    assert torch.allclose(_features(grey).features, _features(rgb).features)


def test_inception_gives_pool_features_and_logits_and_the_protocols_differ(inception_weights):
    extractor = InceptionV3(weights_path=str(inception_weights))
    images = _images(3, n=3, size=64)
    legacy = extract_features(extractor, [images], "legacy")
    clean = extract_features(extractor, [images], "clean")
    assert legacy.features.shape == (3, 2048) and legacy.logits.shape == (3, 1008)
    assert not torch.allclose(legacy.features, clean.features, rtol=1e-3)
    assert describe_extractor(extractor)["input_size"] == 299  # BatchNorm's 0-dim int64 counters hash too


def test_inception_float_path_is_torch_fidelitys_forward_without_the_uint8_check(inception_weights):
    extractor = InceptionV3(weights_path=str(inception_weights))
    for size in (299, 48):  # at 299 px the TF1 resize is an exact identity; at 48 px both paths resize
        images = _images(7, n=2, size=size)
        by_uint8, by_float = extractor(images), extractor(images.float())
        assert torch.equal(by_uint8["features"], by_float["features"])
        assert torch.equal(by_uint8["logits"], by_float["logits"])
    # So `clean` at the input size (a float copy) gives exactly torch-fidelity's numbers.
    images = _images(8, n=2, size=299)
    assert torch.equal(
        extract_features(extractor, [images], "clean").features,
        extract_features(extractor, [images], "legacy").features,
    )


def test_extractor_key_hashes_every_dtype_and_shape_and_keeps_random_conv_keys():
    module = torch.nn.BatchNorm2d(4)  # num_batches_tracked: a 0-dim int64
    module.register_buffer("mask", torch.tensor([True, False]))
    module.register_buffer("scale", torch.tensor(0.5, dtype=torch.bfloat16))
    first = describe_extractor(module)["weights"]
    module.num_batches_tracked += 1
    assert describe_extractor(module)["weights"] != first
    # Keys written before 0-dim tensors were handled (all of RandomConvFeatures' are >= 1-dim) still hold.
    old = hashlib.sha256(b"RandomConvFeatures")
    for name, tensor in sorted(EXTRACTOR.state_dict().items()):
        old.update(name.encode())
        old.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert describe_extractor(EXTRACTOR)["weights"] == old.hexdigest()[:16]


def test_inception_without_weights_or_internet_explains_the_way_out():
    with (
        mock.patch(
            "torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url",
            side_effect=OSError("no internet"),
        ),
        pytest.raises(RuntimeError, match="feature_extractor.weights_path"),
    ):
        InceptionV3()


def test_reference_features_are_computed_once_per_key(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return _features(_images(4, n=8))

    first = cached_features(tmp_path, {"data": "digits", "split": "val"}, compute)
    second = cached_features(tmp_path, {"data": "digits", "split": "val"}, compute)
    assert len(calls) == 1 and torch.equal(first.features, second.features)
    cached_features(tmp_path, {"data": "digits", "split": "val", "protocol": "clean"}, compute)
    assert len(calls) == 2 and not list(tmp_path.glob("*.tmp"))


def test_clip_score_of_a_tiny_clip_matches_torchmetrics(tmp_path):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update

    from diffusion_lab.families.tiny import build_tiny_clip
    from diffusion_lab.metrics.scores import clip_model_loader

    clip = build_tiny_clip(tmp_path / "clip")
    images, prompts = _images(5, n=4, size=32), ["a red flower", "two", "a photo of a digit", "blue"]
    scorer = ClipScorer(str(clip))
    scorer.reset()
    scorer.update(images[:2], prompts[:2])
    scorer.update(images[2:], prompts[2:])
    summed = float(scorer.metric.score)  # 100 x cosine summed over images, before the floor at 0
    score = scorer.compute()
    model, processor = clip_model_loader(str(clip))()
    with torch.no_grad():
        per_image, _ = _clip_score_update(list(images), prompts, model, processor)
    assert summed == pytest.approx(float(per_image.sum()), abs=1e-3) and summed != 0
    assert score == pytest.approx(max(summed / 4, 0.0), abs=1e-4)
