"""The final step's training metrics in every logger, whatever `log_every_n_steps` is.

Lightning logs every N steps only: a 20-step run with N = 25 left no `metrics.csv` at all, and a 23-step run
with N = 5 ended its history at step 20.
"""

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class FinalStepMetrics(L.Callback):
    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == 0 or trainer.global_step % trainer.log_every_n_steps == 0:
            return  # Lightning logged this step itself
        metrics = {
            key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("train/")
        }
        for logger in trainer.loggers if metrics else []:
            logger.log_metrics(
                metrics, step=trainer.global_step - 1
            )  # Lightning's rows: step = optimizer steps - 1
            logger.save()
