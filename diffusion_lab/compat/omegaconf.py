"""OmegaConf: `_get_node`, `_is_missing` and `_is_none`, to walk a config without resolving interpolations."""

from omegaconf import DictConfig

TESTED = "2.3"


def child_config(node: DictConfig, key) -> DictConfig | None:
    """The config under `key`, unresolved (an interpolation that only Hydra's runtime resolves is not touched),
    or None where that is no set config."""
    child = node._get_node(key)
    if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
        return child
    return None
