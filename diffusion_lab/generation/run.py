"""A sampling run: which seed, prompt and class label each image gets; PNGs, a grid and settings.json."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from diffusion_lab.generation.samplers import Sampler, SampleSettings
from diffusion_lab.images import save_grid, save_image
from diffusion_lab.runs.atomic import write_text
from diffusion_lab.runs.signals import stop_if_requested

GRID_IMAGES = 256  # a grid is for looking at; more would only cost memory


@dataclass
class ImagePlan:
    """Per image: its seed and its prompt or class label (None where the model takes none)."""

    seeds: list[int]
    prompts: list[str] | None = None
    class_labels: list[int] | None = None
    columns: int | None = None  # grid columns: images per prompt for text models

    def __len__(self) -> int:
        return len(self.seeds)

    def rows(self, start: int, stop: int) -> dict:
        return {
            "seeds": self.seeds[start:stop],
            "prompts": None if self.prompts is None else self.prompts[start:stop],
            "class_labels": None if self.class_labels is None else self.class_labels[start:stop],
        }


def read_prompts(prompt: str | list[str] | None, prompt_file: str | None) -> list[str]:
    """`prompt` (one or a list) plus the non-empty lines of `prompt_file`."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
    if prompt_file:
        lines = Path(prompt_file).expanduser().read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def plan_images(
    sampler: Sampler,
    num_images: int,
    seed: int,
    prompts: list[str] | None = None,
    class_label: int | list[int] | None = None,
) -> ImagePlan:
    """Text models: `num_images` per prompt, prompt by prompt. Pixel models: `num_images` in all; a
    class-conditional one cycles through `class_label` (one or a list; default: every class in turn).
    Image k gets seed `seed + k`."""
    if sampler.kind == "text":
        if not prompts:
            raise ValueError(
                "a text-to-image model needs prompts: prompt='a photo of ...' or prompt_file=PATH"
            )
        expanded = [prompt for prompt in prompts for _ in range(num_images)]
        return ImagePlan([seed + k for k in range(len(expanded))], prompts=expanded, columns=num_images)
    if prompts:
        raise ValueError("this is a pixel-space model without text conditioning: drop prompt/prompt_file")
    seeds = [seed + k for k in range(num_images)]
    if not sampler.num_classes:
        if class_label is not None:
            raise ValueError("this pixel model is not class-conditional: drop class_label")
        return ImagePlan(seeds)
    if class_label is None:
        cycle = list(range(sampler.num_classes))
    else:
        cycle = [
            int(label) for label in (class_label if isinstance(class_label, list | tuple) else [class_label])
        ]
    if any(not 0 <= label < sampler.num_classes for label in cycle):
        raise ValueError(f"class_label must lie in 0..{sampler.num_classes - 1}; got {cycle}")
    return ImagePlan(seeds, class_labels=[cycle[k % len(cycle)] for k in range(num_images)])


def generate(
    sampler: Sampler,
    plan: ImagePlan,
    settings: SampleSettings,
    batch_size: int,
    progress: bool = True,
    description: str = "sampling",
):
    """Yield (first index, images in [-1, 1] on the CPU) batch by batch, with a progress bar over images."""
    with tqdm(total=len(plan), desc=description, unit="img", disable=not progress) as bar:
        for start in range(0, len(plan), batch_size):
            stop_if_requested()
            rows = plan.rows(start, min(start + batch_size, len(plan)))
            images = sampler.generate(
                rows["seeds"], settings, class_labels=rows["class_labels"], prompts=rows["prompts"],
                progress=progress,
            ).cpu()  # fmt: skip
            bar.update(len(images))
            yield start, images


def write_sample_run(
    sampler: Sampler,
    plan: ImagePlan,
    settings: SampleSettings,
    out_dir: str | Path,
    batch_size: int,
    record: dict,
    loaded: dict | None = None,
    progress: bool = True,
) -> dict:
    """`out_dir/00000.png ...`, `grid.png` (the first GRID_IMAGES) and, last, `settings.json` (its presence
    means complete).

    `record` is what reproduces the run (the command's resolved settings); it is stored beside the
    per-image seeds, prompts and labels, the scheduler's full config and the library versions."""
    from importlib.metadata import version

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    width = max(5, len(str(len(plan) - 1)))
    files, collected = [], []
    for start, images in generate(sampler, plan, settings, batch_size, progress):
        for offset, image in enumerate(images):
            files.append(save_image(image, out_dir / f"{start + offset:0{width}d}.png").name)
        if start < GRID_IMAGES:
            collected.append(images[: GRID_IMAGES - start])
    shown = torch.cat(collected)
    columns = plan.columns or math.ceil(math.sqrt(len(shown)))
    grid = save_grid(shown, out_dir / "grid.png", upscale_to=64, columns=columns)
    per_image = {key: values for key, values in plan.rows(0, len(plan)).items() if values is not None}
    scheduler = sampler.scheduler(settings)
    description = {
        "settings": record,
        "model": {"kind": sampler.kind, **(loaded or {})},
        "scheduler": {"class": type(scheduler).__name__, "config": dict(scheduler.config)},
        "images": [
            {"file": name, **{key[:-1]: values[k] for key, values in per_image.items()}}
            for k, name in enumerate(files)
        ],
        "versions": {name: version(name) for name in ("diffusion_lab", "diffusers", "torch")},
    }  # fmt: skip
    settings_path = out_dir / "settings.json"
    write_text(settings_path, json.dumps(description, indent=2, default=str))
    return {"images": len(files), "out_dir": str(out_dir), "grid": str(grid), "settings": str(settings_path)}
