"""scikit-learn's handwritten digits: 1,797 real 8x8 scans, shipped inside the package, no download."""

import lightning as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader, Dataset

from diffusion_lab.data.loaders import rank_and_world_size, resumable_loader


class TensorImages(Dataset):
    """Images already decoded and resized in memory: (N, C, H, W) in [-1, 1] plus labels."""

    def __init__(
        self,
        pixels: torch.Tensor,
        labels: torch.Tensor,
        indices: torch.Tensor,
        caption_template: str | None = None,
    ) -> None:
        self.pixels, self.labels, self.indices = pixels, labels, indices
        self.caption_template = caption_template

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict:
        item = {"pixels": self.pixels[i], "label": self.labels[i], "index": self.indices[i]}
        if self.caption_template is not None:
            item["caption"] = self.caption_template.format(label=int(self.labels[i]))
        return item


def digits_as_images(image_size: int, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits upsampled (bicubic, antialiased) from 8x8 to `image_size`, scaled to [-1, 1]."""
    digits = load_digits()
    pixels = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # scans are 0..16
    pixels = F.interpolate(pixels, size=(image_size, image_size), mode="bicubic", align_corners=False)
    pixels = (pixels.clamp(0, 1) * 2 - 1).expand(-1, channels, -1, -1).contiguous()
    return pixels, torch.from_numpy(digits.target).long()


class DigitsDataModule(L.LightningDataModule):
    """The embedded default dataset: a fixed random held-out split for validation loss."""

    num_classes = 10

    def __init__(
        self,
        image_size: int = 16,
        channels: int = 1,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        num_workers: int = 0,
        seed: int = 0,
        caption_template: str | None = None,  # e.g. "a handwritten digit {label}", for text-to-image
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorImages | None = None
        self.val_set: TensorImages | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        pixels, labels = digits_as_images(self.hparams.image_size, self.hparams.channels)
        order = torch.randperm(len(pixels), generator=torch.Generator().manual_seed(self.hparams.seed))
        num_val = int(round(len(pixels) * self.hparams.val_fraction))
        val_ids, train_ids = order[:num_val], order[num_val:]
        template = self.hparams.caption_template
        self.train_set = TensorImages(pixels[train_ids], labels[train_ids], train_ids, template)
        self.val_set = TensorImages(pixels[val_ids], labels[val_ids], val_ids, template)

    def examples_for_cache(self, split: str) -> tuple[Dataset, bool]:
        """Each example of `split` once, as the loader yields it (digits have no random augmentation)."""
        self.setup()
        return {"train": self.train_set, "val": self.val_set}[split], False

    def train_dataloader(self):
        return resumable_loader(
            self.train_set,
            self.hparams.batch_size,
            shuffle=True,
            seed=self.hparams.seed,
            num_workers=self.hparams.num_workers,
            drop_last=True,
            **rank_and_world_size(self.trainer),
        )

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.hparams.batch_size, shuffle=False)


def ensure_digit_instances(out_dir: str, digit: int = 3, count: int = 8, image_size: int = 32) -> str:
    """A DreamBooth instance folder from the embedded digits: `count` handwritten `digit`s as RGB PNGs (the
    "subject"), written once then renamed into place. What `experiment=dreambooth_lora_tiny` trains on."""
    from pathlib import Path

    from PIL import Image

    from diffusion_lab.runs.atomic import write_folder

    folder = Path(out_dir)
    names = [f"{digit}_{k:02d}.png" for k in range(count)]
    present = folder.is_dir() and sorted(p.name for p in folder.glob("*.png")) == names
    if present and Image.open(folder / names[0]).size == (image_size, image_size):
        return str(folder)
    pixels, labels = digits_as_images(image_size, channels=3)
    chosen = pixels[labels == digit][:count]

    def write(temporary: Path) -> None:
        for k, image in enumerate(chosen):
            array = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy()
            Image.fromarray(array).save(temporary / f"{digit}_{k:02d}.png")

    try:
        write_folder(folder, write)
    except OSError:  # another process (a DDP rank) renamed its copy into place first
        if not folder.is_dir():
            raise
    return str(folder)
