"""Config values checked before anything heavy starts, each failure one line naming the key.

Types come from the signature of each node's `_target_` (`lightning.Trainer`, the model, the DataModule...):
`trainer.max_steps=abc` names `trainer.max_steps` and `int`, instead of a `TypeError` deep inside Lightning.
"""

import inspect
import types
import typing
from collections.abc import Iterator, Mapping, Sequence

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from diffusion_lab.errors import ConfigError

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# Keys whose value must be above zero, wherever the config puts them.
POSITIVE = ("data.batch_size", "latent_cache.batch_size", "model.lr")


def target_parameters(target: str) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters `_target_` accepts; None where it takes any (`**kwargs`) or cannot be read."""
    try:
        parameters = inspect.signature(get_object(target)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        return None
    return {name: p for name, p in parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL}


def _hints(target: str) -> dict:
    try:
        obj = get_object(target)
        return typing.get_type_hints(obj.__init__ if inspect.isclass(obj) else obj)
    except Exception:  # unresolvable forward references: no type check for that target
        return {}


def _targets(node: DictConfig, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if "_target_" in node:
        yield path, node
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from _targets(child, f"{path}.{key}" if path else str(key))


def _matches(value, annotation) -> bool:
    if annotation in (typing.Any, inspect.Parameter.empty) or isinstance(annotation, typing.TypeVar):
        return True
    origin, arguments = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, argument) for argument in arguments)
    if origin is typing.Literal:
        return value in arguments
    if value is None:
        return annotation is type(None)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    container = origin or annotation
    if container in (list, tuple, Sequence, typing.Sequence):
        return isinstance(value, list | tuple | ListConfig)
    if container in (dict, Mapping, typing.Mapping):
        return isinstance(value, dict | DictConfig)
    return True  # modules, callables, paths, ...: left to the object itself


def _describe(annotation) -> str:
    text = getattr(annotation, "__name__", None) if typing.get_origin(annotation) is None else None
    return text or str(annotation).replace("typing.", "")


def check_types(cfg: DictConfig) -> None:
    """Every value under a `_target_` node against the annotation of the parameter it fills."""
    for path, node in _targets(cfg):
        hints = _hints(node._target_)
        for key in node:
            if key in _HYDRA_KEYS or key not in hints:
                continue
            try:
                value = node[key]
                if isinstance(value, DictConfig) and "_target_" in value:
                    continue  # built into an object first
                if isinstance(value, DictConfig | ListConfig):
                    value = OmegaConf.to_container(value, resolve=True)
            except Exception:  # an interpolation only Hydra's runtime resolves
                continue
            if not _matches(value, hints[key]):
                raise ConfigError(
                    f"{path}.{key}={value!r}: expected {_describe(hints[key])} "
                    f"(a parameter of {node._target_})"
                )


def check_values(cfg: DictConfig) -> None:
    for key in POSITIVE:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, int | float) and not isinstance(value, bool) and value <= 0:
            raise ConfigError(f"{key}={value}: must be above 0")


def check_run_config(cfg: DictConfig) -> None:
    check_types(cfg)
    check_values(cfg)
