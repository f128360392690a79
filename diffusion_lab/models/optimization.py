"""Optimizer and learning-rate schedule from config partials."""

from collections.abc import Callable, Iterable

import torch


def configure_optimizer(
    parameters: Iterable[torch.nn.Parameter],
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    lr: float,
    lr_scheduler_factory: Callable | None = None,
) -> dict:
    """Lightning's optimizer dict; the schedule steps every optimizer step, not every epoch."""
    optimizer = optimizer_factory([p for p in parameters if p.requires_grad], lr=lr)
    if lr_scheduler_factory is None:
        return {"optimizer": optimizer}
    return {
        "optimizer": optimizer,
        "lr_scheduler": {
            "scheduler": lr_scheduler_factory(optimizer=optimizer),
            "interval": "step",
            "frequency": 1,
        },
    }
