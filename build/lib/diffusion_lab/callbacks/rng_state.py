"""Global random-number-generator states in the checkpoint, one set per rank."""

import random

import lightning as L
import numpy as np
import torch
import torch.distributed as dist


def _capture() -> dict:
    # Plain ints, tuples and tensors only: Lightning loads checkpoints with torch.load(weights_only=True).
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": (
            kind,
            torch.from_numpy(keys.astype(np.int64)),
            int(position),
            int(has_gauss),
            float(cached_gaussian),
        ),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore(states: dict) -> None:
    random.setstate(states["python"])
    kind, keys, position, has_gauss, cached_gaussian = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStates(L.Callback):
    """Saves every rank's RNG states and gives each rank its own back on resume.

    The loss's noise and timesteps do not need this (they are keyed per image, see `core.random`), but
    dropout and anything else drawing from the global generators do. Lightning does not save them.
    """

    @property
    def state_key(self) -> str:
        return "RNGStates"

    def state_dict(self) -> dict:
        # Called on every rank while a checkpoint is assembled; rank 0 writes the gathered list.
        states = _capture()
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, states)
            return {"per_rank": gathered}
        return {"per_rank": [states]}

    def load_state_dict(self, state_dict: dict) -> None:
        self._to_restore = state_dict.get("per_rank")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        per_rank = getattr(self, "_to_restore", None)
        if per_rank and len(per_rank) == trainer.world_size:
            _restore(per_rank[trainer.global_rank])
        self._to_restore = None
