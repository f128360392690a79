"""The EMA length chosen while the run ends: FID / KID of several lengths rebuilt from the run's own post-hoc
snapshots, the best one reported as the run's `val/fid`.

This is what makes the EMA length a searchable hyperparameter at the cost of one run per trial (EDM2,
arXiv:2312.02696 section 3: the best length depends on the rest of the recipe, and sweeping it by retraining
multiplies the cost). An Optuna trial's value is then the score at its best length
(`hparams_search=pixel_defaults`).
"""

import contextlib
import csv
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import trainable_names, write_weights
from diffusion_lab.callbacks.end_of_run import EndOfRunWork
from diffusion_lab.callbacks.sample_quality import SampleQuality, describe_scores
from diffusion_lab.errors import ConfigError
from diffusion_lab.posthoc_ema.callback import PostHocEMA
from diffusion_lab.posthoc_ema.sweep import check_lengths, profile_error, reconstruct, valid_range
from diffusion_lab.runs.atomic import write_file

log = logging.getLogger(__name__)
FIELDS = ["sigma_rel", "fid", "kid_mean", "kid_std", "step"]


@contextlib.contextmanager
def loaded_weights(net: torch.nn.Module, names: list[str], tensors: list[torch.Tensor]) -> Iterator[None]:
    """`tensors` in the network's trainable parameters `names` for the block, its own weights back after."""
    parameters = dict(net.named_parameters())
    saved = [parameters[name].detach().clone() for name in names]
    try:
        write_weights(net, names, tensors)
        yield
    finally:
        write_weights(net, names, saved)


def _one(trainer: L.Trainer, kind: type, key: str):
    found = [callback for callback in trainer.callbacks if isinstance(callback, kind)]
    if not found:
        raise ConfigError(f"callbacks.posthoc_quality needs callbacks.{key}: add it to the callbacks list")
    return found[0]


class PostHocQuality(EndOfRunWork):
    """When training ends, each `sigma_rels` length is rebuilt from `callbacks.posthoc_ema`'s snapshots and
    scored by `callbacks.sample_quality` (same samples, seeds and NFE for every length). The best length's
    scores are logged as `val/fid`, `val/kid_mean`, ... with `val/ema_sigma_rel`; every length is a row of
    `csv_path`. A length the snapshots cannot rebuild within `max_error` is left out with a warning (a short
    run); none at all is an error naming the range they can."""

    def __init__(self, sigma_rels: list[float], max_error: float = 0.1, csv_path: str | None = None) -> None:
        if not sigma_rels:
            raise ConfigError("callbacks.posthoc_quality.sigma_rels is empty: name the EMA lengths to score")
        self.sigma_rels = [float(sigma) for sigma in sigma_rels]
        self.max_error = max_error
        self.csv_path = Path(csv_path) if csv_path else None
        self.rows: list[dict] = []

    @rank_zero_only
    def finish_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        posthoc = _one(trainer, PostHocEMA, "posthoc_ema")
        quality = _one(trainer, SampleQuality, "sample_quality")
        snapshots = posthoc.flush(trainer, pl_module)
        lengths = [s for s in self.sigma_rels if profile_error(snapshots, s) <= self.max_error]
        if not lengths:  # the error names the range these snapshots can rebuild
            check_lengths(snapshots, self.sigma_rels, self.max_error)
        if len(lengths) < len(self.sigma_rels):  # a short run: its few snapshots span fewer lengths
            low, high = valid_range(snapshots, self.max_error)
            log.warning("post-hoc EMA: scoring sigma_rel=%s only; these %d snapshots rebuild %.3f to %.3f",
                        lengths, len(snapshots), low, high)  # fmt: skip
        names = trainable_names(pl_module.net)
        self.rows = []
        for sigma_rel in lengths:
            tensors, _ = reconstruct(snapshots, names, sigma_rel, self.max_error)
            with loaded_weights(pl_module.net, names, tensors):
                scores = quality.evaluate(trainer, pl_module, use_ema=False, record=False)
            log.info("post-hoc EMA sigma_rel=%g: %s", sigma_rel, describe_scores(scores))
            self.rows.append({"sigma_rel": sigma_rel, "step": trainer.global_step, **scores})
        best = min(self.rows, key=lambda row: row["fid"] if math.isfinite(row["fid"]) else math.inf)
        quality.record(trainer, best)
        trainer.callback_metrics["val/ema_sigma_rel"] = torch.tensor(best["sigma_rel"])
        for logger in trainer.loggers:
            logger.log_metrics({"val/ema_sigma_rel": best["sigma_rel"]}, step=trainer.global_step)
        if self.csv_path is not None:
            write_file(self.csv_path, self._write_rows)
        log.info("post-hoc EMA: best length sigma_rel=%g (FID %.4g)", best["sigma_rel"], best["fid"])

    def _write_rows(self, staging: Path) -> None:
        with open(staging, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.rows)
