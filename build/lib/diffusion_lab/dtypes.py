"""Config spellings of dtypes."""

import torch


def dtype_from_name(name: str | None) -> torch.dtype | None:
    """'float32' / 'bfloat16' / 'float16' (config spelling) -> torch dtype; None stays None."""
    if name is None:
        return None
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name!r} is not a floating point dtype; use float32, bfloat16 or float16")
    return dtype
