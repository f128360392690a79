"""Sending a PNG already on disk to whichever loggers can show images."""

from pathlib import Path

import lightning as L
import numpy as np
from PIL import Image


def log_image_file(trainer: L.Trainer, key: str, path: Path) -> None:
    """W&B (`log_image`) and TensorBoard (`add_image`) get the picture; CSV loggers have nowhere to put it."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif hasattr(getattr(logger, "experiment", None), "add_image"):
            picture = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, picture, trainer.global_step, dataformats="HWC")
