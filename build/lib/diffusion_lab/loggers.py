"""Loggers that keep a run's history when it resumes in its own folder.

A resumed run replays the steps after its checkpoint. Each logger here is told that step before training
starts (`resume_from`) and drops, or hides, what it had recorded after it, so every step appears once.
Lightning's CSVLogger instead deletes `metrics.csv` when the folder is not empty.
"""

import csv
import io
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from diffusion_lab.atomic import write_text


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing `metrics.csv` (its columns included) instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.metrics_keys = self._header()

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes the file; a resume keeps it
        pass

    def _header(self) -> list[str]:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return []
        with path.open(newline="") as handle:
            return next(csv.reader(handle), [])

    def drop_rows_after(self, step: int) -> int:
        """Remove the rows logged after `step` (they will be logged again); returns how many."""
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return 0
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        kept = [row for row in rows if row.get("step") in (None, "") or float(row["step"]) <= step]
        if len(kept) < len(rows):
            text = io.StringIO()
            writer = csv.DictWriter(text, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
            write_text(path, text.getvalue())
        return len(rows) - len(kept)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose `metrics.csv` survives a resume: earlier rows kept, replayed steps not duplicated."""

    @property
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def resume_from(self, step: int) -> None:
        self.experiment.drop_rows_after(step)


class ResumableTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger that hides the events a resumed run replays (SummaryWriter's `purge_step`)."""

    def resume_from(self, step: int) -> None:
        if self._experiment is None:
            self._kwargs["purge_step"] = step + 1


def resume_logs(loggers: list, step: int) -> None:
    """Before a run resumes from `step`: each logger that can drops what it recorded after that step."""
    for logger in loggers:
        if callable(getattr(logger, "resume_from", None)):
            logger.resume_from(step)
