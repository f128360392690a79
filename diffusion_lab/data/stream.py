"""An endless, sharded, resumable stream of training examples over a datasets.Dataset or IterableDataset."""

import logging
from collections.abc import Callable, Iterator

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import IterableDataset, get_worker_info

from diffusion_lab.core.random import mix_key
from diffusion_lab.data.decoding import BadDataTally, BadSample

log = logging.getLogger(__name__)


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


class ImageStream(IterableDataset):
    """Rows -> examples, each rank and loader worker reading a disjoint part of every epoch.

    Map-style data (local files) is read in a permutation drawn from seed + epoch, split as
    permutation[rank::world][worker::workers]: exact coverage and an exact resume position. Streamed data
    (hub) is split with `split_dataset_by_node` and the datasets library's per-worker shards, shuffled
    with a buffer reseeded per epoch (`set_epoch`); its position comes from `IterableDataset.state_dict()`
    (the shuffle buffer's contents are not part of that state, as the datasets docs say).

    `epochs=None` streams forever: training length is `trainer.max_steps`. `to_example(row, entropy, index)`
    decodes a row or raises BadSample, which is skipped and counted; its random augmentation uses the bits
    of `entropy`, a hash of (seed, epoch, row), so it does not depend on workers, ranks or resumes.
    """

    def __init__(
        self,
        dataset: datasets.Dataset | datasets.IterableDataset,
        to_example: Callable[[dict, int], dict],
        *,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        epochs: int | None = None,
        max_bad_fraction: float = 0.01,
        describe_row: Callable[[dict, int], str] | None = None,
    ) -> None:
        self.dataset, self.to_example = dataset, to_example
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.shuffle_buffer, self.epochs = shuffle, seed, shuffle_buffer, epochs
        self.describe_row = describe_row or (lambda row, index: f"row {index}")
        self.tally = BadDataTally(max_bad_fraction)
        self.epoch, self.position, self.stream_state = 0, 0, None
        self._stream: datasets.IterableDataset | None = None

    @property
    def is_streaming(self) -> bool:
        return isinstance(self.dataset, datasets.IterableDataset)

    def _map_rows(self, worker: int, workers: int) -> Iterator[tuple[int, dict]]:
        size = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(size)
        mine = order[self.rank :: self.world_size][worker::workers].tolist()
        while self.position < len(mine):
            index = mine[self.position]
            self.position += 1
            yield index, self.dataset[index]

    def _streamed_rows(self, worker: int, workers: int) -> Iterator[tuple[int, dict]]:
        if self._stream is None:
            stream = self.dataset
            if self.shuffle:
                stream = stream.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer)
            self._stream = split_dataset_by_node(stream, self.rank, self.world_size)
        self._stream.set_epoch(self.epoch)
        if self.stream_state is not None:
            self._stream.load_state_dict(self.stream_state)
            self.stream_state = None
        for row in self._stream:
            # A key for the noise, unique across ranks, workers and epochs (streams have no row ids).
            index = ((self.epoch * self.world_size + self.rank) * workers + worker) * 2**32 + self.position
            self.position += 1
            yield index, row

    def __iter__(self) -> Iterator[dict]:
        worker, workers = _worker()
        rows = self._streamed_rows if self.is_streaming else self._map_rows
        while self.epochs is None or self.epoch < self.epochs:
            yielded = 0
            for index, row in rows(worker, workers):
                entropy = mix_key(self.seed, self.epoch, index)
                try:
                    example = self.to_example(row, entropy, index)
                except BadSample as error:
                    self.tally.skip(self.describe_row(row, index), str(error))
                    continue
                self.tally.ok()
                example["index"] = index
                yielded += 1
                yield example
            if self.tally.bad and self.tally.bad / max(1, self.tally.seen) > self.tally.max_bad_fraction:
                self.tally.fail()
            if not yielded and self.epochs is None:  # an endless stream that yields nothing would hang
                raise RuntimeError(
                    f"rank {self.rank}, loader worker {worker} got no usable rows in epoch {self.epoch} "
                    f"({self.tally.bad} skipped): the dataset is empty, every row is bad, or it has fewer "
                    f"rows than ranks x workers ({self.world_size} x {workers})"
                )
            self.epoch += 1
            self.position = 0
        # A finite stream (validation) starts over next time, also in a persistent worker.
        self.epoch = 0

    def state_dict(self) -> dict:
        state = {"epoch": self.epoch, "position": self.position, "tally": self.tally.state_dict()}
        if self.is_streaming and self._stream is not None:
            state["stream"] = self._stream.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self.tally.load_state_dict(state["tally"])
        self.stream_state = state.get("stream")
