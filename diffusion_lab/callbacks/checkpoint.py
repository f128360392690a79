"""When a run checkpoints: every N steps (Lightning's ModelCheckpoint), at the last step, and when asked to stop."""

import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from diffusion_lab.callbacks.final_metrics import log_train_metrics
from diffusion_lab.compat.lightning import save_checkpoint_now
from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.signals import RunInterrupted, requested_stop


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint plus the two saves a long run needs:

    - at the end of training, the final step (with `max_steps=23` and saves every 5, `last.ckpt` held step 20),
      written after the end-of-run work (final grid, export): a run killed during that work resumes from the
      checkpoint before, trains the last steps again and does the work; it is never left "done" without it;
    - on SIGINT / SIGTERM, the step just completed, then the run stops (`signals.RunInterrupted`).

    On any other exception (a crash, a divergence) nothing is saved: the last periodic checkpoint is the last
    good state.
    """

    _step_at_last_batch = -1
    end_of_run = True  # the final save comes last, after the other end-of-run work (commands.train)

    def __init__(self, out_dir: str | None = None, **model_checkpoint_arguments) -> None:
        # `out_dir`: the one name for an output folder in every command and callback (Lightning: `dirpath`).
        if "dirpath" in model_checkpoint_arguments:
            raise ConfigError("callbacks.model_checkpoint.dirpath is now callbacks.model_checkpoint.out_dir")
        super().__init__(dirpath=out_dir, **model_checkpoint_arguments)

    def save_now(self, trainer: L.Trainer) -> None:
        """The current step as `<filename>.ckpt` and `last.ckpt`, unless this step is saved already."""
        save_checkpoint_now(self, trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            return  # the final step: saved by on_train_end, after the end-of-run work
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stepped, self._step_at_last_batch = (
            trainer.global_step != self._step_at_last_batch,
            trainer.global_step,
        )
        # Every rank takes the same decision at the same step (DDP: a signal may reach rank 0 first).
        if stepped and trainer.strategy.reduce_boolean_decision(requested_stop() is not None, all=False):
            self.save_now(trainer)
            if trainer.global_step % trainer.log_every_n_steps == 0:
                log_train_metrics(trainer)  # Lightning would have, after this hook: keep the row
            raise RunInterrupted(requested_stop() or signal.SIGTERM)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Lightning's own SIGTERM handling raises SIGTERMException mid-validation too: save the step then.
        if isinstance(exception, RunInterrupted | SIGTERMException):
            self.save_now(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save_now(trainer)

    @property
    def last_path(self) -> Path | None:
        """The file `last.ckpt` holds, if this run wrote one."""
        return Path(self.last_model_path) if self.last_model_path else None
