"""`diffusion-lab train`: fit, then print where everything went."""

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks import PipelineExport, PromptGrid, SampleGrid, SampleQuality
from diffusion_lab.callbacks.sample_quality import describe_scores
from diffusion_lab.commands.instantiate import build_run


def train(cfg: DictConfig) -> float | None:
    """Returns `cfg.optimized_metric` (e.g. val/loss) so Hydra sweepers can minimise it."""
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, output_dir / "config.yaml", resolve=True)
    datamodule, model, trainer = build_run(cfg)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    if trainer.is_global_zero:
        print(summary(trainer, output_dir))
    metric = trainer.callback_metrics.get(cfg.get("optimized_metric") or "")
    return None if metric is None else float(metric)


def summary(trainer: L.Trainer, output_dir: Path) -> str:
    """The closing lines of a run: what it wrote, and where (read from disk, so it holds under ddp_spawn)."""
    rows = [("run directory", output_dir), ("resolved config", output_dir / "config.yaml")]
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
