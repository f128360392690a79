"""Bytes to a PIL image in the model's mode, and the bookkeeping of what could not be decoded."""

import io
import logging
import math

import numpy as np
from PIL import Image, ImageOps

log = logging.getLogger(__name__)


class BadSample(ValueError):
    """A row that cannot become a training example (corrupt image, missing caption, ...)."""


def _open(value) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):  # datasets' undecoded Image: {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return Image.open(io.BytesIO(value["bytes"]))
        value = value.get("path")
    if isinstance(value, (str, bytes)) and value:
        return Image.open(value) if isinstance(value, str) else Image.open(io.BytesIO(value))
    raise BadSample(f"no image data ({type(value).__name__})")


def _to_8_bit(image: Image.Image) -> Image.Image:
    """16- and 32-bit integer and float modes scaled to 8-bit grey (PIL's convert would clip them)."""
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
    return Image.fromarray(scaled.astype(np.uint8), mode="L")


def _upright(full_size: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The file's (width, height) turned as EXIF turned the pixels (a draft shrinks both sides alike)."""
    width, height = full_size
    aspect, file_aspect = math.log(size[0] / size[1]), math.log(width / height)
    turned = abs(aspect + file_aspect) < abs(aspect - file_aspect)
    return (height, width) if turned else (width, height)


def decode_image(value, channels: int = 3, min_size: int | None = None) -> Image.Image:
    """A fully loaded RGB (channels=3) or L (channels=1) image, EXIF orientation applied.

    `min_size`: JPEGs are decoded at the smallest DCT scale (1/2, 1/4, 1/8) whose shorter side is still at
    least this, which is most of the decoding cost saved when photos are much larger than the model's input.
    `image.info["original_size"]` is the file's (width, height) before that draft, upright: SDXL's
    micro-conditioning records it. Raises BadSample for anything PIL cannot read.
    """
    try:
        image = _open(value)
        full_size = image.size
        if min_size and image.format == "JPEG":
            scale = min(image.size) / min_size
            image.draft(image.mode, (image.width / scale, image.height / scale))
        if "exif" in image.info or image.format not in ("JPEG", "PNG"):  # no EXIF block: nothing to turn
            ImageOps.exif_transpose(image, in_place=True)
        if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            image = _to_8_bit(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            # Composite onto white: transparent pixels have undefined colour underneath.
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        target = "L" if channels == 1 else "RGB"
        if image.mode != target:
            image = image.convert(target)
        image.load()
        image.info["original_size"] = _upright(full_size, image.size)
        return image
    except BadSample:
        raise
    except Exception as error:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError, ...
        raise BadSample(f"{type(error).__name__}: {error}") from error


MASK_SUFFIXES = (".png", ".webp", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


def decode_mask(value, from_alpha: bool = False) -> Image.Image:
    """A loss mask as 8-bit grey (L), EXIF orientation applied as to images: a mask file's grey levels, or with
    `from_alpha` the image's own alpha channel (opaque = counts). Raises BadSample when there is none."""
    try:
        image = _open(value)
        if "exif" in image.info or image.format not in ("JPEG", "PNG"):  # turned as decode_image turns images
            ImageOps.exif_transpose(image, in_place=True)
        if not from_alpha:
            if image.mode in (
                "I;16",
                "I;16B",
                "I;16L",
                "I",
                "F",
            ):  # 16-bit / float masks: scaled, not clipped
                return _to_8_bit(image)
            return image.convert("L")
        if image.mode not in ("RGBA", "LA", "PA") and not (
            image.mode == "P" and "transparency" in image.info
        ):
            raise BadSample(f"data.alpha_mask: the image has no alpha channel (mode {image.mode})")
        return image.convert("RGBA").getchannel("A")
    except BadSample:
        raise
    except Exception as error:
        raise BadSample(f"mask: {type(error).__name__}: {error}") from error


def mask_file(mask_dir: str, image_path: str | None) -> str:
    """The mask beside an image: `<mask_dir>/<the image's stem>.<png|webp|...>`."""
    from pathlib import Path

    if not image_path:
        raise BadSample("data.mask_dir: the row names no image file to find its mask by")
    stem = Path(image_path).stem
    for suffix in MASK_SUFFIXES:
        candidate = Path(mask_dir).expanduser() / f"{stem}{suffix}"
        if candidate.is_file():
            return str(candidate)
    raise BadSample(f"no mask {stem}.png (or {', '.join(MASK_SUFFIXES[1:])}) in data.mask_dir={mask_dir}")


class BadDataTally:
    """Counts skipped rows, keeps a few examples, and stops the run once too large a fraction is bad."""

    def __init__(self, max_bad_fraction: float, min_rows: int = 50, examples: int = 5) -> None:
        self.max_bad_fraction, self.min_rows, self.keep = max_bad_fraction, min_rows, examples
        self.seen = 0
        self.bad = 0
        self.examples: list[str] = []

    def ok(self) -> None:
        self.seen += 1

    def skip(self, where: str, reason: str) -> None:
        self.seen += 1
        self.bad += 1
        if len(self.examples) < self.keep:
            self.examples.append(f"{where}: {reason}")
        log.warning("skipped %s: %s (%d of %d rows skipped so far)", where, reason, self.bad, self.seen)
        if self.seen >= self.min_rows and self.bad / self.seen > self.max_bad_fraction:
            self.fail()

    def fail(self) -> None:
        raise RuntimeError(
            f"{self.bad} of {self.seen} rows could not be used ({self.bad / self.seen:.1%} > "
            f"data.max_bad_fraction={self.max_bad_fraction:.1%}). Examples:\n  " + "\n  ".join(self.examples)
        )

    def state_dict(self) -> dict:
        return {"seen": self.seen, "bad": self.bad, "examples": list(self.examples)}

    def load_state_dict(self, state: dict) -> None:
        self.seen, self.bad, self.examples = state["seen"], state["bad"], list(state["examples"])
