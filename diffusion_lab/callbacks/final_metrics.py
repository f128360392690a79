"""The last step's training metrics in every logger, whatever `log_every_n_steps` is.

Lightning logs every N steps only: a 20-step run with N = 25 left no `metrics.csv` at all, a 23-step run
with N = 5 ended its history at step 20, and a run stopped by a signal loses the row of the step it stopped at.
"""

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


@rank_zero_only
def log_train_metrics(trainer: L.Trainer) -> None:
    """This step's `train/` values, labelled as Lightning labels them (optimizer step N as N - 1)."""
    metrics = {
        key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("train/")
    }
    for logger in trainer.loggers if metrics else []:
        logger.log_metrics(metrics, step=trainer.global_step - 1)
        logger.save()


class FinalStepMetrics(L.Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step % trainer.log_every_n_steps:  # else Lightning did
            log_train_metrics(trainer)
