"""Scoring a model: sample a fixed plan of images, extract features as they come, compare with a reference."""

from collections.abc import Callable

import torch

from diffusion_lab.generation.run import ImagePlan, generate
from diffusion_lab.generation.samplers import SampleSettings
from diffusion_lab.metrics.features import ImageFeatures, extract_features
from diffusion_lab.metrics.protocol import as_rgb_uint8
from diffusion_lab.metrics.scores import ClipScorer, sample_quality


def evaluation_plan(sampler, num_samples: int, seed: int, prompts: list[str] | None = None) -> ImagePlan:
    """Image k: seed + k; text models cycle through `prompts` (e.g. the reference captions), class-conditional
    models through their classes, so the samples follow the reference's mix as closely as we know it."""
    seeds = [seed + k for k in range(num_samples)]
    if sampler.kind == "text":
        if not prompts:
            raise ValueError(
                "scoring a text-to-image model needs prompts: the reference's captions or prompt="
            )
        return ImagePlan(seeds, prompts=[prompts[k % len(prompts)] for k in range(num_samples)])
    if sampler.num_classes:
        return ImagePlan(seeds, class_labels=[k % sampler.num_classes for k in range(num_samples)])
    return ImagePlan(seeds)


def labels(extractor, protocol: str) -> dict:
    """What every reported number depends on besides the images."""
    # The class name only: hashing the weights (as the reference cache key does) is not needed to label.
    return {"fid_protocol": protocol, "feature_extractor": type(extractor).__qualname__}


def score_images(
    generated: ImageFeatures,
    reference: ImageFeatures,
    extractor,
    protocol: str,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    inception_score: bool = True,
    seed: int = 0,
) -> dict:
    scores = sample_quality(reference, generated, kid_subset_size, kid_subsets, inception_score, seed)
    return {**scores, **labels(extractor, protocol)}


def score_sampler(
    sampler,
    plan: ImagePlan,
    settings: SampleSettings,
    reference: ImageFeatures,
    extractor,
    protocol: str,
    batch_size: int,
    device,
    clip_scorer: ClipScorer | None = None,
    progress: bool = False,
    on_batch: Callable[[int, torch.Tensor], None] | None = None,
    **score_options,
) -> dict:
    """Generate the plan batch by batch (never all images in memory) and score it; CLIP score too when the
    plan has prompts and a scorer is given. `on_batch(start, images)` sees each generated batch (e.g. to keep
    the first few for a grid without sampling them again)."""
    with_clip = clip_scorer is not None and plan.prompts is not None
    if with_clip:
        clip_scorer.reset(device)

    def generated_batches():
        for start, images in generate(sampler, plan, settings, batch_size, progress, "sampling for FID"):
            if on_batch is not None:
                on_batch(start, images)
            images = as_rgb_uint8(images)
            if with_clip:
                clip_scorer.update(images, plan.prompts[start : start + len(images)])
            yield images

    generated = extract_features(extractor, generated_batches(), protocol, device)
    scores = score_images(generated, reference, extractor, protocol, **score_options)
    if with_clip:
        scores["clip_score"] = clip_scorer.compute()
    return scores
