"""The `diffusion-lab` commands end to end, as a user runs them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from tests.conftest import DDPM_LINEAR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "diffusion_lab.cli", *args]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def test_train_writes_grids_metrics_checkpoints_config_and_pipeline(trained_run):
    run_dir, stdout = trained_run
    assert (run_dir / "samples" / "step_0000003.png").exists()
    final = Image.open(run_dir / "samples" / "final.png")
    assert final.width >= 2 * 16
    metrics = (run_dir / "metrics.csv").read_text().splitlines()
    assert "train/loss" in metrics[0] and "val/loss" in metrics[0] and len(metrics) > 3
    assert (run_dir / "checkpoints" / "last.ckpt").exists() and (
        run_dir / "checkpoints" / "step_0000006.ckpt"
    ).exists()
    assert "max_steps: 6" in (run_dir / "config.yaml").read_text()
    for line in ("final sample grid", "diffusers pipeline", "last checkpoint", "metrics"):
        assert line in stdout


def test_exported_pipeline_loads_with_from_pretrained_and_samples(trained_run):
    run_dir, _ = trained_run
    pipeline = DiffusionPipeline.from_pretrained(run_dir / "pipeline")
    assert type(pipeline).__name__ == "DDPMPipeline"
    images = pipeline(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0)).images
    assert len(images) == 2 and images[0].size == (16, 16)


def test_export_command_writes_the_ema_weights(trained_run, tmp_path):
    run_dir, _ = trained_run
    checkpoint_path = run_dir / "checkpoints" / "last.ckpt"
    result = cli("export", f"ckpt_path={checkpoint_path}", f"out_dir={tmp_path / 'exported'}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["used_ema"] is True and report["global_step"] == 6 and report["family"] == "pixel"
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "exported")
    checkpoint = torch.load(checkpoint_path, weights_only=False)
    shadow = checkpoint["callbacks"]["EMA"]["shadow_params"]
    for parameter, averaged in zip(pipeline.unet.parameters(), shadow, strict=True):
        torch.testing.assert_close(parameter, averaged)
    raw = checkpoint["state_dict"]["net.conv_in.weight"]
    assert not torch.equal(pipeline.unet.conv_in.weight, raw)


def test_unknown_key_names_the_valid_ones():
    result = cli("train", "model.lrr=1", check=False)
    assert result.returncode != 0
    assert "unknown config key 'model.lrr'" in result.stderr
    assert "Did you mean 'model.lr'?" in result.stderr and "noise_seed" in result.stderr


def test_unknown_group_option_lists_the_options():
    result = cli("train", "model/net=unet_huge", check=False)
    assert result.returncode != 0 and "unet_small" in result.stderr and "unet_tiny" in result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.image_size=18", "not divisible by 4"),
        ("model.net.attention_levels=[true]", "attention_levels has 1"),
    ],
)
def test_bad_shapes_fail_before_training(override, message, tmp_path):
    result = cli("train", override, f"hydra.run.dir={tmp_path}", check=False)
    assert result.returncode != 0
    assert message in result.stderr + result.stdout
    assert "Epoch" not in result.stderr


def test_bench_train_prints_one_json_line_with_both_sides():
    result = cli(
        "bench",
        "train",
        *DDPM_LINEAR,  # the plain side is the diffusers DDPM tutorial's loop (add_noise, epsilon)
        "model/net=unet_tiny",
        "data.image_size=8",
        "batch_size=4",
        "warmup_steps=1",
        "steps=2",
        "repeats=1",
        "trainer.accelerator=cpu",
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["project_img_s"] > 0 and report["plain_img_s"] > 0
    assert report["ratio"] == pytest.approx(
        report["project_img_s"] / report["plain_img_s"], rel=0.01, abs=1e-3
    )
    assert report["train_gflop_per_image"] > 0


def test_bench_latent_cache_prints_cached_and_uncached_speeds(tmp_path):
    result = cli("bench", "latent_cache", f"cache_dir={tmp_path}", "batch_size=2", "warmup_steps=1", "steps=1",
                 "repeats=1")  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["uncached_img_s"] > 0 and report["cached_img_s"] > 0 and report["cache_build_img_s"] > 0
    assert report["cached_vs_uncached"] == pytest.approx(
        report["cached_img_s"] / report["uncached_img_s"], rel=0.01
    )


def test_bench_sampling_counts_network_evaluations_per_sampler():
    result = cli("bench", "sampling", *DDPM_LINEAR, "model/net=unet_tiny", "data.image_size=8",
                 "batch_size=2", "samplers.ddpm_1000.num_inference_steps=30")  # fmt: skip
    report = json.loads(result.stdout.strip().splitlines()[-1])
    nfe = {name: entry["nfe_per_image"] for name, entry in report["samplers"].items()}
    assert nfe == {"ddpm_1000": 30, "ddim_50": 50, "dpmpp_20": 20, "unipc_10": 10}
    assert all(entry["img_s"] > 0 for entry in report["samplers"].values())


def test_bench_without_a_case_lists_the_cases():
    result = cli("bench", check=False)
    assert result.returncode != 0 and "valid cases: train" in result.stderr


def test_sd_finetune_tiny_builds_its_checkpoint_trains_from_the_cache_and_exports(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    result = cli(
        "train", "experiment=sd_finetune_tiny", "trainer.max_steps=4", "val_every_n_steps=2",
        "trainer.limit_val_batches=2", "callbacks.prompt_grid.every_n_steps=2",
        "callbacks.prompt_grid.num_inference_steps=2", "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.progress_bar.refresh_rate=0", f"paths.cache_dir={cache}", f"hydra.run.dir={run_dir}",
        "callbacks.sample_quality.num_samples=4", "callbacks.sample_quality.num_inference_steps=2",
        "callbacks.sample_quality.every_n_steps=0",
    )  # fmt: skip
    assert (cache / "tiny-sd-32" / "model_index.json").exists()
    assert "Sample quality at step 4: FID" in result.stdout and "CLIP score" in result.stdout
    assert len(list((cache / "latents").glob("*/train/meta.json"))) == 1
    assert "latent cache" in result.stdout and "diffusers pipeline" in result.stdout
    assert sorted(p.name for p in (run_dir / "samples").glob("*.png")) == [
        "final.png", "step_0000002.png", "step_0000004.png",
    ]  # fmt: skip
    pipeline = DiffusionPipeline.from_pretrained(run_dir / "pipeline")
    images = pipeline("a handwritten digit 3", negative_prompt="a handwritten digit 8", num_inference_steps=2,
                      output_type="np").images  # fmt: skip
    assert images.shape == (1, 32, 32, 3)
    exported = json.loads(
        cli("export", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", f"out_dir={tmp_path / 'out'}")
        .stdout.strip()
        .splitlines()[-1]
    )
    assert exported["used_ema"] and exported["global_step"] == 4 and exported["family"] == "sd"
    from_checkpoint = DiffusionPipeline.from_pretrained(tmp_path / "out")
    exported_unet = from_checkpoint.unet.state_dict()  # the same EMA UNet the run exported
    assert all(torch.equal(exported_unet[k], v) for k, v in pipeline.unet.state_dict().items())
