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

from diffusion_lab.compat.omegaconf import child_config
from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.renamed import refuse_renamed_keys

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
        child = child_config(node, key)
        if child is not None:
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


FLOW_SCHEDULERS = ("diffusers.FlowMatchEulerDiscreteScheduler",)


def check_scheduler_fields(cfg: DictConfig) -> None:
    """Scheduler fields the objective does not use are refused, not silently ignored: flow matching trains on
    `FlowMatchEulerDiscreteScheduler` and reads none of a DDPM schedule's betas or prediction type."""
    objective = OmegaConf.select(cfg, "model.objective._target_", default=None)
    scheduler = OmegaConf.select(cfg, "model.noise_scheduler", default=None)
    if not objective or not objective.endswith("FlowMatching") or not isinstance(scheduler, DictConfig):
        return
    if "_target_" in scheduler:
        if scheduler._target_ in FLOW_SCHEDULERS:
            return
        fields = [key for key in scheduler if key not in _HYDRA_KEYS and key != "num_train_timesteps"]
        way_out = "choose model/noise_scheduler=flow_match"
    else:  # a latent model's changes to its base scheduler
        fields = [key for key in scheduler if OmegaConf.select(scheduler, str(key)) is not None]
        way_out = "leave them null"
    if fields:
        raise ConfigError(
            f"model/objective=flow_matching does not use model.noise_scheduler's {', '.join(map(str, fields))} "
            f"(DDPM fields): {way_out}"
        )


def check_alignment(cfg: DictConfig) -> None:
    """Representation alignment reads a block through a forward hook, which a compiled network does not run;
    SRA's teacher is a whole copy of the network, which FSDP shards."""
    alignment = OmegaConf.select(cfg, "model.alignment._target_", default=None)
    if not alignment:
        return
    if cfg.get("compile"):
        raise ConfigError(
            "compile=true with model.alignment: a compiled network keeps the hooks it was compiled with, so the "
            "aligned block's tokens would not be read; use compile=false or model/alignment=none"
        )
    strategy = OmegaConf.select(cfg, "trainer.strategy", default=None)
    target = strategy.get("_target_", "") if isinstance(strategy, DictConfig) else str(strategy or "")
    if alignment.endswith("SelfRepresentationAlignment") and "fsdp" in target.lower():
        raise ConfigError(
            "model/alignment=sra with trainer=fsdp: SRA's teacher is a whole copy of the network holding the EMA "
            "weights, which FSDP shards across ranks; use trainer=ddp, or model/alignment=repa"
        )


def check_latent_cache(cfg: DictConfig) -> None:
    """The latent cache encodes with a text-to-image base model's VAE and text encoders: a latent DiT has neither."""
    if cfg.get("latent_cache") and str(OmegaConf.select(cfg, "model._target_", default="")).endswith(
        "LatentDiT"
    ):
        raise ConfigError(
            "latent_cache=disk with model=latent_dit: the latent cache holds a text-to-image model's latents and "
            "prompts; a latent DiT encodes its images live (latent_cache=null)"
        )


def check_loss_mask(cfg: DictConfig) -> None:
    """Masks named in the data but no masked loss would train unmasked without a word: refused."""
    masks = OmegaConf.select(cfg, "data.mask_dir", default=None) or OmegaConf.select(
        cfg, "data.alpha_mask", default=False
    )
    if masks and OmegaConf.select(cfg, "model.loss_mask", default=None) is None:
        raise ConfigError(
            "data.mask_dir / data.alpha_mask give loss masks, but model/loss_mask=none ignores them: add "
            "model/loss_mask=masked (or drop the data's mask setting)"
        )


def check_run_config(cfg: DictConfig) -> None:
    check_latent_cache(cfg)
    check_loss_mask(cfg)
    refuse_renamed_keys(cfg, "train")
    check_types(cfg)
    check_values(cfg)
    check_scheduler_fields(cfg)
    check_alignment(cfg)
