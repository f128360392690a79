"""Loggers that keep a run's history when it resumes in its own folder.

A resumed run replays the steps after its checkpoint. Each logger here (and each callback with a table of its
own) is told that step before training starts (`resume_from`) and drops, or hides, what it had recorded for
the steps that will be logged again, so every step appears once. Lightning's CSVLogger instead deletes
`metrics.csv` whenever the folder is not empty.

Lightning labels the row of optimizer step N with `step = N - 1` (validation after step N too): resuming
from a checkpoint at step G keeps the rows labelled below G.
"""

import csv
import io
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from diffusion_lab.runs.atomic import write_text


def keep_csv_rows(path: Path, keep: Callable[[float], bool]) -> int:
    """Rewrite the CSV table at `path` with only the rows whose `step` passes `keep`; returns how many went."""
    if not path.is_file():
        return 0
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns, rows = reader.fieldnames or [], list(reader)
    kept = [row for row in rows if row.get("step") in (None, "") or keep(float(row["step"]))]
    if len(kept) < len(rows):
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
        write_text(path, text.getvalue())
    return len(rows) - len(kept)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to an existing `metrics.csv` (its columns included)."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        if path.is_file():
            with path.open(newline="") as handle:
                self.metrics_keys = next(csv.reader(handle), [])

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv; `resume_from` decides instead
        pass


class ResumableCSVLogger(CSVLogger):
    """CSVLogger whose `metrics.csv` survives a resume: earlier rows kept, replayed steps not duplicated."""

    @property
    @rank_zero_experiment
    def experiment(self) -> _AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

    def resume_from(self, step: int) -> None:
        keep_csv_rows(
            Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE, lambda row_step: row_step < step
        )


class ResumableTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger that hides the events a resumed run replays (SummaryWriter's `purge_step`)."""

    def resume_from(self, step: int) -> None:
        if self._experiment is None and step > 0:
            self._kwargs["purge_step"] = step


def resume_logs(recorders: list, step: int) -> None:
    """Before a run starts from `step` (0: a fresh run): each logger or callback that keeps a table drops
    what it recorded for the steps that will be logged again."""
    for recorder in recorders:
        if callable(getattr(recorder, "resume_from", None)):
            recorder.resume_from(step)
