"""DataLoaders whose position goes into the Lightning checkpoint."""

import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader


def resumable_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
) -> StatefulDataLoader:
    """A StatefulDataLoader with its own seeded generator.

    Lightning saves and restores its `state_dict()` (sampler position and generator), so a run resumed
    mid-epoch continues with the next batch instead of replaying the epoch; the private generator keeps
    the global RNG out of the data order.
    """
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


class PrefetchAwareLoader(StatefulDataLoader):
    """A StatefulDataLoader for streams (no length) whose saved position is the one the model has reached.

    Lightning fetches one batch ahead from a loader without a length (to know whether the batch in hand is
    the last one) and saves the loader's state at checkpoint time, after that prefetch: a plain
    StatefulDataLoader would resume one batch late, skipping a batch. This loader reports the state as of
    the batch before the last one it handed out. The exact-resume test through Lightning guards this.
    """

    def __iter__(self):
        iterator = super().__iter__()
        current = self._reported_state = super().state_dict()
        for batch in iterator:
            self._reported_state, current = current, super().state_dict()
            yield batch

    def state_dict(self) -> dict:
        return getattr(self, "_reported_state", None) or super().state_dict()
