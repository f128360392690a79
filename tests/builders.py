"""Small local datasets in the hub's schemas, with the odd and broken files real collections contain."""

import io
import json
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

RNG = np.random.default_rng(0)
# nelorth/oxford-flowers: ClassLabel names are the class numbers as text, in string order.
FLOWER_LABEL_NAMES = sorted(str(number) for number in range(1, 103))


def random_image(width: int = 24, height: int = 20, mode: str = "RGB") -> Image.Image:
    pixels = RNG.integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB").convert(mode)


def write_image_folder(root: Path, per_class: int = 4, classes=("daisy", "rose", "tulip")) -> Path:
    """`root/train/<class>/*` in assorted formats and modes."""
    formats = [("png", "RGB"), ("png", "RGBA"), ("png", "L"), ("png", "P"), ("jpg", "CMYK"), ("png", "LA")]
    for class_name in classes:
        folder = root / "train" / class_name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            extension, mode = formats[i % len(formats)]
            random_image(mode=mode).save(folder / f"{class_name}_{i}.{extension}")
    return root


def add_broken_files(folder: Path) -> list[str]:
    """A zero-byte JPEG, a truncated JPEG and a text file with an image extension."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.jpg").write_bytes(b"")
    buffer = io.BytesIO()
    random_image(64, 64).save(buffer, format="JPEG")
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (folder / "notes.jpg").write_text("not an image")
    return ["empty.jpg", "truncated.jpg", "notes.jpg"]


def write_flowers_parquet(root: Path, rows: int = 24) -> Path:
    """nelorth/oxford-flowers' schema: `image`, `label` (ClassLabel '1'..'102' in string order)."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=FLOWER_LABEL_NAMES)})
    data = {"image": [random_image() for _ in range(rows)], "label": [i % 102 for i in range(rows)]}
    (root / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(data, features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def write_butterflies_parquet(root: Path, rows: int = 24) -> Path:
    """huggan/smithsonian_butterflies_subset's schema: `image` plus metadata strings, split train."""
    text = Value("string")
    features = Features(
        {"image": ImageFeature(), "name": text, "scientific_name": text, "taxonomy": text, "image_url": text,
         "id": text, "sim_score": Value("float64")}
    )  # fmt: skip
    data = {
        "image": [random_image(40, 30) for _ in range(rows)],
        "name": [f"butterfly {i}" for i in range(rows)],
        "scientific_name": [f"Papilio {i}" for i in range(rows)],
        "taxonomy": ["Animalia, Arthropoda, Insecta, Lepidoptera"] * rows,
        "image_url": [f"https://example.org/{i}.jpg" for i in range(rows)],
        "id": [str(i) for i in range(rows)],
        "sim_score": [0.5] * rows,
    }
    (root / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(data, features=features).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root


def write_caption_table(root: Path, kind: str, rows: int = 8, missing_caption_at: int | None = None) -> Path:
    """images/ plus captions.jsonl or captions.csv with relative paths."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(rows):
        random_image().save(root / "images" / f"{i}.png")
        caption = "" if i == missing_caption_at else f"a picture number {i}"
        records.append({"image": f"images/{i}.png", "caption": caption})
    if kind == "jsonl":
        path = root / "captions.jsonl"
        path.write_text("".join(json.dumps(record) + "\n" for record in records))
    else:
        path = root / "captions.csv"
        path.write_text("image,caption\n" + "".join(f"{r['image']},{r['caption']}\n" for r in records))
    return path


# (width, height) of the mixed-aspect folder: landscape, portrait, square, panoramas and odd sizes.
MIXED_SIZES = [
    (60, 30),
    (30, 60),
    (40, 40),
    (64, 36),
    (36, 64),
    (50, 40),
    (40, 50),
    (90, 30),
    (33, 47),
    (120, 60),
]


def write_mixed_aspect_folder(root: Path, count: int = 23, classes=("daisy", "rose")) -> Path:
    """`root/train/<class>/*` of `count` images cycling through MIXED_SIZES, PNG and JPEG."""
    for i in range(count):
        folder = root / "train" / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        width, height = MIXED_SIZES[i % len(MIXED_SIZES)]
        random_image(width, height).save(folder / f"{i:03d}.{'jpg' if i % 3 == 0 else 'png'}")
    return root


def write_mixed_aspect_parquet(root: Path, count: int = 24, files: int = 2) -> Path:
    """The mixed-aspect images as `files` parquet shards (`image`, `label`): streamed, each loader worker
    reads its own shard."""
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["daisy", "rose"])})
    images = [random_image(*MIXED_SIZES[i % len(MIXED_SIZES)]) for i in range(count)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    for shard in range(files):
        rows = range(shard, count, files)
        data = {"image": [images[i] for i in rows], "label": [i % 2 for i in rows]}
        path = root / "data" / f"train-{shard:05d}-of-{files:05d}.parquet"
        Dataset.from_dict(data, features=features).to_parquet(str(path))
    return root
