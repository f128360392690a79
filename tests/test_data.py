"""The embedded digits and a local image folder read through the same `load_dataset` path as the hub."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_lab.data import DigitsDataModule, HFImageDataModule


def test_digits_are_real_images_in_range_with_a_disjoint_held_out_split():
    data = DigitsDataModule(image_size=16, batch_size=32, val_fraction=0.1)
    data.setup("fit")
    assert len(data.train_set) + len(data.val_set) == 1797 and len(data.val_set) == 180
    assert not set(data.train_set.indices.tolist()) & set(data.val_set.indices.tolist())
    batch = next(iter(data.train_dataloader()))
    assert batch["pixels"].shape == (32, 1, 16, 16)
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1 and batch["pixels"].std() > 0.3
    assert set(batch["label"].tolist()) <= set(range(10))


def test_the_train_loader_resumes_mid_epoch():
    data = DigitsDataModule(image_size=8, batch_size=100)
    data.setup("fit")
    loader = data.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    state = loader.state_dict()
    expected = next(iterator)["index"]
    fresh = DigitsDataModule(image_size=8, batch_size=100)
    fresh.setup("fit")
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)
    assert torch.equal(next(iter(resumed))["index"], expected)


@pytest.fixture
def image_folder(tmp_path):
    """`train/<class>/*.png` in odd modes: `load_dataset(dir)` reads it as the hub's imagefolder schema."""
    rng = np.random.default_rng(0)
    for class_name, mode in [("daisy", "RGB"), ("rose", "RGBA"), ("tulip", "L")]:
        folder = tmp_path / "train" / class_name
        folder.mkdir(parents=True)
        for i in range(6):
            channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
            pixels = rng.integers(0, 255, (20, 24, channels), dtype=np.uint8).squeeze()
            Image.fromarray(pixels, mode=mode).save(folder / f"{i}.png")
    return tmp_path


def test_local_image_folder_through_load_dataset(image_folder):
    data = HFImageDataModule(
        path=str(image_folder), image_size=16, batch_size=4, label_column="label", val_size=3, num_workers=0
    )
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["pixels"].shape == (4, 3, 16, 16) and batch["pixels"].dtype == torch.float32
    assert batch["pixels"].min() >= -1 and batch["pixels"].max() <= 1
    assert set(batch["label"].tolist()) <= {0, 1, 2}
    assert len(data.val_set) >= 1


def test_a_missing_column_is_named_with_the_columns_found(image_folder):
    data = HFImageDataModule(path=str(image_folder), label_column="species", num_workers=0)
    with pytest.raises(ValueError, match=r"\['species'\] not found; the dataset has \['image', 'label'\]"):
        data.setup("fit")
