"""What `sample` and `eval` read, as a sampler: a Lightning checkpoint (`ckpt_path=`) or a diffusers model
(`pretrained=`: a pipeline folder or a hub id). The family comes from the checkpoint or the folder's index."""

from pathlib import Path

import torch

from diffusion_lab.errors import ConfigError
from diffusion_lab.families.checkpoints import load_checkpoint
from diffusion_lab.families.registry import family_of_pipeline
from diffusion_lab.generation.samplers import Sampler
from diffusion_lab.runs.finite import require_finite_modules


def _pipeline_index(name_or_path: str, revision: str | None) -> dict:
    from diffusers import DiffusionPipeline

    folder = Path(name_or_path)
    if folder.is_dir() and not (folder / "model_index.json").is_file():
        raise ConfigError(
            f"pretrained={name_or_path}: no model_index.json, not a diffusers pipeline folder "
            "(a LoRA folder goes in lora=, on top of pretrained=<its base model>)"
        )
    index = dict(DiffusionPipeline.load_config(name_or_path, revision=revision))
    if folder.is_dir():
        missing = [
            name for name, value in index.items()
            if not name.startswith("_") and isinstance(value, list) and value[0] is not None
            and not (folder / name).is_dir()
        ]  # fmt: skip
        if missing:
            raise ConfigError(
                f"pretrained={name_or_path}: the pipeline folder lacks {', '.join(f'{m}/' for m in missing)}, which "
                "its model_index.json lists"
            )
    return index


def _from_pipeline(name_or_path: str, revision: str | None, lora: str | None, dtype: torch.dtype | None):
    index = _pipeline_index(name_or_path, revision)
    family = family_of_pipeline(index, where=f"pretrained={name_or_path}")
    kwargs = {"revision": revision} if revision else {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    pipeline = family.load_pipeline(name_or_path, **kwargs)
    source = "pipeline_folder" if Path(name_or_path).is_dir() else "hub"
    details = {"source": source, "family": family.name, "pipeline_class": type(pipeline).__name__}
    if lora:
        if not family.lora_target_modules:
            raise ConfigError(f"lora= applies to latent families; {name_or_path} is a {family.name} model")
        from diffusion_lab.families.lora import lora_scheduler  # peft: imported only when a LoRA is asked for

        pipeline.load_lora_weights(lora)
        trained_for = lora_scheduler(lora)  # e.g. a v-prediction adapter on an epsilon base
        if trained_for is not None:
            pipeline.scheduler = trained_for
            details["scheduler_from"] = str(lora)
    return family.sampler_from_pipeline(pipeline), details


def load_sampler(
    ckpt_path: str | None = None,
    pretrained: str | None = None,
    use_ema: bool = True,
    revision: str | None = None,
    lora: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Sampler, dict]:
    """(sampler on the CPU, details of what was loaded). `ckpt_path`: a Lightning checkpoint, with its EMA
    weights when `use_ema` and it has them. `pretrained`: `DiffusionPipeline.from_pretrained`'s folder or hub
    id, with `lora` (a folder `diffusion-lab export` wrote for a LoRA run) loaded on top. Exactly one."""
    if bool(ckpt_path) == bool(pretrained):
        raise ConfigError(
            "name exactly one model: ckpt_path=FILE (a Lightning checkpoint) or pretrained=DIR_OR_HUB_ID "
            "(a diffusers pipeline)"
        )
    if ckpt_path:
        path = Path(str(ckpt_path)).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        if lora:
            raise ConfigError("lora= is for pipelines; a LoRA run's checkpoint already carries its adapters")
        family, parts, details = load_checkpoint(path, use_ema)
        sampler = family.sampler(parts)
        if dtype is not None:
            sampler.to("cpu", dtype)
        return _finite(sampler, ckpt_path), details
    path = Path(str(pretrained)).expanduser()
    if path.is_file():
        raise ConfigError(
            f"pretrained={pretrained} is a file: pretrained= names a diffusers pipeline folder or hub id; "
            f"a Lightning checkpoint is ckpt_path={pretrained}"
        )
    if not path.exists() and (str(pretrained).startswith((".", "/", "~")) or str(pretrained).count("/") > 1):
        raise ConfigError(f"pretrained={pretrained}: no such pipeline folder")
    sampler, details = _from_pipeline(str(path) if path.exists() else str(pretrained), revision, lora, dtype)
    return _finite(sampler, pretrained), details


def _finite(sampler: Sampler, source: str) -> Sampler:
    """A diverged model would sample black images and exit 0: refuse it."""
    require_finite_modules([sampler.net], f"to sample from {source}")
    return sampler
