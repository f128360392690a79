"""Sampler throughput: images/s and network evaluations (NFE) per image, for several schedulers on one net."""

import time

import torch

from diffusion_lab.core import sample_images
from diffusion_lab.core.schedulers import scheduler_from_name


class CountingNet(torch.nn.Module):
    """Counts forward calls of the wrapped denoiser (one call = one network evaluation for the batch)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net, self.calls = net, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.net(*args, **kwargs)


def sampler_speed(
    net, training_config, scheduler: str, steps: int, batch_size: int, sample_shape, device
) -> dict:
    """One timed sampling run of `batch_size` images."""
    counting = CountingNet(net)
    sampler = scheduler_from_name(scheduler, training_config)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    sample_images(
        counting, sampler, batch_size, sample_shape, num_inference_steps=steps,
        generator=torch.Generator(device).manual_seed(0), device=device,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    return {"img_s": batch_size / elapsed, "nfe_per_image": counting.calls}
