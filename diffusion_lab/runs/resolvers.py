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


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("folder_id", folder_id, replace=True)
    OmegaConf.register_new_resolver("sweep_group", sweep_group, replace=True)
    OmegaConf.register_new_resolver("run_label", run_label, replace=True)
