"""Every data source through the DataModule, with captions, sharding, resume and bad files."""

import io

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature
from hydra.utils import instantiate
from PIL import Image
from torchdata.stateful_dataloader import StatefulDataLoader

from diffusion_lab.data import DigitsDataModule, ImageDataModule
from diffusion_lab.data.decoding import BadSample, decode_image
from diffusion_lab.data.stream import ImageStream
from diffusion_lab.data.transforms import to_signed_unit
from tests import builders


def _module(path, **overrides) -> ImageDataModule:
    settings = dict(path=str(path), image_size=16, batch_size=4, num_workers=0, val_size=4, streaming=False)
    module = ImageDataModule(**{**settings, **overrides})
    module.setup("fit")
    return module


def _first_batch(module: ImageDataModule) -> dict:
    batch = next(iter(module.train_dataloader()))
    assert batch["pixels"].dtype == torch.uint8  # workers ship bytes; floats are made on the device
    return module.on_after_batch_transfer(batch, 0)


# ---- the embedded digits ----------------------------------------------------------------------------
def test_digits_are_real_images_in_range_with_a_disjoint_held_out_split():
    data = DigitsDataModule(image_size=16, batch_size=32, val_fraction=0.1)
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 1797 and len(data.val_set) == 180
    assert not set(data.train_set.indices.tolist()) & set(data.val_set.indices.tolist())
    batch = next(iter(data.train_dataloader()))
    assert batch["pixels"].shape == (32, 1, 16, 16)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1 and batch["pixels"].std() > 0.3


# ---- sources ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("streaming", [False, True])
def test_image_folder_gives_labels_from_class_folders(tmp_path, streaming):
    builders.write_image_folder(tmp_path)
    batch = _first_batch(_module(tmp_path, label_column="label", streaming=streaming))
    assert batch["pixels"].shape == (4, 3, 16, 16) and batch["pixels"].dtype == torch.float32
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    assert set(batch["label"].tolist()) <= {0, 1, 2}


@pytest.mark.parametrize("streaming", [False, True])
def test_flowers_parquet_captions_name_the_species(tmp_path, streaming):
    builders.write_flowers_parquet(tmp_path)
    module = _module(
        tmp_path, streaming=streaming, label_column="label", label_display="oxford_flowers_102",
        caption_template="a photo of a {label}, a type of flower",
    )  # fmt: skip
    batch = _first_batch(module)
    for label, caption in zip(batch["label"].tolist(), batch["caption"], strict=True):
        number = int(builders.FLOWER_LABEL_NAMES[label])  # label 3 is class '101', a trumpet creeper
        from diffusion_lab.data.captions import OXFORD_FLOWERS_102

        assert caption == f"a photo of a {OXFORD_FLOWERS_102[number - 1]}, a type of flower"


def test_butterflies_config_trains_on_a_local_copy_with_the_hub_schema(tmp_path, compose_config):
    builders.write_butterflies_parquet(tmp_path / "butterflies")
    cfg = compose_config(
        "data=butterflies", f"data.path={tmp_path / 'butterflies'}", "data.image_size=16", "data.num_workers=0",
        "data.caption_column=name", "data.val_size=4",
    )  # fmt: skip
    module = instantiate(cfg.data)
    module.setup("fit")
    batch = _first_batch(module)
    assert batch["pixels"].shape == (16, 3, 16, 16) and batch["pixels"].min() >= -1
    assert all(caption.startswith("butterfly ") for caption in batch["caption"])
    assert sum(len(b["index"]) for b in module.val_dataloader()) == 4


def test_save_to_disk_directory(tmp_path):
    images = [builders.random_image() for _ in range(10)]
    Dataset.from_dict({"image": images, "caption": [f"c{i}" for i in range(10)]}).save_to_disk(
        str(tmp_path / "saved")
    )
    batch = _first_batch(_module(tmp_path / "saved", caption_column="caption"))
    assert batch["pixels"].shape == (4, 3, 16, 16) and all(c.startswith("c") for c in batch["caption"])


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_caption_tables_resolve_relative_paths_and_skip_missing_captions(tmp_path, kind):
    table = builders.write_caption_table(tmp_path, kind, rows=12, missing_caption_at=5)
    module = _module(table, caption_column="caption", max_bad_fraction=0.2, batch_size=11, val_size=1)
    stream = module.train_set
    stream.epochs = 1
    examples = list(stream)
    assert len(examples) == 10  # 12 rows - 1 held out - 1 without a caption
    assert all(example["caption"].startswith("a picture number") for example in examples)
    assert stream.tally.bad <= 1


# ---- decoding ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "L", "CMYK", "I;16", "I", "F", "1"])
@pytest.mark.parametrize("channels", [3, 1])
def test_any_mode_decodes_to_the_models_channels(mode, channels):
    if mode in ("I;16", "I", "F"):
        image = Image.fromarray((np.arange(20 * 24).reshape(20, 24) * 50).astype(np.uint16)).convert(mode)
    else:
        image = builders.random_image(mode=mode)
    decoded = decode_image(image, channels)
    assert decoded.mode == ("L" if channels == 1 else "RGB") and decoded.size == (24, 20)
    if mode in ("I;16", "I", "F"):  # scaled, not clipped to white
        assert 0 < np.asarray(decoded).mean() < 255


def test_exif_orientation_is_honoured():
    image = builders.random_image(40, 20)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image({"bytes": buffer.getvalue(), "path": None}).size == (20, 40)


def test_large_jpegs_are_decoded_at_reduced_size_but_never_below_the_target():
    buffer = io.BytesIO()
    builders.random_image(800, 600).save(buffer, format="JPEG")
    decoded = decode_image({"bytes": buffer.getvalue()}, min_size=128)
    assert decoded.size == (200, 150)  # 1/4 scale: the smallest whose shorter side is >= 128


def test_unreadable_images_raise_bad_sample(tmp_path):
    names = builders.add_broken_files(tmp_path)
    for name in names:
        with pytest.raises(BadSample):
            decode_image({"bytes": None, "path": str(tmp_path / name)})


# ---- bad data ---------------------------------------------------------------------------------------
def test_corrupt_files_are_skipped_counted_and_named(tmp_path, caplog):
    builders.write_image_folder(tmp_path, per_class=10)
    broken = builders.add_broken_files(tmp_path / "train" / "rose")
    module = _module(tmp_path, label_column="label", max_bad_fraction=0.2, val_size=1)
    stream = module.train_set
    stream.epochs = 1
    examples = list(stream)
    assert len(examples) + stream.tally.bad == len(module.train_set.dataset)
    assert stream.tally.bad == sum(
        1 for row in module.train_set.dataset if row["image"]["path"].endswith(tuple(broken))
    )
    assert any(name in message for name in broken for message in caplog.messages)


def test_too_many_bad_rows_stop_the_run_with_examples(tmp_path):
    builders.write_image_folder(tmp_path, per_class=2)
    builders.add_broken_files(tmp_path / "train" / "rose")
    module = _module(tmp_path, max_bad_fraction=0.01, val_size=1)
    with pytest.raises(
        RuntimeError, match=r"could not be used .* Examples:\n .*(empty|truncated|notes)\.jpg"
    ):
        list(iter(module.train_set))


def test_an_empty_dataset_fails_before_training(tmp_path):
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    (tmp_path / "data").mkdir()
    Dataset.from_dict({"image": [], "label": []}, features=features).to_parquet(
        str(tmp_path / "data" / "train.parquet")
    )
    for streaming in (False, True):
        with pytest.raises(ValueError, match="has no rows"):
            _module(tmp_path, streaming=streaming)


def test_a_missing_column_is_named_with_the_columns_found(tmp_path):
    builders.write_image_folder(tmp_path)
    with pytest.raises(
        ValueError, match=r"data.label_column='species' not found; its columns are \['image', 'label'\]"
    ):
        _module(tmp_path, label_column="species")


# ---- sharding and resume ----------------------------------------------------------------------------
def _indexed_dataset(rows: int) -> Dataset:
    return Dataset.from_dict(
        {"image": [builders.random_image(8, 8) for _ in range(rows)], "n": list(range(rows))}
    )


def _identity_stream(dataset, rank, world, streaming, epochs=1, shuffle=True):
    if streaming:
        dataset = dataset.to_iterable_dataset(num_shards=4)
    return ImageStream(
        dataset, lambda row, entropy, index: {"n": row["n"]}, rank=rank, world_size=world, shuffle=shuffle, seed=3,
        shuffle_buffer=8, epochs=epochs,
    )  # fmt: skip


@pytest.mark.parametrize("streaming", [False, True])
def test_two_ranks_with_two_workers_each_cover_an_epoch_exactly_once(streaming):
    dataset = _indexed_dataset(37)
    seen = []
    for rank in range(2):
        loader = StatefulDataLoader(
            _identity_stream(dataset, rank, 2, streaming), batch_size=3, num_workers=2
        )
        seen += [n for batch in loader for n in batch["n"].tolist()]
    assert sorted(seen) == list(range(37))


@pytest.mark.parametrize(("streaming", "workers"), [(False, 0), (False, 2), (True, 0)])
def test_a_resumed_loader_continues_where_it_stopped(streaming, workers):
    dataset = _indexed_dataset(30)

    def loader():
        stream = _identity_stream(dataset, 0, 1, streaming, epochs=None, shuffle=not streaming)
        return StatefulDataLoader(stream, batch_size=4, num_workers=workers)

    straight = iter(loader())
    first = [next(straight)["n"].tolist() for _ in range(5)]  # past the end of epoch 0 (30 rows)
    interrupted = loader()
    iterator = iter(interrupted)
    for _ in range(3):
        next(iterator)
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert [batch["n"].tolist() for _, batch in zip(range(2), resumed, strict=False)] == first[3:]
    if not streaming:  # shuffled, so the order really was restored, not re-derived
        assert sum(first[:3], []) != list(range(12))


def test_epochs_are_reshuffled():
    dataset = _indexed_dataset(16)
    stream = _identity_stream(dataset, 0, 1, streaming=False, epochs=2)
    order = [example["n"] for example in stream]
    assert sorted(order[:16]) == sorted(order[16:]) == list(range(16)) and order[:16] != order[16:]


def test_random_crops_follow_the_entropy_bits_and_flips_the_keys():
    from diffusion_lab.data.buckets import Bucket, cover_and_crop
    from diffusion_lab.data.transforms import crop, flip_rows, random_flips, resize_to_cover

    image = Image.fromarray(np.arange(40 * 20 * 3, dtype=np.uint8).reshape(20, 40, 3) % 251)
    resized = resize_to_cover(image, cover_and_crop(40, 20, Bucket.square(10)))
    assert resized.shape == (10, 20, 3)

    def cut(entropy: int) -> torch.Tensor:
        return crop(resized, cover_and_crop(40, 20, Bucket.square(10), center=False, entropy=entropy))

    outputs = {tuple(cut(entropy).flatten().tolist()) for entropy in range(0, 2**26, 2**20 + 3)}
    assert len(outputs) == 11  # every offset of the spare 10 columns
    assert torch.equal(cut(12345), cut(12345))
    flips = random_flips(0, 3, torch.arange(2000))
    assert abs(flips.float().mean().item() - 0.5) < 0.04
    assert torch.equal(flips, random_flips(0, 3, torch.arange(2000)))
    assert not torch.equal(flips, random_flips(0, 4, torch.arange(2000)))
    images = torch.randn(4, 3, 5, 5)
    flipped = flip_rows(images, torch.tensor([True, False, True, False]))
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])


def test_validation_stream_repeats_in_full_with_persistent_workers(tmp_path):
    builders.write_image_folder(tmp_path, per_class=20)
    module = _module(tmp_path, num_workers=1, val_size=5)
    loader = module.val_dataloader()
    first, second = ([i for batch in loader for i in batch["index"].tolist()] for _ in range(2))
    assert len(first) == 5 and first == second


# ---- the pixel cache ------------------------------------------------------------------------------------
def _epoch(module: ImageDataModule) -> list[dict]:
    module.train_set.epochs = 1
    return list(module.train_set)


def test_the_pixel_cache_gives_the_batches_decoding_gives(tmp_path, monkeypatch):
    """Same rows, same random crops (entropy bits) and the same device flips (keys), without decoding."""
    from diffusion_lab.data import image_datamodule

    builders.write_image_folder(tmp_path / "data", per_class=4)
    builders.add_broken_files(tmp_path / "data" / "train" / "rose")
    settings = dict(
        center_crop=False, random_flip=True, max_bad_fraction=0.5, cache_dir=str(tmp_path / "pixels")
    )
    decoded = _module(tmp_path / "data", pixel_cache=False, **settings)
    cached = _module(tmp_path / "data", **settings)
    assert not decoded.pixel_caches and set(cached.pixel_caches) == {"train", "val"}
    assert len(cached.pixel_caches["train"].bad_rows) + len(cached.pixel_caches["val"].bad_rows) == 3

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached row was decoded")

    monkeypatch.setattr(image_datamodule, "decode_image", no_decoding)
    from_cache = _epoch(cached)
    monkeypatch.undo()
    from_files = _epoch(decoded)
    assert [e["index"] for e in from_cache] == [e["index"] for e in from_files]
    assert (
        cached.train_set.tally.bad == decoded.train_set.tally.bad > 0
    )  # corrupt rows: skipped and counted alike
    assert all(torch.equal(a["pixels"], b["pixels"]) for a, b in zip(from_cache, from_files, strict=True))

    class Training:
        training, global_step = True, 5

    batch = torch.utils.data.default_collate(from_cache[:8])
    cached.trainer = decoded.trainer = Training()
    flipped = cached.on_after_batch_transfer(batch, 0)["pixels"]
    assert torch.equal(flipped, decoded.on_after_batch_transfer(batch, 0)["pixels"])
    assert not torch.equal(flipped, to_signed_unit(batch["pixels"]))  # some images of the batch were flipped


def test_the_pixel_cache_key_follows_content_and_transform(tmp_path):
    import os

    builders.write_image_folder(tmp_path / "data", per_class=3)
    root = tmp_path / "pixels"

    def folders(**overrides) -> set:
        module = _module(tmp_path / "data", cache_dir=str(root), **overrides)
        return {cache.folder for cache in module.pixel_caches.values()}

    first = folders()
    assert folders() == first  # reused, not rebuilt
    assert folders(image_size=8).isdisjoint(first)  # another resolution
    assert folders(channels=1).isdisjoint(first)  # another mode
    assert (
        folders(random_flip=False, center_crop=False, batch_size=2) == first
    )  # drawn live / read differently
    image = next((tmp_path / "data" / "train" / "daisy").glob("*.png"))
    builders.random_image().save(image)
    os.utime(image, ns=(1, 1))
    changed = folders()
    assert changed != first  # the split that holds the rewritten file gets a new cache
    assert not folders(pixel_cache=False) and not folders(pixel_cache_max_gb=1e-9)
