"""Run-wide speed settings and the batch arithmetic printed at the start of a run."""

import math

import torch


def apply_speed_settings(
    net: torch.nn.Module, compile: bool | dict = False, channels_last: bool = False,
    matmul_precision: str = "highest",
) -> None:  # fmt: skip
    """TF32 / bf16 matmuls (`high` / `medium`), channels_last weights, and `nn.Module.compile` (in place: the
    state dict keeps its keys, so checkpoints, EMA and export are unchanged)."""
    torch.set_float32_matmul_precision(matmul_precision)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    if compile:
        net.compile(**(dict(compile) if not isinstance(compile, bool) else {}))


def effective_batch_size(per_device: int, accumulate_grad_batches: int, world_size: int) -> int:
    return per_device * accumulate_grad_batches * world_size


def scaled_learning_rate(lr: float, effective_batch: int, base_batch: int, rule: str | None) -> float:
    """`linear` (Goyal et al. 2017, arXiv:1706.02677) or `sqrt` (Krizhevsky 2014; Adam-style optimizers)
    scaling of `lr`, chosen for `base_batch`, to `effective_batch`; None keeps it."""
    if rule is None:
        return lr
    ratio = effective_batch / base_batch
    if rule == "linear":
        return lr * ratio
    if rule == "sqrt":
        return lr * math.sqrt(ratio)
    raise ValueError(f"unknown lr_scaling {rule!r}; valid: null, linear, sqrt")
