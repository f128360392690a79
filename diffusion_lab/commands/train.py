"""`diffusion-lab train`: fit, then say truthfully how it ended and where everything went."""

import json
import logging
import math
import re
import shlex
import signal
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks import (
    Diverged,
    PipelineExport,
    PromptGrid,
    RunCheckpoint,
    SampleGrid,
    SampleQuality,
)
from diffusion_lab.callbacks.sample_quality import describe_scores
from diffusion_lab.commands.instantiate import build_run, per_device_batch_size
from diffusion_lab.commands.resume import check_same_architecture, resolve_checkpoint
from diffusion_lab.runs.atomic import require_writable, write_text
from diffusion_lab.runs.children import kill_children
from diffusion_lab.runs.config_checks import check_run_config
from diffusion_lab.runs.finite import NonFiniteWeights
from diffusion_lab.runs.loggers import resume_logs
from diffusion_lab.runs.performance import effective_batch_size
from diffusion_lab.runs.resolvers import is_multirun
from diffusion_lab.runs.run_lock import RunLock
from diffusion_lab.runs.signals import RunInterrupted, stop_on_signals
from diffusion_lab.runs.sweep_summary import RUN_SUMMARY

log = logging.getLogger(__name__)
EXIT_DIVERGED = 3


class NoTrainingSteps(RuntimeError):
    """A run that ended without a single optimizer step: never `finished`."""


def train(cfg: DictConfig) -> float | None:
    """Returns `cfg.optimized_metric` (e.g. val/loss) so Hydra sweepers can minimise it; None for a run that
    diverged (a failed trial). Exits 130 / 143 when stopped by SIGINT / SIGTERM, 3 when it diverged, 1 when it
    failed (its children killed, the error's first line in run_summary.json)."""
    logging.captureWarnings(True)  # Lightning's and the libraries' warnings into train.log too
    check_run_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    if rank_zero_only.rank != 0:  # the other ranks of a multi-process run share rank 0's folder and lock
        return _train(cfg, output_dir)
    require_writable(output_dir)
    with RunLock(output_dir):
        return _train(cfg, output_dir)


def finish_run(trainer: L.Trainer, model: L.LightningModule) -> None:
    """A run resumed with no step left to train (stopped during its end-of-run work): Lightning skips the end
    of training, so the end-of-run work (final grid, scores, export, snapshot, the final checkpoint) is done
    here, in the callbacks' order, and nothing is trained."""
    log.info("step %d reached before: finishing the end-of-run work", trainer.global_step)
    for callback in trainer.callbacks:
        if getattr(callback, "end_of_run", False):
            callback.on_train_end(trainer, model)


def _train(cfg: DictConfig, output_dir: Path) -> float | None:
    L.seed_everything(cfg.seed, workers=True)
    datamodule, model, trainer = build_run(cfg)
    checkpoints = trainer.checkpoint_callback
    resume = resolve_checkpoint(
        cfg.get("ckpt_path"), getattr(checkpoints, "dirpath", None), trainer.default_root_dir
    )
    resume_step = check_same_architecture(resume, model, cfg) if resume else 0
    if rank_zero_only.rank == 0:  # every rank builds the run; one writes its files
        write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        if resume:
            log.info("resuming from %s (step %d)", resume, resume_step)
        # The rows of steps this run will log (again): all of them for a fresh run in a reused folder.
        resume_logs([*trainer.loggers, *trainer.callbacks], resume_step)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    started = time.perf_counter()
    status, ending = "failed", None
    try:
        with stop_on_signals() as signals:
            trainer.fit(model, datamodule=datamodule, ckpt_path=resume)
            if resume and 0 < trainer.max_steps <= resume_step:
                finish_run(trainer, model)
        status = "finished"
        if trainer.global_step == resume_step and trainer.max_steps != resume_step:
            status = "failed"
            ending = NoTrainingSteps(
                f"the run ended at step {trainer.global_step} without one optimizer step (the training data "
                "gave no batch): see data.batch_size and the size of the training split"
            )
    except (Diverged, NonFiniteWeights) as error:
        status, ending = "diverged", error
    except SystemExit as error:  # RunInterrupted, Lightning's SIGTERMException, a second Ctrl-C
        status, ending = "interrupted", error
    # a fatal error, wherever it was raised (a loader worker, a callback, the step)
    except BaseException as error:
        ending = error
        kill_children()  # loader workers ignore SIGTERM: without this the exit waits on them forever
        raise
    finally:
        if trainer.is_global_zero:
            images = (trainer.global_step - resume_step) * effective_batch(trainer, datamodule)
            write_run_summary(output_dir, trainer, status, time.perf_counter() - started, images, ending)
    if isinstance(ending, NoTrainingSteps):
        log.error("failed: %s", ending)
        raise SystemExit(1)
    if status == "diverged":
        return stop_diverged(trainer, ending)
    if status == "interrupted":
        stop_interrupted(trainer, output_dir, ending, signals[0] if signals else None)
    if trainer.is_global_zero:
        print(summary(trainer, output_dir))
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    return None if metric is None or not math.isfinite(float(metric)) else float(metric)


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    checkpoint = trainer.checkpoint_callback
    path = checkpoint.last_path if isinstance(checkpoint, RunCheckpoint) else None
    return str(path) if path is not None and path.exists() else None


def stop_diverged(trainer: L.Trainer, error: Exception) -> None:
    """Say what happened and the way back; a single run exits non-zero, a sweep's job returns no value."""
    log.error(
        "diverged: %s. Nothing after that was checkpointed or exported. Last good checkpoint: %s. "
        "Try a lower model.lr, or guard.nonfinite=skip",
        error,
        _last_checkpoint(trainer) or "none (no checkpoint was written)",
    )
    if is_multirun():
        return None  # the sweep goes on; Optuna records a failed trial
    raise SystemExit(EXIT_DIVERGED)


def resume_command(output_dir: Path) -> str:
    from hydra.core.hydra_config import HydraConfig

    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    kept = [item for item in given if not item.startswith(("ckpt_path=", "hydra.run.dir="))]
    words = ["diffusion-lab", "train", *kept, f"hydra.run.dir={output_dir}", "ckpt_path=last"]
    return " ".join(shlex.quote(word) for word in words)


def stop_interrupted(trainer: L.Trainer, output_dir: Path, error: SystemExit, signum: int | None) -> None:
    """Exit as a shell reports the signal: 128 + its number (Lightning's SIGTERMException carries no code)."""
    if isinstance(error, RunInterrupted):
        code = error.code
    elif signum is not None:
        code = 128 + signum
    else:
        code = 128 + (signal.SIGTERM if isinstance(error, SIGTERMException) else signal.SIGINT)
    log.warning(
        "interrupted at step %d; last.ckpt: %s. Resume with:\n  %s",
        trainer.global_step,
        _last_checkpoint(trainer) or "none",
        resume_command(output_dir),
    )
    raise SystemExit(code)


def effective_batch(trainer: L.Trainer, datamodule: L.LightningDataModule) -> int:
    return effective_batch_size(
        per_device_batch_size(datamodule), trainer.accumulate_grad_batches, trainer.world_size
    )


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def write_run_summary(
    output_dir: Path, trainer: L.Trainer, status: str, wall_time_s: float, images: int, ending=None
) -> None:
    """`run_summary.json` (strict JSON: a NaN is null): what a sweep's summary table shows of this run."""
    from hydra.core.hydra_config import HydraConfig

    metrics = {
        key: _finite_or_none(float(value))
        for key, value in trainer.callback_metrics.items()
        if key.startswith(("train/", "val/"))
    }
    run = {
        "overrides": list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else [],
        "status": status,
        **metrics,
        "images_per_s": images / wall_time_s if wall_time_s > 0 else None,  # training images over fit time
        "wall_time_s": wall_time_s,
        "global_step": trainer.global_step,
        "last_checkpoint": _last_checkpoint(trainer),
        "message": None if ending is None else _first_line(ending),
        "output_dir": str(output_dir),
    }
    write_text(output_dir / RUN_SUMMARY, json.dumps(run, indent=2, allow_nan=False))


def _first_line(error: BaseException) -> str:
    """The error in one line; for an error a loader worker raised, the worker's own (torch wraps it in a
    "Caught ... in DataLoader worker process N" whose text carries the original traceback)."""
    lines = str(error).strip().splitlines()
    if "Original Traceback" in str(error):
        raised = [line for line in lines if re.match(r"[A-Za-z_][\w.]*(Error|Exception)\b.*:", line)]
        if raised:
            return raised[-1]
    return lines[0] if lines else type(error).__name__


def summary(trainer: L.Trainer, output_dir: Path) -> str:
    """The closing lines of a run: what it wrote, and where (read from disk, so it holds under ddp_spawn)."""
    rows = [
        ("run directory", output_dir),
        ("resolved config", output_dir / "config.yaml"),
        ("run summary", output_dir / RUN_SUMMARY),
    ]
    for callback in trainer.callbacks:
        if isinstance(callback, RunCheckpoint) and callback.dirpath:
            rows.append(("checkpoints", Path(callback.dirpath)))
            if callback.last_path is not None:
                rows.append((f"last checkpoint (step {trainer.global_step})", callback.last_path))
        elif isinstance(callback, SampleGrid | PromptGrid):
            rows.append(("final sample grid", callback.out_dir / "final.png"))
        elif isinstance(callback, PipelineExport):
            rows.append(("diffusers pipeline", callback.out_dir))
        elif isinstance(callback, SampleQuality) and callback.csv_path:
            rows.append(("sample quality", callback.csv_path))
    cache = getattr(trainer.datamodule, "cache_folder", None)
    if cache is not None:
        rows.append(("latent cache", cache("train").parent))
    rows += [
        ("metrics", Path(logger.log_dir) / "metrics.csv")
        for logger in trainer.loggers
        if isinstance(logger, CSVLogger)
    ]
    rows = [(name, path) for name, path in rows if path.exists()]
    width = max(len(name) for name, _ in rows)
    lines = [f"  {name:<{width}}  {path}" for name, path in rows]
    metrics = {
        k: f"{float(v):.4f}" for k, v in trainer.callback_metrics.items() if k.startswith(("train/", "val/"))
    }
    scored = [c.last_scores for c in trainer.callbacks if isinstance(c, SampleQuality) and c.last_scores]
    quality = [f"Sample quality at step {s['step']}: {describe_scores(s)}" for s in scored]
    return "\n".join(["", f"Finished at step {trainer.global_step}: {metrics}", *quality, *lines])
