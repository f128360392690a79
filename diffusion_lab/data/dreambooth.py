"""DreamBooth's data (Ruiz et al. 2023, arXiv:2208.12242): a folder of 5-50 pictures of one subject, each captioned
with the instance prompt and its trigger token ("a photo of sks dog"), or with its own caption file beside it.

Everything else is `ImageDataModule`'s (buckets, crops, flips, masks, the latent cache): the folder becomes a
table of (image, caption) rows. There is nothing to hold out with so few pictures: validation reuses the first
`val_size` of them. The class prompt ("a photo of a dog", the trigger's class) is the preservation terms' and the
grid's (`model/preservation=prior|output`, `callbacks.prompt_grid`), kept here where the data is described.
"""

from pathlib import Path

import datasets

from diffusion_lab.data.image_datamodule import ImageDataModule
from diffusion_lab.errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def instance_rows(instance_dir: str, instance_prompt: str) -> dict[str, list[str]]:
    """{"image": paths, "caption": captions}: every image in the folder (not below it), captioned by
    `<stem>.txt` beside it when there is one (write the trigger in it), else by `instance_prompt`."""
    folder = Path(instance_dir).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"data.instance_dir={instance_dir}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ConfigError(f"data.instance_dir={instance_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    captions = []
    for path in files:
        sidecar = path.with_suffix(".txt")
        text = sidecar.read_text().strip() if sidecar.is_file() else ""
        captions.append(text or instance_prompt)
    return {"image": [str(p) for p in files], "caption": captions}


class DreamBoothDataModule(ImageDataModule):
    def __init__(
        self,
        instance_dir: str,
        instance_prompt: str,
        class_prompt: str | None = None,
        val_size: int = 2,
        **image_settings,
    ) -> None:
        if not instance_prompt:
            raise ConfigError(
                "data.instance_prompt is empty: name the subject with its trigger, e.g. 'a photo of sks dog'"
            )
        super().__init__(path=str(instance_dir), streaming=False, val_size=val_size, caption_column="caption",
                         **image_settings)  # fmt: skip
        self.instance_dir, self.instance_prompt, self.class_prompt = (
            instance_dir,
            instance_prompt,
            class_prompt,
        )
        # (ImageDataModule recorded its own arguments; these are part of what the data is, and of cache keys: not
        # the class prompt, which changes no cached latent)
        self.hparams.update(instance_dir=str(instance_dir), instance_prompt=instance_prompt)

    def _load(self, split: str):
        rows = instance_rows(self.instance_dir, self.instance_prompt)
        table = datasets.Dataset.from_dict(rows)
        return table.cast_column("image", datasets.Image(decode=False))

    def content_key(self, split: str) -> str | None:
        """The image files' listing and every caption (a caption file edited is new content)."""
        import hashlib

        captions = instance_rows(self.instance_dir, self.instance_prompt)["caption"]
        digest = hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16]
        return f"{super().content_key(split)}+captions:{digest}"

    def _splits(self) -> tuple:
        train = self._load("train")
        return train, train.select(range(min(self.hparams.val_size, len(train))))
