"""OmegaConf resolvers the configs use: names that differ between a single run and a sweep's runs."""

from omegaconf import OmegaConf


def is_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (`-m`)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group(run_name: str) -> str:
    """A sweep's runs share one group (`<run_name>/<sweep folder>`); a single run is its own."""
    from hydra.core.hydra_config import HydraConfig

    if not is_multirun():
        return run_name
    return f"{run_name}/{HydraConfig.get().sweep.dir.rstrip('/').rsplit('/', 1)[-1]}"


def run_label(run_name: str) -> str:
    """`run_name`, and in a sweep the job number and its overrides: `ddpm_digits#3 model.lr=3e-4`."""
    from hydra.core.hydra_config import HydraConfig

    if not is_multirun():
        return run_name
    job = HydraConfig.get().job
    return f"{run_name}#{job.num} {' '.join(HydraConfig.get().overrides.task)}".strip()


def folder_id(folder: str) -> str:
    """A stable id for a run folder: a run resumed in its own folder continues the same W&B run."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256(str(Path(folder).resolve()).encode()).hexdigest()[:16]


def unet_widths(width: int, channel_mult: list[int]) -> list[int]:
    """`block_out_channels` from a base width and per-level multipliers (ADM's and lucidrains' `dim_mults`):
    one scalar to search instead of a list."""
    return [int(width) * int(mult) for mult in channel_mult]


def attention_at_lowest(count: int, channel_mult: list[int]) -> list[bool]:
    """`attention_levels` with self-attention at the `count` lowest-resolution levels."""
    levels = len(channel_mult)
    if not 0 <= int(count) <= levels:
        raise ValueError(f"attention at the {count} lowest levels: choose 0 to {levels}")
    return [level >= levels - int(count) for level in range(levels)]


def attention_up_to(resolution: int, image_size: int, levels: int) -> list[bool]:
    """`attention_levels` with self-attention at every level whose feature map is at most `resolution` px a
    side (ADM's and DiT-era UNets' rule, arXiv:2105.05233): the same rule keeps attention cheap at any image
    size, where a count of levels would put it on 16 px maps of a 32 px image."""
    return [int(image_size) // 2**level <= int(resolution) for level in range(int(levels))]


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("attention_up_to", attention_up_to, replace=True)
    OmegaConf.register_new_resolver("unet_widths", unet_widths, replace=True)
    OmegaConf.register_new_resolver("attention_at_lowest", attention_at_lowest, replace=True)
    OmegaConf.register_new_resolver("folder_id", folder_id, replace=True)
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
    OmegaConf.register_new_resolver("run_label", run_label, replace=True)
