"""torch-fidelity: the InceptionV3 FID network's own forward on uint8 images and its TensorFlow-1 resize."""

import torch

TESTED = "0.4"


def fidelity_forward(net, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch-fidelity's forward (as torchmetrics' `NoTrainInceptionV3` wraps it): (features, logits)."""
    return net._torch_fidelity_forward(images)


def resize_like_tensorflow1(images: torch.Tensor, size: int) -> torch.Tensor:
    """The bilinear resize the original TF FID code applied, which the reference statistics assume."""
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    return interpolate_bilinear_2d_like_tensorflow1x(images, size=(size, size), align_corners=False)


def network_dtype(net) -> torch.dtype:
    return getattr(net, "_dtype", torch.float)
