"""Faults injected through the configs (`+callbacks.x._target_=tests.injection.SignalAt`), in-process or in a
`diffusion-lab train` subprocess started from the repository root."""

import io
import os
import signal
import time

import lightning as L
import torch

from diffusion_lab.callbacks import PipelineExport, SampleQuality
from diffusion_lab.models import PixelDiffusion
from diffusion_lab.runs.atomic import write_file
from diffusion_lab.runs.checkpoint_io import AtomicCheckpointIO


class SignalAt(L.Callback):
    """Sends `signum` to this process once optimizer step `step` is done (as `kill` or Ctrl-C would), or, with
    `during_validation`, in the middle of the first validation after it."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, during_validation: bool = False) -> None:
        self.step, self.signum, self.during_validation, self.sent = step, signum, during_validation, False

    def _send(self, trainer) -> None:
        if trainer.global_step >= self.step and not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.during_validation:
            self._send(trainer)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self.during_validation and batch_idx == 1:
            self._send(trainer)


class SlowCheckpointIO(AtomicCheckpointIO):
    """Writes half of each checkpoint, pauses, then the rest: a window in which a kill lands mid-write."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()

        def write_slowly(temporary) -> None:
            with open(temporary, "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
                time.sleep(0.3)
                handle.write(data[len(data) // 2 :])

        write_file(path, write_slowly)


class KilledDuringExport(PipelineExport):
    """Writes part of the pipeline folder, then dies with SIGKILL: a node lost in the middle of the export."""

    def on_train_end(self, trainer, pl_module) -> None:
        def save_then_die(folder) -> None:
            pl_module.net.save_pretrained(folder / "unet")
            os.kill(os.getpid(), signal.SIGKILL)

        from diffusion_lab.families.export import write_pipeline

        write_pipeline(self.out_dir, [pl_module.net], save_then_die)


class NaNLossAt(PixelDiffusion):
    """PixelDiffusion whose loss is NaN at the optimizer steps `nan_steps` (a bad batch), and whose loss is
    finite but gradients infinite at `inf_gradient_steps` (an overflow in the backward pass); 0-based steps."""

    def __init__(self, *args, nan_steps=(), inf_gradient_steps=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.nan_steps, self.inf_gradient_steps = set(nan_steps), set(inf_gradient_steps)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.inf_gradient_steps:
            handle = self.net.conv_in.weight.register_hook(lambda grad: grad * float("inf"))
            self._remove_hook = handle.remove
        return loss * float("nan") if self.global_step in self.nan_steps else loss

    def on_after_backward(self) -> None:
        if getattr(self, "_remove_hook", None):
            self._remove_hook()
            self._remove_hook = None


class SignalledDuringFinalScore(SampleQuality):
    """The sample_quality callback, signalled (SIGTERM to its own process) as its end-of-run scoring starts:
    the stop request then meets the first safe point inside the scoring."""

    def on_train_end(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        super().on_train_end(trainer, pl_module)


class RaiseAt(L.Callback):
    """A callback that fails at optimizer step `step` (a bug in a user's callback, a full quota)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"injected failure at step {self.step}")
