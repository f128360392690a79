"""The one registry of model families: by name, by checkpoint and by pipeline folder."""

from diffusion_lab.errors import ConfigError
from diffusion_lab.families.base import Family

_FAMILIES: dict[str, Family] = {}


def register(family_class: type[Family]) -> type[Family]:
    """Class decorator: one instance per family, under its `name`."""
    if family_class.name in _FAMILIES:
        raise ValueError(f"model family {family_class.name!r} is registered twice")
    _FAMILIES[family_class.name] = family_class()
    return family_class


def families() -> dict[str, Family]:
    _load_builtin()
    return dict(_FAMILIES)


def family_named(name: str) -> Family:
    _load_builtin()
    if name not in _FAMILIES:
        raise ConfigError(f"unknown model family {name!r}; registered: {', '.join(_FAMILIES)}")
    return _FAMILIES[name]


def family_of_checkpoint(checkpoint: dict, where: str = "the checkpoint") -> Family:
    """The family a Lightning checkpoint names (`checkpoint["family"]`), or, for older ones, owns it."""
    _load_builtin()
    if checkpoint.get("family"):
        return family_named(checkpoint["family"])
    for family in _FAMILIES.values():
        if family.owns_legacy_checkpoint(checkpoint):
            return family
    raise ConfigError(f"{where} is not a diffusion_lab checkpoint (it names no model family)")


def family_of_network(net, where: str = "model.net") -> Family:
    """The family a network built from the configs belongs to (a UNet2DModel: pixel; a DiT: dit)."""
    _load_builtin()
    for family in _FAMILIES.values():
        if family.owns_network(net):
            return family
    raise ConfigError(f"{where} is a {type(net).__name__}, which no model family trains")


def family_of_pipeline(index: dict, where: str = "the pipeline") -> Family:
    """The family whose pipeline class a `model_index.json` names."""
    _load_builtin()
    for family in _FAMILIES.values():
        if family.owns_pipeline(index):
            return family
    known = sorted({name for family in _FAMILIES.values() for name in family.pipeline_classes})
    raise ConfigError(
        f"{where} is a {index.get('_class_name')}; diffusion_lab's families load {', '.join(known)}"
    )


def _load_builtin() -> None:
    """Import the built-in family modules (each registers itself) on first use."""
    from diffusion_lab.families import dit, dit_latent, flux, pixel, sd3, stable_diffusion, z_image  # noqa: F401
