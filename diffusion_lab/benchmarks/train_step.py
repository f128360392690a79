"""Timing a training step two ways, and counting what it computes."""

import copy
import json
import time

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, IterableDataset

from diffusion_lab.benchmarks.counting import count_flops, parameters_m

# Dense peak FLOP/s by (device name fragment, compute dtype), from the vendors' datasheets (SXM parts).
PEAK_FLOPS = {
    ("H100", "bf16"): 989e12,
    ("H100", "fp16"): 989e12,
    ("H100", "tf32"): 494e12,
    ("H200", "bf16"): 989e12,
    ("H200", "fp16"): 989e12,
    ("H200", "tf32"): 494e12,
    ("A100", "bf16"): 312e12,
    ("A100", "fp16"): 312e12,
    ("A100", "tf32"): 156e12,
}


def autocast_dtype(precision: str) -> torch.dtype | None:
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return None


def peak_flops(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "tf32"}[autocast_dtype(precision)]
    return next(
        (peak for (fragment, kind), peak in PEAK_FLOPS.items() if fragment in name and kind == dtype), None
    )


def synthetic_batch(net_config, batch_size: int) -> dict:
    """A batch of the net's shape; timing does not depend on the pixels' content."""
    size, channels = net_config.sample_size, net_config.in_channels
    batch = {
        "pixels": torch.rand(batch_size, channels, size, size) * 2 - 1,
        "index": torch.arange(batch_size),
    }
    if net_config.num_class_embeds:
        batch["label"] = torch.randint(0, net_config.num_class_embeds, (batch_size,))
    return batch


class _RepeatBatch(IterableDataset):
    def __init__(self, batch: dict, times: int) -> None:
        self.batch, self.times = batch, times

    def __iter__(self):
        for _ in range(self.times):
            yield self.batch


def repeated_batch_loader(batch: dict, times: int) -> DataLoader:
    """The same host-side batch `times` times, so both sides pay the same host-to-device copy."""
    return DataLoader(_RepeatBatch(batch, times), batch_size=None)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(L.Callback):
    """Images/s over the steps after `warmup_steps`, measured from the first timed batch's start."""

    def __init__(self, warmup_steps: int, batch_size: int) -> None:
        self.warmup_steps, self.batch_size = warmup_steps, batch_size
        self.start: float | None = None
        self.timed_steps = 0
        self.images_per_second = float("nan")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup_steps:
            _synchronize(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.timed_steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        _synchronize(pl_module.device)
        elapsed = time.perf_counter() - self.start
        self.images_per_second = self.timed_steps * self.batch_size / elapsed


def plain_training_step(
    net, noise_scheduler, pixels, optimizer, dtype, scaler, gradient_clip
) -> torch.Tensor:
    """The diffusers tutorial's loop body: noise, timesteps, add_noise, predict, MSE, step."""
    noise = torch.randn_like(pixels)
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (len(pixels),), device=pixels.device
    )
    noisy = noise_scheduler.add_noise(pixels, noise, timesteps)
    with torch.autocast(pixels.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        prediction = net(noisy, timesteps).sample
    loss = F.mse_loss(prediction.float(), noise.float())
    scaler.scale(loss).backward()
    if gradient_clip:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(net.parameters(), gradient_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def time_plain_loop(
    net, noise_scheduler, batch, *, lr, precision, gradient_clip, warmup_steps, steps
) -> float:
    """Images/s of the plain loop, same warm-up and step count as the project side."""
    device = next(net.parameters()).device
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    dtype = autocast_dtype(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    net.train()
    if "label" in batch:
        raise ValueError("bench train times unconditional nets: leave model.net.num_class_embeds unset")
    for step in range(warmup_steps + steps):
        if step == warmup_steps:
            _synchronize(device)
            start = time.perf_counter()
        pixels = batch["pixels"].to(device, non_blocking=True)
        plain_training_step(net, noise_scheduler, pixels, optimizer, dtype, scaler, gradient_clip)
    _synchronize(device)
    return steps * len(batch["pixels"]) / (time.perf_counter() - start)


def training_flops_per_image(net, noise_scheduler, batch) -> float:
    """Forward + backward FLOPs of one training step, per image (torch.utils.flop_counter).

    Counted on one image: a UNet's FLOPs are linear in the batch size.
    """
    pixels = batch["pixels"][:1]
    timesteps = torch.zeros(1, dtype=torch.long)

    def step():
        noisy = noise_scheduler.add_noise(pixels, torch.randn_like(pixels), timesteps)
        F.mse_loss(net(noisy, timesteps).sample, pixels).backward()

    return count_flops(step)


def bench_train(cfg: DictConfig) -> dict:
    """`diffusion-lab bench train`: project training step vs a plain PyTorch loop, same run, same everything."""
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
        "params_m": parameters_m(initial_net),
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
