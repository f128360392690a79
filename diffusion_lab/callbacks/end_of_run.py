"""Work a callback does when training ends (the final grid, scores, export), done once per final step.

The step it was finished at travels in the checkpoint. A run stopped by a signal during that work
(`runs.signals.stop_if_requested`) checkpoints the final step; its resume trains nothing and does only the
work not finished before (`commands.train.finish_run`).
"""

import lightning as L


class EndOfRunWork(L.Callback):
    end_of_run = True
    _finished_step = -1

    def finish_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The work itself (subclasses)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._finished_step == trainer.global_step:
            return  # done before this run was stopped: a resume does only what is left
        self.finish_run(trainer, pl_module)
        self._finished_step = trainer.global_step

    def state_dict(self) -> dict:
        return {"end_of_run_finished_step": self._finished_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self._finished_step = state_dict.get("end_of_run_finished_step", -1)
