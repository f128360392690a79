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
