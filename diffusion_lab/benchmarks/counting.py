"""What a network costs, counted the same way by every bench: parameters and FLOPs."""

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def parameters_m(net: torch.nn.Module) -> float:
    """Millions of parameters, to three decimals."""
    return round(sum(p.numel() for p in net.parameters()) / 1e6, 3)


def count_flops(work: Callable[[], object]) -> float:
    """FLOPs of whatever `work()` runs (torch.utils.flop_counter: matmuls and convolutions, forward and, if it
    calls backward, backward)."""
    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())
