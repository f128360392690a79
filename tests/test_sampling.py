"""Sampling trained models: every scheduler by name, seeds, guidance, prompts, the `sample` command."""

import json

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from PIL import Image

from diffusion_lab.core.schedulers import SCHEDULERS, scheduler_from_name
from diffusion_lab.families import ModelParts, family_named, load_sampler
from diffusion_lab.families.export import write_pipeline
from diffusion_lab.generation import PixelSampler, SampleSettings, TextToImageSampler
from diffusion_lab.generation.run import plan_images, read_prompts
from tests.conftest import DDPM_LINEAR
from tests.test_commands import cli


def _unet(num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_class_embeds,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pixel_pipeline(tmp_path_factory):
    net, scheduler = _unet(), DDPMScheduler()
    return write_pipeline(
        tmp_path_factory.mktemp("pixel") / "pipeline",
        [net],
        lambda folder: family_named("pixel").save_pipeline(ModelParts(net, scheduler), folder),
    )


@pytest.fixture(scope="module")
def text_sampler(tiny_sd):
    sampler, _ = load_sampler(pretrained=str(tiny_sd))
    return sampler


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_every_scheduler_name_samples_the_same_images_from_the_same_seed(pixel_pipeline, name):
    sampler, details = load_sampler(pretrained=str(pixel_pipeline))
    assert isinstance(sampler, PixelSampler) and details["pipeline_class"] == "DDPMPipeline"
    settings = SampleSettings(scheduler=name, num_inference_steps=4)
    images = sampler.generate([0, 1, 2], settings)
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
    assert torch.equal(images, sampler.generate([0, 1, 2], settings))
    assert not torch.allclose(images[0], images[1])
    # An image depends on its seed, not on its batch.
    torch.testing.assert_close(sampler.generate([2], settings)[0], images[2], atol=1e-4, rtol=0)


def test_scheduler_names_build_the_variants_they_name():
    config = DDPMScheduler().config
    assert scheduler_from_name("dpm++-sde", config).config.algorithm_type == "sde-dpmsolver++"
    assert scheduler_from_name("dpm++", config).config.algorithm_type == "dpmsolver++"
    assert type(scheduler_from_name("euler-a", config)).__name__ == "EulerAncestralDiscreteScheduler"
    with pytest.raises(ValueError, match="valid names: ddpm, ddim, pndm, dpm\\+\\+, dpm\\+\\+-sde"):
        scheduler_from_name("dpm3", config)


def test_ddim_eta_adds_noise_and_zero_is_deterministic(pixel_pipeline):
    sampler, _ = load_sampler(pretrained=str(pixel_pipeline))
    plain = sampler.generate([0], SampleSettings(scheduler="ddim", num_inference_steps=4, eta=0.0))
    noisy = sampler.generate([0], SampleSettings(scheduler="ddim", num_inference_steps=4, eta=1.0))
    assert not torch.allclose(plain, noisy)


def test_class_conditional_models_cycle_labels_and_labels_change_images():
    sampler = PixelSampler(_unet(num_class_embeds=3), DDPMScheduler())
    plan = plan_images(sampler, 5, seed=10, class_label=None)
    assert plan.class_labels == [0, 1, 2, 0, 1] and plan.seeds == [10, 11, 12, 13, 14]
    assert plan_images(sampler, 3, 0, class_label=[2, 1]).class_labels == [2, 1, 2]
    settings = SampleSettings(scheduler="ddim", num_inference_steps=3)
    with torch.no_grad():
        sampler.net.class_embedding.weight.normal_(0, 3)  # a random init barely depends on the label
    as_zero = sampler.generate([0], settings, class_labels=[0])
    as_two = sampler.generate([0], settings, class_labels=[2])
    assert not torch.allclose(as_zero, as_two)
    with pytest.raises(ValueError, match="class_label must lie in 0..2"):
        plan_images(sampler, 2, 0, class_label=5)
    with pytest.raises(ValueError, match="not class-conditional"):
        plan_images(PixelSampler(_unet(), DDPMScheduler()), 2, 0, class_label=1)


def test_guidance_and_negative_prompt_change_a_text_models_images(text_sampler):
    assert isinstance(text_sampler, TextToImageSampler)
    prompts = ["a handwritten digit 7"]
    base = SampleSettings(scheduler="ddim", num_inference_steps=3, guidance_scale=7.5)
    images = text_sampler.generate([0], base, prompts=prompts)
    assert images.shape == (1, 3, 32, 32)
    assert torch.equal(images, text_sampler.generate([0], base, prompts=prompts))
    stronger = text_sampler.generate(
        [0], SampleSettings(scheduler="ddim", num_inference_steps=3, guidance_scale=1.0), prompts=prompts
    )
    negative = text_sampler.generate(
        [0],
        SampleSettings(scheduler="ddim", num_inference_steps=3, guidance_scale=7.5, negative_prompt="blue"),
        prompts=prompts,
    )
    assert (images - stronger).abs().max() > 1e-3
    assert (images - negative).abs().max() > 1e-3
    taller = text_sampler.generate(
        [0], SampleSettings(scheduler="euler", num_inference_steps=2, height=48), prompts=prompts
    )
    assert taller.shape == (1, 3, 48, 32)


def test_text_models_need_prompts_and_get_num_images_per_prompt(text_sampler, tmp_path):
    with pytest.raises(ValueError, match="needs prompts"):
        plan_images(text_sampler, 2, 0)
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red flower\n\n  a photo of a digit  \n")
    prompts = read_prompts("a blue flower", str(prompt_file))
    assert prompts == ["a blue flower", "a red flower", "a photo of a digit"]
    plan = plan_images(text_sampler, 2, 5, prompts)
    assert plan.prompts == ["a blue flower"] * 2 + ["a red flower"] * 2 + ["a photo of a digit"] * 2
    assert plan.seeds == [5, 6, 7, 8, 9, 10] and plan.columns == 2


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    """A tiny DDPM run (`debug=fast`; the session's default run is flow matching, which the DDPM samplers
    below do not fit), sampled from its checkpoint by the command line."""
    run_dir = tmp_path_factory.mktemp("ddpm_run")
    cli("train", "debug=fast", *DDPM_LINEAR, f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={run_dir / 'cache'}")  # fmt: skip
    out = run_dir / "sampled"
    result = cli(
        "sample", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"out_dir={out}", "num_images=5",
        "batch_size=2", "num_inference_steps=4", "scheduler=euler-a", "seed=3",
    )  # fmt: skip
    return run_dir, out, result


def test_sample_command_writes_each_png_a_grid_and_the_settings(sampled_run):
    run_dir, out, result = sampled_run
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["images"] == 5 and report["grid"] == str(out / "grid.png") and report["out_dir"] == str(out)
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{k:05d}.png" for k in range(5)]
    assert Image.open(out / "00000.png").size == (16, 16)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["settings"]["scheduler"] == "euler-a" and settings["settings"]["num_inference_steps"] == 4
    assert [image["seed"] for image in settings["images"]] == [3, 4, 5, 6, 7]
    assert settings["model"]["used_ema"] is True and settings["model"]["kind"] == "pixel"
    assert settings["scheduler"]["class"] == "EulerAncestralDiscreteScheduler"


def test_settings_json_reproduces_the_images(sampled_run):
    _, out, _ = sampled_run
    again = out.parent / "again"
    cli("sample", f"settings={out / 'settings.json'}", f"out_dir={again}")
    for k in range(5):
        assert (again / f"{k:05d}.png").read_bytes() == (out / f"{k:05d}.png").read_bytes()


def test_replayed_settings_yield_to_the_command_line(sampled_run):
    from hydra import compose, initialize_config_module

    from diffusion_lab.commands.sample import replay_settings
    from diffusion_lab.runs.overrides import CONFIG_MODULE

    _, out, _ = sampled_run
    command_line = [f"settings={out / 'settings.json'}", "out_dir=elsewhere", "seed=4"]
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = replay_settings(compose("sample", overrides=command_line), command_line)
    assert cfg.seed == 4 and cfg.out_dir == "elsewhere"  # given now
    assert cfg.scheduler == "euler-a" and cfg.num_inference_steps == 4 and cfg.num_images == 5  # replayed
    assert cfg.ckpt_path.endswith("last.ckpt")


def test_checkpoint_and_exported_pipeline_sample_the_same_images(sampled_run):
    run_dir, _, _ = sampled_run
    from_checkpoint, _ = load_sampler(ckpt_path=str(run_dir / "checkpoints" / "last.ckpt"))
    from_pipeline, _ = load_sampler(pretrained=str(run_dir / "pipeline"))
    for name in ("dpm++-sde", "unipc"):
        settings = SampleSettings(scheduler=name, num_inference_steps=4)
        assert torch.equal(
            from_checkpoint.generate([0, 1], settings), from_pipeline.generate([0, 1], settings)
        )


def test_a_wrong_scheduler_name_lists_the_valid_ones(sampled_run, tmp_path):
    run_dir, _, _ = sampled_run
    result = cli(
        "sample", f"pretrained={run_dir / 'pipeline'}", f"out_dir={tmp_path}", "scheduler=dpm3", check=False
    )
    assert result.returncode != 0
    assert "unknown scheduler 'dpm3'; valid names: ddpm, ddim, pndm, dpm++, dpm++-sde" in result.stderr
    assert "unknown config key" not in result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_a_misspelt_sample_key_is_named_and_the_mandatory_keys_are_not(tmp_path):
    result = cli(
        "sample", "pretrained=somewhere", f"out_dir={tmp_path}", "num_inference_stepz=3", check=False
    )
    assert "unknown config key 'num_inference_stepz'" in result.stderr
    assert "Did you mean 'num_inference_steps'?" in result.stderr
    assert "unknown config key 'pretrained'" not in result.stderr and "'out_dir'" not in result.stderr
    assert not list(tmp_path.glob("*.png"))


def test_sample_command_answers_prompts_from_a_pipeline_folder(tiny_sd, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a handwritten digit 1\na photo of a flower\n")
    out = tmp_path / "text"
    cli(
        "sample", f"pretrained={tiny_sd}", f"out_dir={out}", "num_images=2", f"prompt_file={prompt_file}",
        "negative_prompt=blurry", "guidance_scale=4", "num_inference_steps=2", "height=48",
    )  # fmt: skip
    settings = json.loads((out / "settings.json").read_text())
    assert [image["prompt"] for image in settings["images"]] == ["a handwritten digit 1"] * 2 + [
        "a photo of a flower"
    ] * 2
    assert settings["settings"]["prompt"] == ["a handwritten digit 1", "a photo of a flower"]
    assert Image.open(out / "00003.png").size == (32, 48)
    grid = Image.open(out / "grid.png")  # a row per prompt, a column per image, 1 px gaps, upscaled 2x
    assert grid.size == (2 * (2 * 33 + 1), 2 * (2 * 49 + 1))
