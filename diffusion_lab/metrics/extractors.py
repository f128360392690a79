"""Image feature extractors for FID / KID / IS. Each takes (N, 3, H, W) images, uint8 or float with values
0..255 (what the `clean` protocol hands over: resized, not rounded), and returns {"features": (N, D)} plus
"logits" (N, K) where it is a classifier (then Inception Score is defined).

`input_size` is the side the network was made for: the `clean` protocol resizes to it before the call.
"""

import hashlib

import torch
from torch import nn

from diffusion_lab.compat.torch_fidelity import fidelity_forward, network_dtype, resize_like_tensorflow1

# torch-fidelity's InceptionV3 after its input resize, with where each feature width is read off.
_INCEPTION_STAGES = (
    (("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1"), "64"),
    (("Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2"), "192"),
    (("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"), "768"),
    (("Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool"), "2048"),
)


class InceptionV3(nn.Module):
    """The FID network: torch-fidelity's port of the TensorFlow InceptionV3 (pool3 features, 2048-d, and the
    1008-way logits), via torchmetrics. Inside, uint8 images are resized to 299 with torch-fidelity's
    TF1-style bilinear resize (`antialias=False`), which is what reproduces the TF FID code papers report;
    torchmetrics' own FID default (`antialias=True`) gives different numbers.

    Float images (values 0..255, as the `clean` protocol hands them over after its PIL bicubic resize) skip
    torch-fidelity's uint8-only entry check and go through the same layers: the same cast, TF1 resize (an
    exact identity at 299 px: scale 1, zero interpolation weights), (x - 128) / 128, and network. Those are
    also the steps of clean-fid's InceptionV3 on its float 299 px input, so `clean` gives clean-fid's numbers.

    The weights (pt_inception-2015-12-05, 91 MB) download on first use into the torch hub cache; offline,
    point `weights_path` at a copy.
    """

    input_size = 299

    def __init__(self, weights_path: str | None = None, feature: int = 2048) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.feature = str(feature)
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
        if images.dtype == torch.uint8:  # legacy: torch-fidelity's forward as it is
            features, logits = fidelity_forward(self.net, images)
        else:
            features, logits = self._float_forward(images)
        return {"features": features.reshape(len(images), -1), "logits": logits}

    def _float_forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """torch-fidelity's forward (torchmetrics' copy) for float 0..255 images, which it refuses."""
        from torch.nn.functional import adaptive_avg_pool2d

        net, size = self.net, self.input_size
        x = images.to(network_dtype(net))
        if x.shape[-2:] != (size, size):
            x = resize_like_tensorflow1(x, size)
        x = (x - 128) / 128
        features = None
        for layers, width in _INCEPTION_STAGES:
            for layer in layers:
                x = getattr(net, layer)(x)
            if width == self.feature:
                features = torch.flatten(x, 1) if width == "2048" else adaptive_avg_pool2d(x, 1).flatten(1)
        logits = torch.flatten(x, 1).mm(net.fc.weight.T)  # "logits_unbiased", as torch-fidelity's IS uses
        return features, logits


class RandomConvFeatures(nn.Module):
    """A fixed-seed random convolutional network: runs anywhere, downloads nothing, and separates image
    distributions well enough to rank runs and test pipelines. Its numbers are comparable only with
    numbers from the same seed and size, never with the literature. Takes uint8 or float 0..255 images."""

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
    """Class and a digest of the weights (every state-dict entry: parameters and buffers such as BatchNorm's
    0-dim int64 counters, any dtype): what reference features computed with it are keyed by."""
    digest = hashlib.sha256(type(extractor).__qualname__.encode())
    for name, tensor in sorted(extractor.state_dict().items()):
        digest.update(name.encode())
        # Raw bytes, flattened first (a 0-dim tensor cannot be viewed as bytes); others keep their old digest.
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return {
        "class": type(extractor).__qualname__,
        "input_size": getattr(extractor, "input_size", None),
        "weights": digest.hexdigest()[:16],
    }
