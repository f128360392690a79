"""A callback the DDP tests add (`+callbacks.probe._target_=tests.ddp_probe.RankProbe`): what each rank saw and
holds, gathered to rank 0 and written as `<run>/rank_probe.json`."""

import json
from pathlib import Path

import lightning as L
import torch

from diffusion_lab.callbacks.ema import find_ema


class RankProbe(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.indices: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.indices.append(batch["index"].tolist())

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ema = find_ema(trainer)
        posthoc = next((c for c in trainer.callbacks if type(c).__name__ == "PostHocEMA"), None)
        held = torch.tensor([
            float(sum(p.double().sum() for p in pl_module.net.parameters())),
            float(sum(s.double().sum() for s in ema.ema.shadow_params)) if ema else 0.0,
            float(pl_module.hparams.lr),
            *(float(sum(t.double().sum() for t in profile)) for profile in (posthoc.profiles if posthoc else [])),
        ], dtype=torch.float64)  # fmt: skip
        held = trainer.strategy.all_gather(held).reshape(trainer.world_size, -1)
        indices = trainer.strategy.all_gather(torch.tensor(self.indices)).reshape(trainer.world_size, -1)
        if trainer.is_global_zero:
            self.path.write_text(json.dumps({"held": held.tolist(), "indices": indices.tolist(),
                                             "steps": len(self.indices)}))  # fmt: skip
