"""Aspect-ratio buckets: the arithmetic (set, nearest bucket, cover-and-crop), and buckets through the data: one
shape a batch, each image in its nearest bucket, every image once per epoch across ranks and workers, exact resume."""

import collections
import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from diffusion_lab.data import ImageDataModule
from diffusion_lab.data.bucket_batching import BucketBatcher, Waiting
from diffusion_lab.data.buckets import Bucket, bucket_set, cover_and_crop, nearest_bucket
from diffusion_lab.errors import ConfigError
from tests import builders

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


# ---- buckets through the DataModule: one shape a batch, nearest bucket, exact coverage and resume --------
def _bucketed(root, **overrides) -> ImageDataModule:
    settings = dict(
        path=str(root), streaming=False, label_column="label", caption_template="a {label} flower",
        image_size=48, bucket_step=8, buckets=True, batch_size=3, num_workers=0, val_size=2,
    )  # fmt: skip
    return ImageDataModule(**{**settings, **overrides})


def _on_rank(datamodule: ImageDataModule, rank: int, world: int) -> ImageDataModule:
    datamodule.trainer = SimpleNamespace(global_rank=rank, world_size=world, training=False)
    datamodule.setup()
    return datamodule


def _file_size(datamodule: ImageDataModule, index: int) -> tuple[int, int]:
    return Image.open(datamodule.train_set.dataset[index]["image"]["path"]).size


@pytest.mark.parametrize("streaming", [False, True])
def test_two_ranks_with_two_workers_cover_a_bucketed_epoch_once_in_one_shape_batches(tmp_path, streaming):
    root = builders.write_mixed_aspect_folder(tmp_path / "mixed")
    seen, shapes = [], set()
    for rank in range(2):
        datamodule = _on_rank(_bucketed(root, streaming=streaming, num_workers=2), rank, 2)
        datamodule.train_set.epochs = 1
        buckets = datamodule.bucket_set
        for batch in datamodule.train_dataloader():
            pixels, geometry = batch["pixels"], batch["crop_geometry"]
            assert pixels.ndim == 4 and len(pixels) <= 3  # stacked: one (H, W) for the whole batch
            height, width = pixels.shape[1:3]
            shapes.add((width, height))
            for row in geometry.tolist():  # each image in the bucket nearest its own file's aspect ratio
                original_height, original_width = row[0], row[1]
                assert nearest_bucket(original_width, original_height, buckets) == Bucket(width, height)
                assert row[4:6] == [height, width]
            seen += [tuple(row[:2]) for row in geometry.tolist()] if streaming else batch["index"].tolist()
    if streaming:  # streamed rows have no row numbers: count the images by their sizes
        expected = sorted((h, w) for w, h in builders.MIXED_SIZES for _ in range(3))
        assert len(seen) == 23 - 2 and set(seen) <= set(expected)
    else:
        assert sorted(seen) == sorted(range(len(datamodule.train_set.dataset)))
        for index in seen[:5]:
            assert _file_size(datamodule, index) in builders.MIXED_SIZES
    assert len(shapes) >= 4  # the folder really spans several buckets


def test_partial_buckets_carry_over_to_the_next_epoch_instead_of_being_dropped(tmp_path):
    datamodule = _on_rank(_bucketed(builders.write_mixed_aspect_folder(tmp_path / "mixed")), 0, 1)
    stream = datamodule.train_set
    stream.epochs = 2
    batches = [batch["index"].tolist() for batch in StatefulDataLoader(stream, batch_size=None)]
    rows = len(stream.dataset)
    assert collections.Counter(i for batch in batches for i in batch) == {i: 2 for i in range(rows)}
    assert all(len(set(batch)) == len(batch) for batch in batches)


def test_the_batcher_carries_a_partial_bucket_into_the_next_epoch():
    def feed(batcher, order, epoch):
        return [
            [w.index for w in batch]
            for i in order
            if (batch := batcher.add("a", Waiting(epoch, i, None, {}, identity=i)))
        ]

    batcher = BucketBatcher(3)
    assert feed(batcher, [0, 1, 2, 3], epoch=0) == [[0, 1, 2]]  # 3 waits at the epoch's end...
    assert feed(batcher, [0, 1, 2, 3], epoch=1) == [[3, 0, 1]]  # ...and opens the next epoch's first batch
    assert [[w.index for w in b] for b in batcher.flush()] == [[2, 3]]  # a finite pass ends with it
    batcher = BucketBatcher(3)
    feed(batcher, [0, 1, 2, 3], epoch=0)
    # 3 comes round again before its bucket filled: it goes out alone rather than twice in one batch.
    assert feed(batcher, [3, 0, 1, 2], epoch=1) == [[3], [3, 0, 1]]


@pytest.mark.parametrize(("streaming", "workers"), [(False, 0), (False, 2), (True, 0), (True, 2)])
def test_a_bucketed_resume_continues_with_the_batches_of_an_uninterrupted_run(tmp_path, streaming, workers):
    if streaming:  # two parquet shards: with two workers, each streams its own
        root = builders.write_mixed_aspect_parquet(tmp_path / "mixed", count=23)
    else:
        root = builders.write_mixed_aspect_folder(tmp_path / "mixed")
    # A shuffle buffer of 1: the datasets library does not save its shuffle buffer (documented), ours is saved.
    settings = dict(streaming=streaming, num_workers=workers, shuffle_buffer=1, center_crop=False)

    def loader():  # the DataModule's own loader, which reports the position of the batch before the last one
        return _on_rank(_bucketed(root, **settings), 0, 1).train_dataloader()

    straight = iter(loader())
    expected = [next(straight) for _ in range(12)]  # 21 training rows at batch 3: past an epoch's end
    interrupted = loader()
    iterator = iter(interrupted)
    for _ in range(6):  # as Lightning does: the model is at batch 5 while the loader has fetched batch 6
        next(iterator)
    state = interrupted.state_dict()
    if not workers:  # with workers the state ships as a snapshot plus batches to fast-forward
        assert any(state_has_waiting_rows(state))  # the resume really has a buffer to restore
    resumed = loader()
    resumed.load_state_dict(state)
    got = [batch for _, batch in zip(range(7), resumed, strict=False)]
    assert len(got) == 7
    for want, batch in zip(expected[5:], got, strict=True):
        assert torch.equal(want["pixels"], batch["pixels"])
        assert (
            torch.equal(want["crop_geometry"], batch["crop_geometry"]) and want["caption"] == batch["caption"]
        )
        if not streaming:
            assert torch.equal(want["index"], batch["index"])


def state_has_waiting_rows(state: dict):
    """Whether any worker's saved stream state has examples waiting in a bucket."""
    if "waiting" in state:
        yield any(state["waiting"].values())
    for value in state.values():
        if isinstance(value, dict):
            yield from state_has_waiting_rows(value)


def test_buckets_that_cannot_exist_name_the_keys(tmp_path):
    with pytest.raises(ConfigError, match="data.bucket_step"):
        _bucketed(tmp_path, bucket_step=64, image_size=32)


def test_a_pixel_model_trains_at_mixed_aspect_ratios(compose_config, tmp_path):
    from hydra.utils import instantiate

    from tests.conftest import TINY, bare_trainer

    root = builders.write_mixed_aspect_folder(tmp_path / "mixed")
    cfg = compose_config(
        *TINY, "data=imagefolder", f"data.path={root}", "data.buckets=true", "data.image_size=16",
        "data.bucket_step=4", "data.num_workers=0", "data.val_size=2", "data.batch_size=4",
    )  # fmt: skip
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    shapes, step = [], model.training_step

    def recording(batch, *args):
        shapes.append(tuple(batch["pixels"].shape[2:]))
        return step(batch, *args)

    model.training_step = recording
    trainer = bare_trainer(6)
    trainer.fit(model, datamodule=data)
    assert len(set(shapes)) >= 2 and any(h != w for h, w in shapes)  # 16x16, 20x12 and 12x20
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert any(not torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_a_bucket_smaller_than_a_batch_never_holds_an_image_twice(tmp_path):
    root = tmp_path / "rare"
    for i in range(10):  # nine squares and one panorama, the only image of its bucket
        folder = root / "train" / ("rose", "daisy")[i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        builders.random_image(96 if i == 0 else 48, 48).save(folder / f"{i}.png")
    datamodule = _on_rank(_bucketed(root, val_size=1, batch_size=4), 0, 1)
    stream = datamodule.train_set
    stream.epochs = 3
    batches = [batch["index"].tolist() for batch in StatefulDataLoader(stream, batch_size=None)]
    assert all(len(set(batch)) == len(batch) for batch in batches)
    rows = len(stream.dataset)
    assert collections.Counter(i for batch in batches for i in batch) == {i: 3 for i in range(rows)}
