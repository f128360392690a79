"""The family contract: every registered model family, built tiny, trains, checkpoints, resumes, exports a folder
that stock diffusers loads, and samples through `diffusion-lab sample`, whose images equal the grid the run drew
for the same seeds. A new family gets all of this by registering."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from omegaconf import OmegaConf
from PIL import Image

from diffusion_lab.callbacks.family_check import GRID_CALLBACKS
from diffusion_lab.cli import main
from diffusion_lab.families import families, family_of_checkpoint
from diffusion_lab.families.checkpoints import read_checkpoint
from diffusion_lab.images import save_grid

FAMILIES = sorted(families())


def run(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as exit_:  # Hydra exits 0 on some paths; anything else is a failure
        assert exit_.code in (0, None), f"diffusion-lab {' '.join(args[:2])} exited {exit_.code}"


def grid_settings(config: dict, grid: str) -> dict:
    """The sampling settings the run's grid callback used, as `sample` arguments."""
    callback = config["callbacks"][GRID_CALLBACKS[grid]]
    settings = {"num_inference_steps": callback["num_inference_steps"], "seed": 0}
    if grid == "image":
        return {**settings, "num_images": callback["num_images"], "seed": callback["seed"]}
    (prompt,) = callback["prompts"]
    return {**settings, "num_images": len(callback["seeds"]), "prompt": prompt,
            "guidance_scale": callback["guidance_scale"], "height": callback["height"],
            "width": callback["width"]}  # fmt: skip


def images_of(folder, count: int) -> torch.Tensor:
    pixels = [np.asarray(Image.open(folder / f"{k:05d}.png").convert("RGB")) for k in range(count)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255 * 2 - 1


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_trains_resumes_exports_and_samples_what_its_grid_showed(name, tmp_path_factory):
    family = families()[name]
    tmp = tmp_path_factory.mktemp(name)
    run_dir, cache = tmp / "run", tmp_path_factory.getbasetemp() / "family_cache"
    grid_key = f"callbacks.{GRID_CALLBACKS[family.grid]}"
    common = [
        *family.tiny_overrides, f"hydra.run.dir={run_dir}", f"paths.cache_dir={cache}", "data.batch_size=4",
        "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", "val_every_n_steps=100",
        "trainer.limit_val_batches=1", "callbacks.model_checkpoint.every_n_train_steps=100",
        f"{grid_key}.num_inference_steps=2",
    ]  # fmt: skip
    if family.grid == "image":
        common += [f"{grid_key}.num_images=4"]
    else:
        common += [f"{grid_key}.prompts=[a handwritten digit 3]", f"{grid_key}.seeds=[0,1,2]"]

    # trains two steps and checkpoints them, naming its family
    run("train", *common, "trainer.max_steps=2")
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 2 and family_of_checkpoint(checkpoint) is family
    # every callback set logs the last step, even when the run is shorter than log_every_n_steps
    assert "train/loss" in (run_dir / "metrics.csv").read_text().splitlines()[0]

    # resumes from that checkpoint to a third step
    run("train", *common, "trainer.max_steps=3", "ckpt_path=last")
    assert json.loads((run_dir / "run_summary.json").read_text())["global_step"] == 3
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3

    # exports a folder stock diffusers loads (a LoRA: on top of its base model)
    exported = tmp / "export"
    run("export", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"out_dir={exported}")
    config = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    source = family.evaluation_source(family.parts_from_checkpoint(checkpoint), exported)
    # (a family without a stock pipeline ships its pipeline's code in the folder, which diffusers runs on request)
    pipeline = DiffusionPipeline.from_pretrained(source["pretrained"], trust_remote_code=True)
    if source["lora"]:
        pipeline.load_lora_weights(source["lora"])
    assert type(pipeline).__name__ in family.pipeline_classes

    # `diffusion-lab sample` on the export draws what the run's final grid showed, for the same seeds
    settings = grid_settings(config, family.grid)
    sampled = tmp / "sampled"
    lora = [f"lora={source['lora']}"] if source["lora"] else []
    run("sample", f"pretrained={source['pretrained']}", *lora, f"out_dir={sampled}",
        *[f"{key}={json.dumps(value) if isinstance(value, str) else value}" for key, value in settings.items()
          if value is not None])  # fmt: skip
    images = images_of(sampled, settings["num_images"])
    columns = None if family.grid == "image" else settings["num_images"]
    redrawn = save_grid(images, tmp / "redrawn.png", columns=columns)
    shown = np.asarray(Image.open(run_dir / "samples" / "final.png").convert("RGB")).astype(int)
    assert np.abs(np.asarray(Image.open(redrawn).convert("RGB")).astype(int) - shown).max() <= 1


def test_the_pixel_sampling_loop_draws_what_the_exported_ddpm_pipeline_draws():
    """The loop the pixel family samples with (core/sampling.py) exists for what DDPMPipeline cannot do (UniPC,
    Euler, eta); where the pipeline works it must draw the same images from the same seeds."""
    from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler

    from diffusion_lab.generation import PixelSampler, SampleSettings
    from diffusion_lab.models import build_unet

    torch.manual_seed(0)
    net = build_unet(8, 3, [32, 32], [False, True], layers_per_block=1).eval()
    training = DDPMScheduler()
    ours = PixelSampler(net, training).generate(
        [3, 4], SampleSettings(scheduler="ddim", num_inference_steps=4)
    )
    pipeline = DDPMPipeline(unet=net, scheduler=DDIMScheduler.from_config(training.config))
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in (3, 4)]
    theirs = pipeline(batch_size=2, generator=generators, num_inference_steps=4, output_type="np").images
    torch.testing.assert_close(
        ((ours + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1), torch.from_numpy(theirs), atol=1e-5, rtol=0
    )
