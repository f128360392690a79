"""Batches of one bucket each, from examples that arrive in any order of buckets.

Every batch holds examples of one shape (one aspect-ratio bucket), so it stacks without padding. A bucket
fills up to `batch_size` and is emitted; a bucket still partial when an epoch ends *carries over*: its
examples wait in the buffer and open that bucket's first batch of the next epoch. Nothing is dropped and
nothing duplicated (the fix for SimpleTuner issues 44 and 745, where a bucket smaller than a batch was thrown
away every epoch); a bucket too small to fill a batch goes out smaller once its images come round again. A
finite pass (validation, building a cache) ends by emitting the partial buckets as they
are: smaller batches, still one shape each.
"""

from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

from torch.utils.data import DataLoader, Dataset, default_collate


@dataclass
class Waiting:
    """An example in the buffer, with what rebuilds it after a resume: its epoch and index (the stream's key
    for its crop and noise) and, for streamed data that cannot be read again by index, its row. `identity`
    names the image across epochs (the row index, or a digest of a streamed row)."""

    epoch: int
    index: int
    row: dict | None
    example: dict = field(repr=False)
    identity: Hashable = None

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "row": self.row}


def collate(batch: list[Waiting]) -> dict:
    return default_collate([item.example for item in batch])


class BucketBatcher:
    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        self.batch_size = batch_size
        self.pending: dict[Hashable, list[Waiting]] = {}

    def add(self, bucket: Hashable, item: Waiting) -> list[Waiting] | None:
        """The bucket's full batch once `item` completes one, else None (the item waits). A bucket with fewer
        images than a batch sees its images come round again, an epoch later, before it fills: then what
        waits goes out as a smaller batch, so that no batch holds one image twice (with the same noise)."""
        waiting = self.pending.setdefault(bucket, [])
        if any(other.identity == item.identity for other in waiting):
            self.pending[bucket] = [item]
            return waiting
        waiting.append(item)
        if len(waiting) < self.batch_size:
            return None
        del self.pending[bucket]
        return waiting

    def flush(self) -> Iterator[list[Waiting]]:
        """The partial batches, in bucket order, emptying the buffer."""
        for bucket in sorted(self.pending):
            yield self.pending.pop(bucket)

    def __len__(self) -> int:
        return sum(len(waiting) for waiting in self.pending.values())

    def state_dict(self) -> dict:
        return {bucket: [item.state() for item in items] for bucket, items in self.pending.items()}


def batches_by_shape(
    examples: Iterable[dict] | Dataset, batch_size: int, key: str = "pixels"
) -> Iterator[dict]:
    """One finite pass over `examples` as collated batches of one `key` shape each (the partial ones last):
    what a cache or a reference set built from bucketed data reads."""
    batcher = BucketBatcher(batch_size)
    for index, example in enumerate(DataLoader(examples, batch_size=None, num_workers=0)):
        batch = batcher.add(tuple(example[key].shape), Waiting(0, index, None, example, index))
        if batch is not None:
            yield collate(batch)
    yield from map(collate, batcher.flush())
