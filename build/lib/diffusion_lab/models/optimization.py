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


def adamw_8bit(params: Iterable[torch.nn.Parameter], **kwargs) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit block-wise quantised moments (Dettmers et al. 2021,
    arXiv:2110.02861): a quarter of AdamW's optimizer memory. CUDA only."""
    params = list(params)
    devices = sorted({str(p.device) for p in params if not isinstance(p, dict)})
    if not torch.cuda.is_available() or any(not d.startswith("cuda") for d in devices):
        raise RuntimeError(
            f"model/optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes); the weights are on {devices}. "
            "Train on a GPU (trainer=gpu) or use model/optimizer=adamw"
        )
    try:
        import bitsandbytes
    except ImportError as error:
        raise ImportError(
            "model/optimizer=adamw_8bit needs bitsandbytes: pip install 'diffusion-lab[gpu]'"
        ) from error
    return bitsandbytes.optim.AdamW8bit(params, **kwargs)
