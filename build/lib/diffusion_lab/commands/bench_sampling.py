"""`diffusion-lab bench sampling`: images/s and NFE per image for several samplers on the same net, one run."""

import json

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_lab.benchmarks.sampling import sampler_speed


def bench_sampling(cfg: DictConfig) -> dict:
    torch.manual_seed(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = instantiate(cfg.model)
    net = model.net.to(device).eval()
    shape = (net.config.in_channels, net.config.sample_size, net.config.sample_size)
    results = {}
    for name, setting in cfg.samplers.items():
        best = None
        for _ in range(cfg.repeats):  # keep the best run of each sampler
            run = sampler_speed(net, model.noise_scheduler.config, setting.scheduler, setting.steps, cfg.batch_size,
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
