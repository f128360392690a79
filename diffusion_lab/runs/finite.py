"""Refusing weights that are not finite: a diverged model must not be checkpointed, exported or sampled."""

from collections.abc import Iterable

import torch


class NonFiniteWeights(ValueError):
    """Weights hold NaN or infinity (a diverged run)."""


def nonfinite_names(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """The names of floating-point tensors holding NaN or infinity. Quantised weights (a QLoRA base: torchao /
    bitsandbytes tensor subclasses) are frozen as loaded and have no elementwise ops to check: skipped."""
    return [
        name
        for name, tensor in named_tensors
        if _plain(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]


def _plain(tensor) -> bool:
    return type(tensor) in (torch.Tensor, torch.nn.Parameter)


def require_finite(named_tensors: Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise `NonFiniteWeights` naming the first bad tensors of `what` (a checkpoint, a pipeline, ...)."""
    bad = nonfinite_names(named_tensors)
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise NonFiniteWeights(
            f"refusing {what}: {len(bad)} weight tensors hold NaN or infinity ({shown}). The run diverged; "
            "use a checkpoint from before it (run_summary.json names the last good one)"
        )


def require_finite_modules(modules: Iterable[torch.nn.Module | None], what: str) -> None:
    require_finite(
        (
            (name, tensor)
            for module in modules
            if module is not None
            for name, tensor in module.state_dict().items()
        ),
        what,
    )
