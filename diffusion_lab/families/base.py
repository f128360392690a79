"""What makes a model family: everything that differs between pixel UNets, Stable Diffusion and SDXL.

A family is one object in one registry (`families.registry`). It builds its parts, says how a batch becomes
the network's clean input and conditioning, how its checkpoints reload, which pipeline class it exports and
samples with, and whether its grid is of images or of prompts. `sample`, `eval`, `export`, `ema` and the
callbacks ask the registry; nothing outside it dispatches on a family. Importing a family needs neither
Lightning nor Hydra, so `sample` and `eval` stay free of both.
"""

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffusion_lab.errors import ConfigError


@dataclass
class ModelParts:
    """A model as diffusers sees it: the trained network, its training noise scheduler and, for latent
    families, the frozen parts (`vae`, `tokenizer`, `text_encoder`, ...) by their pipeline names. `base` names
    the pretrained model the parts came from (`pretrained`, `revision`, its own scheduler config): a LoRA
    exports as adapters for it."""

    net: torch.nn.Module
    noise_scheduler: Any
    frozen: dict[str, Any] = field(default_factory=dict)
    base: dict | None = None

    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.net, "peft_config", None))


class Family(abc.ABC):
    """One model family. Subclasses declare `name`, `grid` and `pipeline_classes`, and implement the rest."""

    name: ClassVar[str]
    grid: ClassVar[str]  # "image" (seeds, class labels) or "prompt" (prompts x seeds)
    pipeline_classes: ClassVar[tuple[str, ...]]  # the diffusers pipeline classes its folders hold
    lora_target_modules: ClassVar[tuple[str, ...]] = ()  # empty: the family trains no LoRA
    # `diffusion-lab train` overrides for a seconds-long CPU run of this family (the family contract test)
    tiny_overrides: ClassVar[tuple[str, ...]]

    # ---- recognising what it owns ---------------------------------------------------------------------
    def owns_pipeline(self, index: dict) -> bool:
        """Whether a `model_index.json` (as a dict) is one of this family's pipeline folders."""
        class_name = index.get("_class_name")
        name = class_name[-1] if isinstance(class_name, list) else class_name
        return name in self.pipeline_classes

    def owns_network(self, net: torch.nn.Module) -> bool:
        """Whether a network built from the configs (`model.net`) is this family's (a pixel-space module asks)."""
        return False

    def owns_legacy_checkpoint(self, checkpoint: dict) -> bool:
        """A checkpoint written before checkpoints named their family (`checkpoint["family"]`)."""
        return False

    # ---- parts ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def parts_from_checkpoint(self, checkpoint: dict) -> ModelParts:
        """The model a Lightning checkpoint (loaded as a dict) holds, with its trained (not EMA) weights."""

    @abc.abstractmethod
    def parts_from_pipeline(self, pipeline) -> ModelParts:
        """The parts of a loaded diffusers pipeline of this family."""

    def build_tiny(self, out_dir: Path, sample_size: int = 32, seed: int = 0) -> Path:
        """A tiny random pretrained model of this family (`diffusion-lab tiny-sd variant=<name>`), for CPU runs."""
        raise ConfigError(f"the {self.name} family trains from scratch: it has no pretrained model to build")

    def load_pipeline(self, name_or_path: str, **kwargs):
        """A pipeline folder or hub id of this family, through `DiffusionPipeline.from_pretrained`."""
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(name_or_path, **kwargs)

    # ---- using them -------------------------------------------------------------------------------------
    @abc.abstractmethod
    def sampler(self, parts: ModelParts):
        """A `generation.Sampler` over `parts`: what grids, `sample` and `eval` draw with."""

    def sampler_from_pipeline(self, pipeline):
        """A sampler over a pipeline this family's `load_pipeline` loaded."""
        return self.sampler(self.parts_from_pipeline(pipeline))

    @abc.abstractmethod
    def save_pipeline(self, parts: ModelParts, folder: Path) -> Path:
        """Write what `DiffusionPipeline.from_pretrained(folder)` loads (a LoRA: adapters for `parts.base`)."""

    def evaluation_source(self, parts: ModelParts, folder: str | Path) -> dict:
        """What `eval` loads for a folder `save_pipeline` wrote: {"pretrained": ..., "lora": ...}."""
        return {"pretrained": str(folder), "lora": None}
