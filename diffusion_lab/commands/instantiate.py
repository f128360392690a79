"""Building the objects of a run from its composed config."""

import logging

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf, open_dict

from diffusion_lab.callbacks.run_config import RunConfig
from diffusion_lab.runs.performance import apply_speed_settings, effective_batch_size, scaled_learning_rate

log = logging.getLogger(__name__)


def instantiate_each(group: DictConfig | None) -> list:
    """Instantiate every entry of a group that holds several objects (callbacks, loggers)."""
    if not group:
        return []
    return [
        instantiate(entry)
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def per_device_batch_size(datamodule: L.LightningDataModule) -> int:
    return getattr(datamodule, "batch_size", None) or datamodule.hparams.batch_size


def build_run(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """DataModule, LightningModule and Trainer (the model reads nothing from the data).

    With `latent_cache` set, the data's DataModule is wrapped by the cache's, which feeds the model
    cached latents and text embeddings instead of images and captions. With `lr_scaling`, `model.lr` is
    rescaled to the effective batch here, in the config, so the saved config.yaml holds the rate used.
    """
    datamodule = instantiate(cfg.data)
    if cfg.get("latent_cache"):
        datamodule = instantiate(cfg.latent_cache, images=datamodule)
    callbacks = instantiate_each(cfg.get("callbacks"))
    if cfg.get("guard"):
        callbacks.append(instantiate(cfg.guard))
    callbacks.append(RunConfig(OmegaConf.to_container(cfg, resolve=True)))
    # Lightning counts `val_check_interval` in batches: the config's cadence is in optimizer steps.
    validation = {}
    if cfg.get("val_every_n_steps"):
        validation["val_check_interval"] = cfg.val_every_n_steps * cfg.trainer.get(
            "accumulate_grad_batches", 1
        )
    trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_each(cfg.get("logger")) or False, **validation
    )
    per_device = per_device_batch_size(datamodule)
    effective = effective_batch_size(per_device, trainer.accumulate_grad_batches, trainer.world_size)
    base = cfg.get("base_batch_size") or per_device
    lr = scaled_learning_rate(cfg.model.lr, effective, base, cfg.get("lr_scaling"))
    rank_zero_info(
        f"effective batch size {effective} = {per_device} per device x {trainer.accumulate_grad_batches} "
        f"accumulated x {trainer.world_size} processes; learning rate {lr:.3g}"
        + (f" ({cfg.lr_scaling} scaling of model.lr={cfg.model.lr:.3g} from batch {base})" if cfg.get("lr_scaling")
           else " (model.lr, not scaled: lr_scaling=linear|sqrt scales it from base_batch_size)")
    )  # fmt: skip
    if lr != cfg.model.lr:
        with open_dict(cfg):
            cfg.model.lr = lr
    model = instantiate(cfg.model)
    apply_speed_settings(
        model.net, compile=cfg.get("compile", False), channels_last=cfg.get("channels_last", False),
        matmul_precision=cfg.get("matmul_precision", "highest"),
    )  # fmt: skip
    return datamodule, model, trainer
