"""One `load_dataset` entry for every source: a hub id, an image folder, parquet / arrow files, a
`save_to_disk` directory, or a CSV / JSONL table of image paths and captions."""

from pathlib import Path

import datasets
from datasets import Image, load_dataset, load_from_disk

TABLE_BUILDERS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}


def is_saved_to_disk(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in ("dataset_dict.json", "state.json"))


def load_split(
    path: str,
    split: str,
    *,
    streaming: bool,
    name: str | None = None,
    image_column: str = "image",
) -> datasets.Dataset | datasets.IterableDataset:
    """The split `split` of `path`, with the image column left undecoded (bytes + path).

    Decoding is ours to do (`decoding.decode_image`), so a corrupt file is skipped and counted instead of
    raising inside the datasets library, and JPEGs can be decoded at reduced size.
    """
    local = Path(path).expanduser()
    if is_saved_to_disk(local):
        dataset = load_from_disk(str(local))
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        if streaming:
            dataset = dataset.to_iterable_dataset(num_shards=max(1, min(64, len(dataset) // 64)))
    elif local.is_file() and local.suffix in TABLE_BUILDERS:
        dataset = load_dataset(
            TABLE_BUILDERS[local.suffix], data_files=str(local), split=split, streaming=streaming
        )
        if local.suffix in (".csv", ".jsonl", ".json"):
            dataset = _resolve_relative_paths(dataset, image_column, local.parent)
    else:  # a hub id, or a local folder that the datasets library recognises (imagefolder, parquet, ...)
        dataset = load_dataset(str(local) if local.exists() else path, name, split=split, streaming=streaming)
    columns = dataset.column_names
    empty = isinstance(dataset, datasets.Dataset) and len(dataset) == 0  # reported by the caller, by name
    if columns is not None and image_column in columns and not empty:
        dataset = dataset.cast_column(image_column, Image(decode=False))
    return dataset


def _resolve_relative_paths(dataset, image_column: str, base: Path):
    """Image paths in a table are relative to the table's folder, as users write them."""
    columns = dataset.column_names
    if columns is None or image_column not in columns:
        return dataset

    def resolve(row: dict) -> dict:
        value = row[image_column]
        if isinstance(value, str) and not Path(value).is_absolute():
            value = str(base / value)
        return {image_column: value}

    return dataset.map(resolve)
