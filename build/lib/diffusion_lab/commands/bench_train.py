"""`diffusion-lab bench train`: project training step vs a plain PyTorch loop, same run, same everything."""

import copy
import json

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from diffusion_lab.benchmarks.train_step import (
    StepTimer,
    peak_flops,
    repeated_batch_loader,
    synthetic_batch,
    time_plain_loop,
    training_flops_per_image,
)


def bench_train(cfg: DictConfig) -> dict:
    torch.manual_seed(cfg.seed)
    model = instantiate(cfg.model)
    batch = synthetic_batch(model.net.config, cfg.batch_size)
    initial_net = copy.deepcopy(model.net)
    flops_per_image = training_flops_per_image(copy.deepcopy(initial_net), model.noise_scheduler, batch)
    precision = str(cfg.trainer.precision)
    gradient_clip = cfg.trainer.get("gradient_clip_val")

    project, plain, device = [], [], "cpu"
    for _ in range(cfg.repeats):
        model.net.load_state_dict(initial_net.state_dict())
        timer = StepTimer(warmup_steps=cfg.warmup_steps, batch_size=cfg.batch_size)
        trainer = instantiate(
            cfg.trainer,
            max_steps=cfg.warmup_steps + cfg.steps,
            callbacks=[timer],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )
        trainer.fit(model, train_dataloaders=repeated_batch_loader(batch, cfg.warmup_steps + cfg.steps))
        project.append(timer.images_per_second)
        device = trainer.strategy.root_device  # Lightning moves the module back to the CPU after fit
        plain.append(
            time_plain_loop(
                copy.deepcopy(initial_net).to(device),
                model.noise_scheduler,
                batch,
                lr=cfg.model.lr,
                precision=precision,
                gradient_clip=gradient_clip,
                warmup_steps=cfg.warmup_steps,
                steps=cfg.steps,
            )
        )
    result = {
        "project_img_s": round(max(project), 2),
        "plain_img_s": round(max(plain), 2),
        "ratio": round(max(project) / max(plain), 3),
        "train_gflop_per_image": round(flops_per_image / 1e9, 3),
        "achieved_tflop_s": round(max(project) * flops_per_image / 1e12, 3),
        "params_m": round(sum(p.numel() for p in initial_net.parameters()) / 1e6, 2),
        "batch_size": cfg.batch_size,
        "image_size": model.net.config.sample_size,
        "precision": precision,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    peak = peak_flops(device, precision)
    if peak:
        result["mfu"] = round(max(project) * flops_per_image / peak, 4)
        result["peak_tflop_s"] = peak / 1e12
    print(json.dumps(result))
    return result
