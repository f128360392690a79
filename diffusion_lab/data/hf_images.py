"""Image datasets read through `datasets.load_dataset`: a hub id or a local copy with the hub's schema."""

import lightning as L
import torch
from datasets import load_dataset
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from diffusion_lab.data.loaders import resumable_loader


def image_transform(image_size: int, channels: int, random_flip: bool, center_crop: bool) -> v2.Compose:
    """Shorter side to `image_size`, square crop, optional flip, tensor in [-1, 1]."""
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(image_size) if center_crop else v2.RandomCrop(image_size),
            v2.RandomHorizontalFlip() if random_flip else v2.Identity(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.5] * channels, [0.5] * channels),
        ]
    )


class HFImages(Dataset):
    """Items of a map-style `datasets.Dataset` as training dicts."""

    def __init__(
        self, dataset, transform, image_column: str, label_column: str | None, channels: int
    ) -> None:
        self.dataset, self.transform = dataset, transform
        self.image_column, self.label_column = image_column, label_column
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        row = self.dataset[i]
        image: Image.Image = row[self.image_column]
        item = {"pixels": self.transform(image.convert(self.mode)), "index": i}
        if self.label_column is not None:
            item["label"] = row[self.label_column]
        return item


class HFImageDataModule(L.LightningDataModule):
    """`path` is a hub id (`nelorth/oxford-flowers`) or a local folder / file set in the same schema."""

    def __init__(
        self,
        path: str,
        image_size: int = 64,
        channels: int = 3,
        batch_size: int = 16,
        train_split: str = "train",
        val_split: str | None = None,
        val_size: int = 64,
        image_column: str = "image",
        label_column: str | None = None,
        random_flip: bool = True,
        center_crop: bool = True,
        num_workers: int = 4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: HFImages | None = None
        self.val_set: HFImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        h = self.hparams
        train = load_dataset(h.path, split=h.train_split)
        missing = [
            c for c in (h.image_column, h.label_column) if c is not None and c not in train.column_names
        ]
        if missing:
            raise ValueError(f"{h.path}: column(s) {missing} not found; the dataset has {train.column_names}")
        if h.val_split is not None:
            val = load_dataset(h.path, split=h.val_split)
        else:  # hold out a fixed slice of the training split
            parts = train.train_test_split(test_size=min(h.val_size, len(train) // 10 or 1), seed=h.seed)
            train, val = parts["train"], parts["test"]
        self.train_set = HFImages(
            train,
            image_transform(h.image_size, h.channels, h.random_flip, h.center_crop),
            h.image_column,
            h.label_column,
            h.channels,
        )
        self.val_set = HFImages(
            val,
            image_transform(h.image_size, h.channels, False, True),
            h.image_column,
            h.label_column,
            h.channels,
        )

    def train_dataloader(self):
        h = self.hparams
        return resumable_loader(
            self.train_set, h.batch_size, shuffle=True, seed=h.seed, num_workers=h.num_workers, drop_last=True
        )

    def val_dataloader(self):
        return DataLoader(
            self.val_set, batch_size=self.hparams.batch_size, num_workers=self.hparams.num_workers
        )
