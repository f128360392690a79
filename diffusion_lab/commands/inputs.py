"""Inputs of `sample`, `eval`, `export` and `ema` checked before anything is loaded or any folder is made."""

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError


def require_positive(cfg: DictConfig, *keys: str) -> None:
    """Each of `keys` (dotted) that the config sets must be a whole number above 0."""
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{key}={value!r}: must be a whole number above 0")
