"""`diffusion-lab eval`: FID / KID (+ IS, + CLIP score) as one JSON line."""

import json
import logging

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.commands.devices import resolve_device, resolve_dtype
from diffusion_lab.commands.inputs import require_positive
from diffusion_lab.errors import ConfigError
from diffusion_lab.families import load_sampler
from diffusion_lab.generation import SampleSettings
from diffusion_lab.generation.run import read_prompts
from diffusion_lab.metrics.evaluation import evaluation_plan, score_images, score_sampler
from diffusion_lab.metrics.extractors import describe_extractor
from diffusion_lab.metrics.features import cached_features, extract_features
from diffusion_lab.metrics.protocol import check_protocol
from diffusion_lab.metrics.reference import (
    dataset_batches,
    dataset_key,
    folder_batches,
    folder_key,
    listed_images,
)
from diffusion_lab.metrics.scores import ClipScorer

log = logging.getLogger(__name__)
SMALL_SET = 2048  # below this FID's bias is larger than most differences between runs (Binkowski et al. 2018)


def reference_features(cfg: DictConfig, extractor, protocol: str, device):
    if cfg.reference:
        files, _ = listed_images(cfg.reference)
        key, batches, what = folder_key(files), lambda: folder_batches(files, cfg.batch_size), cfg.reference
    elif cfg.get("data"):
        datamodule = instantiate(cfg.data)
        key = dataset_key(datamodule, cfg.reference_split)
        batches = lambda: dataset_batches(datamodule, cfg.reference_split, cfg.batch_size)  # noqa: E731
        what = f"{cfg.data._target_.rsplit('.', 1)[-1]} {cfg.reference_split}"
    else:
        raise ValueError("name the reference images: reference=DIR, or data=NAME (with reference_split=)")
    key = {**key, "extractor": describe_extractor(extractor), "protocol": protocol}
    return cached_features(
        cfg.cache_dir, key,
        lambda: extract_features(extractor, batches(), protocol, device, progress=True,
                                 description=f"reference features ({what})"),
    )  # fmt: skip


def evaluate(cfg: DictConfig) -> dict:
    require_positive(cfg, "num_samples", "batch_size", "sampling.num_inference_steps")
    if sum(bool(source) for source in (cfg.images, cfg.ckpt_path, cfg.pretrained)) != 1:
        raise ConfigError(
            "give exactly one of images=DIR (generated images), ckpt_path=FILE or pretrained=DIR_OR_HUB_ID "
            "(sampled here)"
        )
    sampler = None
    if not cfg.images:  # a model that cannot be loaded fails before the reference set is read
        sampler, _ = load_sampler(cfg.ckpt_path, cfg.pretrained, cfg.use_ema, cfg.revision, cfg.lora)
    device = resolve_device(cfg.device)
    protocol = check_protocol(cfg.fid_protocol)
    extractor = instantiate(cfg.feature_extractor).eval().requires_grad_(False)
    options = dict(kid_subset_size=cfg.kid_subset_size, kid_subsets=cfg.kid_subsets,
                   inception_score=cfg.inception_score, seed=cfg.seed)  # fmt: skip
    clip_scorer = ClipScorer(cfg.clip_model) if cfg.clip_model else None
    reference = reference_features(cfg, extractor, protocol, device)
    if cfg.images:
        files, prompts = listed_images(cfg.images)
        generated = extract_features(extractor, folder_batches(files, cfg.batch_size), protocol, device, progress=True,
                                     description="generated features")  # fmt: skip
        scores = score_images(generated, reference, extractor, protocol, **options)
        if clip_scorer is not None and prompts:
            clip_scorer.reset(device)
            for start, images in enumerate_batches(folder_batches(files, cfg.batch_size)):
                clip_scorer.update(images, prompts[start : start + len(images)])
            scores["clip_score"] = clip_scorer.compute()
    else:
        sampler.to(device, resolve_dtype(cfg.dtype, sampler.kind, device))
        prompt = list(cfg.prompt) if OmegaConf.is_list(cfg.prompt) else cfg.prompt
        prompts = read_prompts(prompt, cfg.prompt_file) or reference.captions
        plan = evaluation_plan(
            sampler, cfg.num_samples, cfg.seed, prompts if sampler.kind == "text" else None
        )
        settings = SampleSettings(**cfg.sampling)
        scores = score_sampler(sampler, plan, settings, reference, extractor, protocol, cfg.batch_size, device,
                               clip_scorer=clip_scorer, progress=True, **options)  # fmt: skip
    if scores["num_samples"] < SMALL_SET:
        log.warning(
            "%d generated images: FID is biased upward at this size; compare runs by KID",
            scores["num_samples"],
        )
    print(json.dumps(scores))
    return scores


def enumerate_batches(batches):
    """(index of the batch's first image, batch)."""
    start = 0
    for batch in batches:
        yield start, batch
        start += len(batch)
