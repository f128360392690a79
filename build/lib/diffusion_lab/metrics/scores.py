"""FID, KID, Inception Score and CLIP score: torchmetrics' implementations, fed features computed once.

Each metric gets an identity "extractor" and is updated with features instead of images, so a reference
set's features are extracted once (and cached) and reused by every metric and every evaluation.
"""

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from diffusion_lab.metrics.features import ImageFeatures


class _GivenFeatures(nn.Module):
    """An 'extractor' that returns its input: the features are already computed."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """KID and IS draw random subsets from the global RNG: use a fixed stream, then put the caller's back."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # "will save all extracted features in buffer": they are features already, held anyway.
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        torch.manual_seed(seed)
        yield


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    if min(len(real), len(fake)) < 2:
        raise ValueError("FID needs at least 2 images on each side")
    metric = FrechetInceptionDistance(feature=_GivenFeatures(real.shape[1]))
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return float(metric.compute())


def kernel_distance(
    real: torch.Tensor, fake: torch.Tensor, subset_size: int = 1000, subsets: int = 100, seed: int = 0
) -> tuple[float, float]:
    """KID mean and std over random subsets (unbiased, so meaningful for small sets, unlike FID)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset_size = min(subset_size, len(real), len(fake))
    if subset_size < 2:
        raise ValueError("KID needs at least 2 images on each side")
    with seeded(seed):
        metric = KernelInceptionDistance(
            feature=_GivenFeatures(real.shape[1]), subsets=subsets, subset_size=subset_size
        )
        metric.update(real, real=True)
        metric.update(fake, real=False)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score(
    logits: torch.Tensor, splits: int | None = None, seed: int = 0
) -> tuple[float, float | None]:
    """Mean and std over `splits` (default: 10 as in the paper, fewer for small sets so each split keeps at
    least 100 images; one split has no std: None). A split of one image would score 1 whatever it shows."""
    from torchmetrics.image.inception import InceptionScore

    splits = splits or min(10, max(1, len(logits) // 100))
    with seeded(seed):
        metric = InceptionScore(feature=_GivenFeatures(logits.shape[1]), splits=min(splits, len(logits)))
        metric.update(logits)
        if splits == 1:
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
        mean, std = metric.compute()
    return float(mean), (float(std) if splits > 1 else None)


def sample_quality(
    reference: ImageFeatures,
    generated: ImageFeatures,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    with_inception_score: bool = True,
    seed: int = 0,
) -> dict[str, float | int]:
    """fid, kid_mean, kid_std (+ inception_score, inception_score_std where the extractor gave logits), and
    the set sizes they were computed on."""
    kid_mean, kid_std = kernel_distance(
        reference.features, generated.features, kid_subset_size, kid_subsets, seed
    )
    scores = {
        "fid": frechet_distance(reference.features, generated.features),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
    }
    if with_inception_score and generated.logits is not None:
        scores["inception_score"], scores["inception_score_std"] = inception_score(
            generated.logits, seed=seed
        )
    return {**scores, "num_samples": len(generated), "num_reference": len(reference)}


class _ClipEmbeddings(nn.Module):
    """A CLIPModel whose get_*_features return the projected embeddings as tensors, which torchmetrics'
    CLIPScore expects; transformers 5 returns output objects (the embeddings in `pooler_output`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_model_loader(name_or_path: str):
    """What torchmetrics' CLIPScore calls to get (model, processor): any CLIP on the hub or on disk."""

    def load():
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(name_or_path).eval()
        return _ClipEmbeddings(model), CLIPProcessor.from_pretrained(name_or_path)

    return load


class ClipScorer:
    """CLIP score (100 x cosine of image and prompt embeddings, floored at 0) via torchmetrics, the model
    loaded once and kept on the CPU between evaluations. `reset(device)`, `update(...)` per batch,
    `compute()`."""

    def __init__(self, model_name_or_path: str) -> None:
        from torchmetrics.multimodal.clip_score import CLIPScore

        self.name = model_name_or_path
        self.metric = CLIPScore(model_name_or_path=clip_model_loader(model_name_or_path))
        self.device = torch.device("cpu")

    def reset(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.metric.to(self.device)
        self.metric.reset()

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        """uint8 (N, 3, H, W) images and their prompts."""
        self.metric.update(images.to(self.device), list(prompts))

    def compute(self) -> float:
        try:
            return float(self.metric.compute())
        finally:
            self.metric.to("cpu")
            self.metric.reset()
