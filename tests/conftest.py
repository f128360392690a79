"""Shared fixtures: offline environment and composing the real configs with tiny overrides."""

import os
import tempfile

for variable, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline"}.items():
    os.environ.setdefault(variable, value)
# Caches that classes build without a configured folder (pixel caches) go to a throwaway place, not ~/.cache.
os.environ["DIFFUSION_LAB_CACHE"] = tempfile.mkdtemp(prefix="diffusion_lab_test_cache_")

import pytest  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from diffusion_lab.runs.overrides import CONFIG_MODULE  # noqa: E402

# The cores shared among pytest-xdist workers (and the runs they start): more threads than cores, and small ops
# spin on each other (a test took 6x longer with two workers of two threads on two cores).
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
THREADS = max(1, min(2, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)

# A run that exercises every stage in seconds: tiny UNet, 8 px digits, a handful of steps.
TINY = [
    "model/net=unet_tiny",
    "data.image_size=8",
    "data.batch_size=8",
    "trainer.accelerator=cpu",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.enable_model_summary=false",
    "callbacks.sample_grid.num_images=4",
    "callbacks.sample_grid.num_inference_steps=2",
    "model.lr_scheduler.num_warmup_steps=2",
]
# The pixel DDPM, the default before flow matching (issue 22): linear betas, epsilon, uniform timesteps.
# Tests of DDPM itself (prediction types, zero terminal SNR, DDIM) name it instead of relying on the default.
DDPM_LINEAR = [
    "model/noise_scheduler=ddpm_linear",
    "model/objective=ddpm",
    "model/objective/timesteps=uniform",
]


@pytest.fixture
def compose_config(tmp_path):
    """compose_config(*overrides, config_name="train") -> the composed config, output dir in tmp_path."""

    def _compose(*overrides: str, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
            defaults = [f"paths.output_dir={tmp_path}"]
            if config_name == "train":  # never the user's ~/.cache
                defaults.append(f"paths.cache_dir={tmp_path / 'cache'}")
            return compose(config_name, overrides=[*defaults, *overrides])

    yield _compose
    GlobalHydra.instance().clear()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """`diffusion-lab train debug=fast` once per session: (run folder, its stdout)."""
    from tests.test_commands import cli

    run_dir = tmp_path_factory.mktemp("run")
    result = cli("train", "debug=fast", f"hydra.run.dir={run_dir}", f"paths.cache_dir={run_dir / 'cache'}")
    return run_dir, result.stdout


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """A tiny random Stable Diffusion folder (32 px images, 16 px latents), built once per test session."""
    from diffusion_lab.families.tiny import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny_sd")


def bare_trainer(max_steps: int, **kwargs):
    """A CPU Trainer with nothing but the training loop (no logger, checkpoints, validation or bars)."""
    import lightning as L

    settings = dict(
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        limit_val_batches=0,
    )
    return L.Trainer(**{**settings, **kwargs})


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """Random weights in torch-fidelity's InceptionV3 format: the real FID network's code path, offline.
    He-initialised (as RandomConvFeatures): with PyTorch's default init the signal fades through the ~50
    layers, every image gets the same features and every FID is 0."""
    from unittest import mock

    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with (
        mock.patch("torch_fidelity.feature_extractor_inceptionv3.load_state_dict_from_url", return_value={}),
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict"),
        torch.random.fork_rng(devices=[]),
    ):
        torch.manual_seed(0)
        network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        for module in network.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(network.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    """A tiny random SDXL folder (two text encoders, text_time UNet; 32 px images), built once per session."""
    from diffusion_lab.families.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "tiny_sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    """A tiny random SD3 folder (MMDiT, CLIP-L + CLIP-G + T5, 16-channel VAE; 32 px images)."""
    from diffusion_lab.families.tiny import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.mktemp("sd3") / "tiny_sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    """A tiny random Flux.1-dev folder (guidance embedding, CLIP-L + T5, dynamic shift; 32 px images)."""
    from diffusion_lab.families.tiny import build_tiny_flux

    return build_tiny_flux(tmp_path_factory.mktemp("flux") / "tiny_flux")


@pytest.fixture(scope="session")
def tiny_z_image(tmp_path_factory):
    """A tiny random Z-Image folder (single-stream DiT, Qwen3 text encoder with a chat template; 32 px images)."""
    from diffusion_lab.families.tiny import build_tiny_z_image

    return build_tiny_z_image(tmp_path_factory.mktemp("z_image") / "tiny_z_image")
