"""Image feature extractors for FID / KID / IS. Each takes uint8 (N, 3, H, W) and returns
{"features": (N, D)} plus "logits" (N, K) where it is a classifier (then Inception Score is defined).

`input_size` is the side the network was made for: the `clean` protocol resizes to it before the call.
"""

import hashlib

import torch
from torch import nn


class InceptionV3(nn.Module):
    """The FID network: torch-fidelity's port of the TensorFlow InceptionV3 (pool3 features, 2048-d, and the
    1008-way logits), via torchmetrics. Inside, uint8 images are resized to 299 with torch-fidelity's
    TF1-style bilinear resize (`antialias=False`), which is what reproduces the TF FID code papers report;
    torchmetrics' own FID default (`antialias=True`) gives different numbers.

    The weights (pt_inception-2015-12-05, 91 MB) download on first use into the torch hub cache; offline,
    point `weights_path` at a copy.
    """

    input_size = 299

    def __init__(self, weights_path: str | None = None, feature: int = 2048) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.net = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=[str(feature), "logits_unbiased"],
                feature_extractor_weights_path=weights_path,
                antialias=False,
            )
        except OSError as error:  # URLError is an OSError: no internet, no weights file
            raise RuntimeError(
                f"could not load the InceptionV3 FID weights ({error}). With no internet, download "
                "pt_inception-2015-12-05-6726825d.pth elsewhere and set feature_extractor.weights_path=PATH, "
                "or use feature_extractor=random_conv (offline; numbers not comparable with papers)"
            ) from error

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features, logits = self.net._torch_fidelity_forward(images)
        return {"features": features.reshape(len(images), -1), "logits": logits}


class RandomConvFeatures(nn.Module):
    """A fixed-seed random convolutional network: runs anywhere, downloads nothing, and separates image
    distributions well enough to rank runs and test pipelines. Its numbers are comparable only with
    numbers from the same seed and size, never with the literature."""

    def __init__(self, input_size: int = 64, num_features: int = 256, num_classes: int = 16, seed: int = 0):
        super().__init__()
        self.input_size = input_size
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            widths = [3, 32, 64, 128, num_features]
            layers = []
            for width_in, width_out in zip(widths[:-1], widths[1:], strict=True):
                layers += [nn.Conv2d(width_in, width_out, 3, stride=2, padding=1), nn.ReLU()]
            self.body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.classifier = nn.Linear(num_features, num_classes)
            for module in self.modules():  # variance-preserving (He) init: features of order 1, not 1e-3
                if isinstance(module, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                    nn.init.zeros_(module.bias)
        finally:
            torch.random.set_rng_state(generator_state)  # building it leaves the caller's RNG stream alone
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pixels = images.float() / 127.5 - 1
        if pixels.shape[-1] != self.input_size or pixels.shape[-2] != self.input_size:
            size = (self.input_size, self.input_size)
            pixels = nn.functional.interpolate(pixels, size=size, mode="bilinear", antialias=True)
        features = self.body(pixels)
        return {"features": features, "logits": self.classifier(features)}


def describe_extractor(extractor: nn.Module) -> dict:
    """Class and a digest of the weights: what reference features computed with it are keyed by."""
    digest = hashlib.sha256(type(extractor).__qualname__.encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return {
        "class": type(extractor).__qualname__,
        "input_size": getattr(extractor, "input_size", None),
        "weights": digest.hexdigest()[:16],
    }
