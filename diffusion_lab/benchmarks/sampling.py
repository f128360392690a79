"""Sampler throughput: images/s and network evaluations (NFE) per image, for several schedulers on one net."""

import json
import time

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

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


def bench_sampling(cfg: DictConfig) -> dict:
    """`diffusion-lab bench sampling`: images/s and NFE per image for several samplers on the same net, one run."""
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = instantiate(cfg.model)
    net = model.net.to(device).eval()
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    results = {}
    for name, setting in cfg.samplers.items():
        best = None
        for _ in range(cfg.repeats):  # keep the best run of each sampler
            run = sampler_speed(net, model.noise_scheduler.config, setting.scheduler, setting.num_inference_steps, cfg.batch_size,
                                shape, device)  # fmt: skip
            best = run if best is None or run["img_s"] > best["img_s"] else best
        results[name] = {"img_s": round(best["img_s"], 2), "nfe_per_image": best["nfe_per_image"]}
    baseline = next(iter(results.values()))["img_s"]
    for entry in results.values():
        entry["vs_first"] = round(entry["img_s"] / baseline, 2)
    report = {
        "device": str(device),
        "batch_size": cfg.batch_size,
        "image_size": shape[-1],
        "samplers": results,
    }
    print(json.dumps(report))
    return report
