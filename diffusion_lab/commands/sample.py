"""`diffusion-lab sample ckpt_path=FILE|pretrained=DIR_OR_HUB_ID out_dir=DIR`: images, a grid and the settings that made them."""

import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.commands.devices import resolve_device, resolve_dtype
from diffusion_lab.commands.inputs import require_positive
from diffusion_lab.core.schedulers import check_scheduler_name
from diffusion_lab.families import load_sampler
from diffusion_lab.generation import SampleSettings
from diffusion_lab.generation.run import plan_images, read_prompts, write_sample_run

# Keys of conf/sample.yaml a settings.json replays (not where to write, not the file itself).
REPLAYED = [
    "ckpt_path", "pretrained", "use_ema", "revision", "lora", "num_images", "batch_size", "seed", "scheduler",
    "num_inference_steps", "eta",
    "guidance_scale", "guidance_rescale", "prompt", "prompt_file", "negative_prompt", "class_label", "height", "width", "device",
    "dtype", "max_sequence_length",
]  # fmt: skip


def replay_settings(cfg: DictConfig, command_line: list[str]) -> DictConfig:
    """The earlier run's settings under this command line's own keys (which still win)."""
    recorded = json.loads(Path(cfg.settings).expanduser().read_text())["settings"]
    given = OmegaConf.from_dotlist(
        [item for item in command_line if not item.startswith(("settings=", "out_dir="))]
    )
    return OmegaConf.merge(cfg, {key: recorded[key] for key in REPLAYED if key in recorded}, given)


def sample(cfg: DictConfig) -> dict:
    if cfg.settings:
        cfg = replay_settings(cfg, list(HydraConfig.get().overrides.task))
    check_scheduler_name(cfg.scheduler)  # before any model is loaded
    require_positive(cfg, "num_images", "num_inference_steps", "batch_size")
    sampler, loaded = load_sampler(cfg.ckpt_path, cfg.pretrained, cfg.use_ema, cfg.revision, cfg.lora)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, sampler.kind, device)
    sampler.to(device, dtype)
    prompts = read_prompts(list(cfg.prompt) if OmegaConf.is_list(cfg.prompt) else cfg.prompt, cfg.prompt_file)
    class_label = list(cfg.class_label) if OmegaConf.is_list(cfg.class_label) else cfg.class_label
    plan = plan_images(sampler, cfg.num_images, cfg.seed, prompts, class_label)
    settings = SampleSettings(
        scheduler=cfg.scheduler, num_inference_steps=cfg.num_inference_steps, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
        guidance_rescale=cfg.guidance_rescale,
        negative_prompt=cfg.negative_prompt, height=cfg.height, width=cfg.width,
        max_sequence_length=cfg.get("max_sequence_length"),
    )  # fmt: skip
    given = OmegaConf.to_container(cfg, resolve=True)
    # The prompts themselves, not the name of a file that may change.
    record = {**{key: given[key] for key in REPLAYED}, "prompt": prompts or None, "prompt_file": None}
    loaded = {**loaded, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    result = write_sample_run(sampler, plan, settings, cfg.out_dir, cfg.batch_size, record, loaded)
    print(json.dumps(result))
    return result
