"""Command-line overrides: library arguments the configs do not list, and what to say about a wrong key."""

import difflib
from importlib.resources import files

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.compat.hydra import parse_overrides
from diffusion_lab.runs.config_checks import target_parameters

CONFIG_MODULE = "diffusion_lab.conf"  # conf/ at the top of a checkout, installed under this name


def is_config_group(name: str) -> bool:
    """Whether `name` (e.g. `model.net`) is a config group: a folder of configs."""
    return files(CONFIG_MODULE).joinpath(*name.split(".")).is_dir()


def _library_arguments(node: DictConfig) -> list[str] | None:
    """The arguments of a config node's `_target_` (e.g. every `lightning.Trainer` argument)."""
    if "_target_" not in node:
        return None
    parameters = target_parameters(node._target_)
    return None if parameters is None else list(parameters)


def _compose_groups(config_name: str, overrides: list[str]):
    """(config composed with the command line's group choices, parsed overrides, the group overrides)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    try:
        parsed = parse_overrides([o for o in overrides if "=" in o and not o.startswith("-")])
    except Exception:
        return None
    groups = [o for o in parsed if is_config_group(o.key_or_group) and not o.is_sweep_override()]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            return compose(config_name, overrides=[o.input_line for o in groups]), parsed, groups
    except Exception:
        return None
    finally:
        GlobalHydra.instance().clear()


def admit_library_arguments(config_name: str, overrides: list[str]) -> list[str]:
    """`trainer.max_time=00:00:15:00` where the trainer config does not list `max_time` but `lightning.Trainer`
    takes it: rewritten as `++trainer.max_time=...`, so every argument of a node's `_target_` is a valid key."""
    if not any("." in o.split("=", 1)[0] and not o.startswith(("+", "~", "-")) for o in overrides):
        return overrides
    composed = _compose_groups(config_name, overrides)
    if composed is None:
        return overrides
    cfg, parsed, groups = composed
    admitted = {}
    for override in parsed:
        key = override.key_or_group
        if override in groups or override.is_add() or override.is_force_add() or override.is_delete():
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else None
        if (
            isinstance(parent, DictConfig)
            and leaf not in list(parent)
            and leaf in (_library_arguments(parent) or ())
        ):
            admitted[override.input_line] = "++" + override.input_line
    return [admitted.get(o, o) for o in overrides]


def explain_bad_overrides(config_name: str, overrides: list[str]) -> str | None:
    """After Hydra rejects a command line: name the unknown keys, the valid ones beside them, a likely fix."""
    composed = _compose_groups(config_name, overrides)
    if composed is None:
        return None
    cfg, parsed, groups = composed
    messages = []
    for override in parsed:
        key = override.key_or_group
        if override in groups or override.is_add() or override.is_force_add() or key.startswith("hydra"):
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf in list(parent):  # `in parent` misses `???` keys
            continue
        valid = sorted(
            {str(k) for k in parent if not str(k).startswith("_")} | set(_library_arguments(parent) or ())
        )
        close = difflib.get_close_matches(leaf, valid, n=1)
        where = f"'{parent_key}'" if parent_key else "the top level"
        suggestion = f" Did you mean '{parent_key + '.' if parent_key else ''}{close[0]}'?" if close else ""
        messages.append(
            f"diffusion-lab: unknown config key '{key}'. Valid keys under {where}: {', '.join(valid)}.{suggestion}"
        )
    return "\n".join(messages) or None


def bracket_lists(overrides: list[str], keys: tuple[str, ...]) -> list[str]:
    """`sigma_rel=0.03,0.05,0.1` (a sweep to Hydra, refused without -m) as the list `sigma_rel=[0.03,0.05,0.1]`,
    for the keys of a command that take a list."""
    if "-m" in overrides or "--multirun" in overrides:
        return overrides
    rewritten = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key in keys and "," in value and not value.startswith(("[", "'", '"')):
            override = f"{key}=[{value}]"
        rewritten.append(override)
    return rewritten
