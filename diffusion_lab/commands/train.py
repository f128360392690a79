"""`diffusion-lab train`: fit, then print where everything went."""

import json
import os
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks import PipelineExport, PromptGrid, SampleGrid, SampleQuality
from diffusion_lab.callbacks.sample_quality import describe_scores
from diffusion_lab.commands.instantiate import build_run, per_device_batch_size
from diffusion_lab.performance import effective_batch_size
from diffusion_lab.sweep_summary import RUN_SUMMARY


def train(cfg: DictConfig) -> float | None:
    """Returns `cfg.optimized_metric` (e.g. val/loss) so Hydra sweepers can minimise it."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    datamodule, model, trainer = build_run(cfg)
    if rank_zero_only.rank == 0:  # every rank builds the run; one writes its files
        output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    first_step, started = trainer.global_step, time.perf_counter()
    status = "failed"
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        status = "interrupted" if trainer.interrupted else "finished"
    finally:
        if trainer.is_global_zero:
            images = (trainer.global_step - first_step) * effective_batch(trainer, datamodule)
            write_run_summary(output_dir, trainer, status, time.perf_counter() - started, images)
    if trainer.is_global_zero:
        print(summary(trainer, output_dir))
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    return None if metric is None else float(metric)


def effective_batch(trainer: L.Trainer, datamodule: L.LightningDataModule) -> int:
    return effective_batch_size(
        per_device_batch_size(datamodule), trainer.accumulate_grad_batches, trainer.world_size
    )


def write_run_summary(
    output_dir: Path, trainer: L.Trainer, status: str, wall_time_s: float, images: int
) -> None:
    """`run_summary.json`: what a sweep's summary table shows of this run."""
    from hydra.core.hydra_config import HydraConfig

    metrics = {
        key: float(value)
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
        "output_dir": str(output_dir),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / f".{RUN_SUMMARY}.tmp"
    temporary.write_text(json.dumps(run, indent=2))
    os.replace(temporary, output_dir / RUN_SUMMARY)


def summary(trainer: L.Trainer, output_dir: Path) -> str:
    """The closing lines of a run: what it wrote, and where (read from disk, so it holds under ddp_spawn)."""
    rows = [
        ("run directory", output_dir),
        ("resolved config", output_dir / "config.yaml"),
        ("run summary", output_dir / RUN_SUMMARY),
    ]
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            rows += [
                ("checkpoints", Path(callback.dirpath)),
                ("last checkpoint", Path(callback.dirpath) / "last.ckpt"),
            ]
        elif isinstance(callback, SampleGrid | PromptGrid):
            rows.append(("final sample grid", callback.dirpath / "final.png"))
        elif isinstance(callback, PipelineExport):
            rows.append(("diffusers pipeline", callback.dirpath))
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
