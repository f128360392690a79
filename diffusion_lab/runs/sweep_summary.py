"""One table of every run of a sweep: `summary.csv` and `summary.md` in `hydra.sweep.dir`.

Each run leaves `run_summary.json` in its folder (the train command writes it, also on a SLURM node); when the
sweep ends this Hydra callback collects them, so the table covers grid, Optuna and submitit sweeps alike.
"""

import csv
import io
import json
import logging
import math
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from diffusion_lab.runs.atomic import write_text

log = logging.getLogger(__name__)
RUN_SUMMARY = "run_summary.json"
COLUMNS = [
    "job", "overrides", "status", "train/loss", "val/loss", "val/fid", "val/kid_mean", "val/kid_std", "val/ema_sigma_rel",
    "images_per_s", "wall_time_s", "global_step", "output_dir",
]  # fmt: skip


def collect_runs(sweep_dir: Path) -> list[dict]:
    runs = []
    for path in sweep_dir.glob(f"*/{RUN_SUMMARY}"):
        run = json.loads(path.read_text())
        runs.append({"job": path.parent.name, **run})
    return sorted(runs, key=lambda run: int(run["job"]) if str(run["job"]).isdigit() else math.inf)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return "" if value is None else str(value)


def write_summary(
    sweep_dir: Path, runs: list[dict], optimized_metric: str | None = None
) -> tuple[Path, Path]:
    columns = COLUMNS + ([optimized_metric] if optimized_metric and optimized_metric not in COLUMNS else [])
    rows = [[_cell(run.get(column)) for column in columns] for run in runs]
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(columns)
    writer.writerows(rows)
    write_text(csv_path, table.getvalue())
    lines = [f"# Sweep {sweep_dir}", "", f"{len(runs)} runs.", ""]
    scored = [run for run in runs if isinstance(run.get(optimized_metric or ""), int | float)]
    if scored:
        best = min(scored, key=lambda run: run[optimized_metric])
        lines += [f"Lowest {optimized_metric}: {best[optimized_metric]:.6g}, job {best['job']} "
                  f"({_cell(best.get('overrides')) or 'no overrides'}).", ""]  # fmt: skip
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    write_text(md_path, "\n".join(lines) + "\n")
    return csv_path, md_path


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = collect_runs(sweep_dir)
        if not runs:
            log.warning("sweep summary: no %s under %s", RUN_SUMMARY, sweep_dir)
            return
        csv_path, md_path = write_summary(sweep_dir, runs, config.get("optimized_metric"))
        log.info("sweep summary (%d runs): %s, %s", len(runs), csv_path, md_path)
