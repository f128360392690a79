"""Aspect-ratio bucket arithmetic (issue 14, first part): the set, the nearest bucket, cover-and-crop."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffusion_lab.data.buckets import Bucket, bucket_set, cover_and_crop, nearest_bucket

SDXL = bucket_set(1024 * 1024, step=64)


def test_the_1024_set_holds_sdxls_resolutions_at_about_one_area():
    for width, height in [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)]:
        assert Bucket(width, height) in SDXL and Bucket(height, width) in SDXL
    for bucket in SDXL:
        assert bucket.width % 64 == 0 and bucket.height % 64 == 0
        assert bucket.width * bucket.height <= 1024 * 1024
        assert 1 / 4 <= bucket.aspect <= 4
    near_square = [b for b in SDXL if 0.5 <= b.aspect <= 2]
    assert all(b.width * b.height >= 0.9 * 1024 * 1024 for b in near_square)
    assert list(SDXL) == sorted(SDXL, key=lambda b: (b.aspect, b.width))


def test_each_image_goes_to_the_bucket_nearest_its_aspect_ratio():
    assert nearest_bucket(1500, 1000, SDXL) == Bucket(1216, 832)  # 3:2 -> 1.46
    assert nearest_bucket(1000, 1500, SDXL) == Bucket(832, 1216)
    assert nearest_bucket(777, 777, SDXL) == Bucket(1024, 1024)
    assert nearest_bucket(4000, 500, SDXL).aspect == max(
        b.aspect for b in SDXL
    )  # beyond the widest: the widest


@settings(max_examples=50, deadline=None)
@given(width=st.integers(16, 3000), height=st.integers(16, 3000), entropy=st.integers(0, 2**62))
def test_the_crop_covers_its_bucket_and_records_sdxls_time_ids(width, height, entropy):
    bucket = nearest_bucket(width, height, SDXL)
    for center in (True, False):
        plan = cover_and_crop(width, height, bucket, center=center, entropy=entropy)
        assert plan.resized[0] >= bucket.width and plan.resized[1] >= bucket.height
        assert (
            0 <= plan.left <= plan.resized[0] - bucket.width
            and 0 <= plan.top <= plan.resized[1] - bucket.height
        )
        # One side fits exactly (up to rounding): the crop throws away only the other side's excess.
        assert min(plan.resized[0] - bucket.width, plan.resized[1] - bucket.height) <= 1
        assert math.isclose(plan.resized[0] / plan.resized[1], width / height, rel_tol=0.05) or min(
            plan.resized
        ) == min(bucket.width, bucket.height)
        assert plan.time_ids() == (height, width, plan.top, plan.left, bucket.height, bucket.width)


def test_a_known_crop_by_hand():
    plan = cover_and_crop(1500, 1000, Bucket(1216, 832))  # scale max(1216/1500, 832/1000) = 0.832
    assert plan.resized == (1248, 832) and (plan.left, plan.top) == (16, 0)
    assert plan.time_ids() == (1000, 1500, 0, 16, 832, 1216)


def test_a_set_that_cannot_exist_is_refused():
    with pytest.raises(ValueError, match="target_area >= step"):
        bucket_set(1000, step=64)
