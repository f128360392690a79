"""Sample quality: FID / KID / IS over features of a pinned extractor and protocol, and CLIP score."""

from diffusion_lab.metrics.extractors import InceptionV3, RandomConvFeatures, describe_extractor
from diffusion_lab.metrics.features import ImageFeatures, cached_features, extract_features
from diffusion_lab.metrics.protocol import PROTOCOLS, prepare_for_extractor
from diffusion_lab.metrics.scores import ClipScorer, sample_quality

__all__ = [
    "PROTOCOLS",
    "ClipScorer",
    "ImageFeatures",
    "InceptionV3",
    "RandomConvFeatures",
    "cached_features",
    "describe_extractor",
    "extract_features",
    "prepare_for_extractor",
    "sample_quality",
]
