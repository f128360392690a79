"""FID / KID / IS (and CLIP score for text models) of samples from the EMA weights while a model trains."""

import contextlib
import csv
import logging
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.callbacks.end_of_run import EndOfRunWork
from diffusion_lab.core.schedulers import check_scheduler_name
from diffusion_lab.generation import SampleSettings
from diffusion_lab.metrics.evaluation import evaluation_plan, score_sampler
from diffusion_lab.metrics.extractors import describe_extractor
from diffusion_lab.metrics.features import ImageFeatures, cached_features, extract_features
from diffusion_lab.metrics.protocol import check_protocol
from diffusion_lab.metrics.reference import dataset_batches, dataset_key
from diffusion_lab.metrics.scores import ClipScorer
from diffusion_lab.runs.loggers import keep_csv_rows

log = logging.getLogger(__name__)
LOGGED = ("fid", "kid_mean", "kid_std", "inception_score", "inception_score_std", "clip_score")


def describe_scores(scores: dict) -> str:
    """One line, every number with what it depends on: protocol, extractor, set sizes."""
    parts = [f"FID {scores['fid']:.3f}", f"KID {scores['kid_mean']:.5f} ± {scores['kid_std']:.5f}"]
    if "inception_score" in scores:
        parts.append(f"IS {scores['inception_score']:.3f}")
    if "clip_score" in scores:
        parts.append(f"CLIP score {scores['clip_score']:.2f}")
    return (
        f"{', '.join(parts)} ({scores['fid_protocol']} protocol, {scores['feature_extractor']}, "
        f"{scores['num_samples']} samples vs {scores['num_reference']} reference)"
    )


class SampleQuality(EndOfRunWork):
    """Every `every_n_steps` optimizer steps (and at the end): `num_samples` images from the EMA weights,
    the same seeds each time, scored against every image of the data's `reference_split`.

    Logged as `val/fid`, `val/kid_mean`, ... to every logger; one row per evaluation in `csv_path` with the
    protocol, extractor and set sizes beside the numbers. The reference features are computed once per
    dataset + resolution + extractor + protocol and cached in `cache_dir`. Runs on rank 0 in a forked RNG
    (training draws the same random numbers with or without it); the extractor and generated images leave
    the GPU afterwards.
    """

    def __init__(
        self,
        feature_extractor: torch.nn.Module,
        every_n_steps: int = 5000,
        num_samples: int = 1000,
        batch_size: int = 64,
        scheduler: str | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        seed: int = 0,
        fid_protocol: str = "legacy",
        reference_split: str = "val",
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        inception_score: bool = True,
        clip_model: str | None = None,
        at_end: bool = True,
        cache_dir: str | None = None,
        csv_path: str | None = None,
    ) -> None:
        self.extractor = feature_extractor.eval().requires_grad_(False)
        self.every_n_steps, self.at_end = every_n_steps, at_end
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.settings = SampleSettings(
            scheduler=check_scheduler_name(scheduler),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
        )
        self.protocol = check_protocol(fid_protocol)
        self.reference_split = reference_split
        self.score_options = dict(
            kid_subset_size=kid_subset_size,
            kid_subsets=kid_subsets,
            inception_score=inception_score,
            seed=seed,
        )
        self.clip_model = clip_model
        self.cache_dir, self.csv_path = cache_dir, Path(csv_path) if csv_path else None
        self._reference: ImageFeatures | None = None
        self._clip_scorer: ClipScorer | None = None
        self._last_step = -1
        self.last_scores: dict | None = None

    def reference(self, trainer: L.Trainer, device: torch.device) -> ImageFeatures:
        if self._reference is None:
            datamodule = trainer.datamodule
            key = {
                **dataset_key(datamodule, self.reference_split),
                "extractor": describe_extractor(self.extractor),
                "protocol": self.protocol,
            }
            batches = dataset_batches(datamodule, self.reference_split, self.batch_size)
            self._reference = cached_features(
                self.cache_dir, key,
                lambda: extract_features(self.extractor, batches, self.protocol, device, progress=True,
                                         description=f"reference features ({self.reference_split})"),
            )  # fmt: skip
        return self._reference

    @torch.no_grad()
    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, use_ema: bool = True, record: bool = True
    ) -> dict:
        """Scores of the EMA weights (`use_ema=False`: of the weights the network holds now), logged and kept
        in the table unless `record=False`."""
        device = pl_module.device
        cuda = [device.index or 0] if device.type == "cuda" else []
        averaged = ema_weights(trainer, pl_module) if use_ema else contextlib.nullcontext()
        with torch.random.fork_rng(devices=cuda), averaged:
            reference = self.reference(trainer, device)
            sampler = pl_module.sampler()
            prompts = reference.captions if sampler.kind == "text" else None
            if prompts and hasattr(pl_module, "cache_prompts"):  # encoded once, not once per batch
                pl_module.cache_prompts(list(prompts))
            if sampler.kind == "text" and self.clip_model and self._clip_scorer is None:
                self._clip_scorer = ClipScorer(self.clip_model)
            plan = evaluation_plan(sampler, self.num_samples, self.seed, prompts)
            scores = score_sampler(
                sampler, plan, self.settings, reference, self.extractor, self.protocol, self.batch_size, device,
                clip_scorer=self._clip_scorer, progress=True, **self.score_options,
            )  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if record:
            self.record(trainer, scores)
        return scores

    def record(self, trainer: L.Trainer, scores: dict) -> None:
        step = trainer.global_step
        self.last_scores = {"step": step, **scores}
        metrics = {f"val/{name}": scores[name] for name in LOGGED if scores.get(name) is not None}
        # Also where Lightning keeps logged values: `optimized_metric=val/fid` then reaches sweepers.
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            logger.save()
        if self.csv_path is not None:
            new = not self.csv_path.exists()
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            with self.csv_path.open("a", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=["step", *LOGGED, "num_samples", "num_reference",
                                                             "fid_protocol", "feature_extractor"], extrasaction="ignore")  # fmt: skip
                if new:
                    writer.writeheader()
                writer.writerow({"step": step, **scores})
        log.info("step %d: %s", step, describe_scores(scores))

    def resume_from(self, step: int) -> None:
        """Its table's rows are labelled with the optimizer step they scored: those after `step` come again."""
        if self.csv_path is not None:
            keep_csv_rows(self.csv_path, lambda row_step: row_step <= step)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    @rank_zero_only
    def finish_run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self.evaluate(trainer, pl_module)
