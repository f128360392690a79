"""A checksum of tensors, written with every checkpoint and post-hoc EMA snapshot and checked when read:
flipped or overwritten bytes are named, never silently trained on, sampled from or averaged."""

import hashlib

import torch

from diffusion_lab.errors import ConfigError

CHECKSUM_KEY = "state_dict_sha256"  # in every Lightning checkpoint (`runs.checkpoint_io`)


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the tensors' names, dtypes, shapes and bytes, in name order (about 1 s per GB on a CPU)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name]
        if not torch.is_tensor(tensor):
            continue
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
        if tensor.numel():
            digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def verify_checkpoint(checkpoint: dict, path) -> None:
    """Refuse a checkpoint whose weights are not the ones written (checkpoints from before checksums pass)."""
    expected = checkpoint.get(CHECKSUM_KEY)
    if expected is not None and tensors_checksum(checkpoint.get("state_dict", {})) != expected:
        raise ConfigError(
            f"{path}: its weights do not match the checksum written with them (flipped or overwritten bytes); "
            "use an earlier checkpoint"
        )
