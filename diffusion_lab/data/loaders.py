"""DataLoaders whose position goes into the Lightning checkpoint."""

import os
import signal

from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import Dataset, DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.children import die_with_parent


def resumable_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    drop_last: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> StatefulDataLoader:
    """A StatefulDataLoader over this rank's shard of one seeded order.

    The order is the same for every world size (a DistributedSampler seeded by `seed`, reshuffled per epoch
    by Lightning's `set_epoch`) and rank r takes positions r, r + W, ...: so W processes at batch B see, step
    by step, exactly the examples one process sees at batch W x B, without duplicates. The global RNG plays no
    part. Lightning saves and restores the loader's `state_dict()`, so a resumed run continues with the next
    batch instead of replaying the epoch.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    if drop_last:
        require_a_batch(len(sampler), batch_size, len(dataset), world_size)
    return StatefulDataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
    )


def require_a_batch(rows_per_rank: int, batch_size: int, rows: int, world_size: int) -> None:
    """A batch larger than a finite training split trains nothing: say so with the numbers, before training."""
    if rows_per_rank < batch_size:
        per_rank = (
            f"{rows_per_rank} per process ({rows} rows / {world_size} processes)"
            if world_size > 1
            else f"{rows}"
        )
        raise ConfigError(
            f"data.batch_size={batch_size} is larger than the training split: {per_rank} rows after the held-out "
            f"split, so not one batch can be made; use data.batch_size<={rows_per_rank}"
        )


def ignore_stop_signals(worker_id: int) -> None:
    """Ctrl-C reaches the whole process group and schedulers signal every process: a worker that died of it
    would fail the next batch before the trainer could stop cleanly (`diffusion_lab.runs.signals`). Deaf to
    SIGTERM, a worker must still never outlive its trainer: the kernel kills it when its parent dies, and a
    failing run kills its workers (`runs.children`)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()
    if int(os.environ.get("PL_SEED_WORKERS", 0)):  # what Lightning installs when no worker_init_fn is given
        pl_worker_init_function(worker_id)


def rank_and_world_size(trainer) -> dict:
    """`rank` and `world_size` for `resumable_loader` or `ImageStream` from a DataModule's trainer (none: one
    process)."""
    return {"rank": trainer.global_rank, "world_size": trainer.world_size} if trainer is not None else {}


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


def stream_loader(stream, batch_size: int, num_workers: int) -> PrefetchAwareLoader:
    """The loader of an `ImageStream`. A bucketed stream yields whole batches, which the loader passes on as
    they are (its `batch_size` is then None). A bucketed stream of streamed rows carries the rows waiting in its buckets
    in its state; StatefulDataLoader then ships that state from the workers every 32 batches instead of every
    batch, and a resume fast-forwards from the last one (the same batches, exactly)."""
    bucketed = stream.batcher is not None
    return PrefetchAwareLoader(
        stream,
        batch_size=None if bucketed else batch_size,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        snapshot_every_n_steps=32 if bucketed and stream.is_streaming else 1,
    )
