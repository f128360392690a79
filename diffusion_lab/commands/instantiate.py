"""Building the objects of a run from its composed config."""

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig


def instantiate_each(group: DictConfig | None) -> list:
    """Instantiate every entry of a group that holds several objects (callbacks, loggers)."""
    if not group:
        return []
    return [
        instantiate(entry)
        for entry in group.values()
        if isinstance(entry, DictConfig) and "_target_" in entry
    ]


def build_run(cfg: DictConfig) -> tuple[L.LightningDataModule, L.LightningModule, L.Trainer]:
    """DataModule, LightningModule and Trainer, in that order (the model reads nothing from the data).

    With `latent_cache` set, the data's DataModule is wrapped by the cache's, which feeds the model
    cached latents and text embeddings instead of images and captions.
    """
    datamodule = instantiate(cfg.data)
    if cfg.get("latent_cache"):
        datamodule = instantiate(cfg.latent_cache, images=datamodule)
    model = instantiate(cfg.model)
    trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_each(cfg.get("callbacks")),
        logger=instantiate_each(cfg.get("logger")) or False,
    )
    return datamodule, model, trainer
