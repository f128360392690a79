"""Faults injected through the configs (`+callbacks.x._target_=tests.injection.SignalAt`), in-process or in a
`diffusion-lab train` subprocess started from the repository root."""

import os
import signal

import lightning as L
import torch

from diffusion_lab.callbacks import PipelineExport
from diffusion_lab.models import PixelDiffusion


class SignalAt(L.Callback):
    """Sends `signum` to this process once optimizer step `step` is done (as `kill` or Ctrl-C would)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class KilledDuringExport(PipelineExport):
    """Writes part of the pipeline folder, then dies with SIGKILL: a node lost in the middle of the export."""

    def on_train_end(self, trainer, pl_module) -> None:
        def save_then_die(folder) -> None:
            pl_module.net.save_pretrained(folder / "unet")
            os.kill(os.getpid(), signal.SIGKILL)

        from diffusion_lab.export import write_pipeline

        write_pipeline(self.dirpath, [pl_module.net], save_then_die)


class NaNLossAt(PixelDiffusion):
    """PixelDiffusion whose loss is NaN at the given optimizer steps (a bad batch, an overflow)."""

    def __init__(self, *args, nan_steps: tuple[int, ...] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_steps = set(nan_steps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss
