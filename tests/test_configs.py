"""Every config composes; every experiment builds its model."""

import math
from importlib.resources import files

import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.runs.overrides import CONFIG_MODULE
from tests.conftest import DDPM_LINEAR

CONFIG_ROOT = files(CONFIG_MODULE)

EXPERIMENTS = sorted(
    p.name.removesuffix(".yaml")
    for p in CONFIG_ROOT.joinpath("experiment").iterdir()
    if p.name.endswith(".yaml")
)
NETS = sorted(
    p.name.removesuffix(".yaml")
    for p in CONFIG_ROOT.joinpath("model", "net").iterdir()
    if p.name.endswith(".yaml")
)


def test_experiments_are_found():
    assert {"ddpm_flowers_128", "ddpm_butterflies_128"} <= set(EXPERIMENTS)


# A hub id's family -> the tiny stand-in of that family (nothing is downloaded in tests).
TINY_OF_HUB_ID = {"FLUX": "tiny_flux", "stable-diffusion-3": "tiny_sd3", "Z-Image": "tiny_z_image"}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_and_builds_its_model(compose_config, experiment, request):
    subject = []  # a DreamBooth recipe asks for the user's pictures and prompts
    if "dreambooth" in experiment and not experiment.endswith("_tiny"):
        subject = [f"data.instance_dir={request.getfixturevalue('tmp_path')}", "data.instance_prompt=a photo of sks dog",
                   "data.class_prompt=a photo of a dog"]  # fmt: skip
    cfg = compose_config(f"experiment={experiment}", *subject)
    assert cfg.run_name == experiment and cfg.trainer.max_steps > 0
    if cfg.model._target_.endswith("LatentDiffusion"):
        if isinstance(cfg.model.pretrained, str):
            tiny = next((v for k, v in TINY_OF_HUB_ID.items() if k in cfg.model.pretrained), "tiny_sd")
            overrides = [f"model.pretrained={request.getfixturevalue(tiny)}"]
            if (
                cfg.model.get("quantize") == "nf4" and not torch.cuda.is_available()
            ):  # bitsandbytes needs CUDA
                overrides.append("model.quantize=null")
            cfg = compose_config(f"experiment={experiment}", *subject, *overrides)
        model = instantiate(cfg.model)
        assert model.net.training and not model.vae.training
    elif cfg.model._target_.endswith("LatentDiT"):  # the net's side is the VAE's latents'
        model = instantiate(cfg.model)
        size = cfg.data.image_size
        pixels = torch.zeros(1, cfg.data.channels, size, size)
        assert model.clean_inputs({"pixels": pixels}, [0]).shape[-1] == model.net.config.sample_size
    else:
        model = instantiate(cfg.model)
        assert model.net.config.sample_size == cfg.data.image_size


def test_sd_finetune_recipe_has_the_seed_settings(compose_config):
    cfg = compose_config("experiment=sd_finetune")
    assert cfg.model.pretrained == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert cfg.data.image_size == 512 and cfg.model.lr == 1e-5 and cfg.model.caption_dropout == 0.1
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.gradient_checkpointing
    assert "ema" in cfg.callbacks and cfg.latent_cache.encoder.pretrained == cfg.model.pretrained


def test_flowers_recipe_has_the_seed_hyperparameters(compose_config):
    cfg = compose_config("experiment=ddpm_flowers_128")
    assert list(cfg.model.net.block_out_channels) == [64, 128, 256, 512]
    assert cfg.model.lr == 2e-5 and cfg.data.batch_size == 16 and cfg.trainer.accumulate_grad_batches == 2
    assert cfg.callbacks.ema.decay == 0.995 and cfg.trainer.max_steps == 20000
    assert cfg.data.path == "nelorth/oxford-flowers" and cfg.model.noise_scheduler.num_train_timesteps == 1000


def test_flowers_recipe_trains_what_denoising_diffusion_pytorch_2_3_4_trains(compose_config):
    """Objective, schedule, loss weight, Adam betas and EMA cadence against the package itself."""
    import inspect

    from denoising_diffusion_pytorch import GaussianDiffusion, Trainer, Unet

    from diffusion_lab.core.noise_process import snr

    reference = GaussianDiffusion(Unet(dim=8, dim_mults=(1, 2)), image_size=8, timesteps=1000)
    defaults = {name: p.default for name, p in inspect.signature(Trainer).parameters.items()}
    cfg = compose_config("experiment=ddpm_flowers_128", "model/net=unet_tiny")
    model = instantiate(cfg.model)
    scheduler = model.noise_scheduler
    assert reference.objective == "pred_v" and scheduler.config.prediction_type == "v_prediction"
    torch.testing.assert_close(
        scheduler.alphas_cumprod, reference.alphas_cumprod.float(), rtol=1e-4, atol=1e-7
    )
    steps = torch.arange(1000)
    weights = model.objective.noise_levels(steps)
    assert torch.equal(weights.snr, snr(scheduler.alphas_cumprod, steps))
    weights = model.objective.weighting(weights)
    torch.testing.assert_close(weights, reference.loss_weight.float(), rtol=1e-3, atol=1e-6)
    optimizer = model.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    assert tuple(optimizer.param_groups[0]["betas"]) == defaults["adam_betas"]
    assert optimizer.param_groups[0]["weight_decay"] == 0.0  # its optimizer is Adam
    ema = instantiate(cfg.callbacks.ema)
    assert (ema.update_every, ema.hyperparameters["decay"]) == (
        defaults["ema_update_every"],
        defaults["ema_decay"],
    )
    assert cfg.trainer.gradient_clip_val == defaults["max_grad_norm"]


def test_butterflies_recipe_has_the_tutorial_unet(compose_config):
    cfg = compose_config("experiment=ddpm_butterflies_128")
    net = instantiate(cfg.model.net)
    assert list(net.config.block_out_channels) == [128, 128, 256, 256, 512, 512]
    assert (
        net.config.down_block_types[4] == "AttnDownBlock2D"
        and net.config.up_block_types[1] == "AttnUpBlock2D"
    )
    assert cfg.data.path == "huggan/smithsonian_butterflies_subset" and cfg.data.random_flip


def test_butterflies_recipe_trains_as_the_tutorial(compose_config):
    """The tutorial's DDPMScheduler(num_train_timesteps=1000) and torch.optim.AdamW(lr=1e-4) as they come."""
    from diffusers import DDPMScheduler

    cfg = compose_config("experiment=ddpm_butterflies_128", "model/net=unet_tiny")
    model = instantiate(cfg.model)
    tutorial = DDPMScheduler(num_train_timesteps=1000)
    for key in ("prediction_type", "beta_schedule", "beta_start", "beta_end", "clip_sample", "variance_type"):
        assert model.noise_scheduler.config[key] == tutorial.config[key], key
    optimizer = model.configure_optimizers()["optimizer"]
    reference = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters(), lr=1e-4).defaults
    assert {k: optimizer.defaults[k] for k in ("lr", "betas", "weight_decay", "eps")} == {
        k: reference[k] for k in ("lr", "betas", "weight_decay", "eps")
    }
    assert cfg.callbacks.ema is None  # no average (instantiate_each skips it)
    assert cfg.trainer.max_steps == 50 * math.ceil(1000 / 16)  # 50 epochs of 1,000 images at batch 16


@pytest.mark.parametrize("net", NETS)
def test_every_net_builds_at_its_smallest_valid_size(compose_config, net):
    cfg = compose_config(f"model/net={net}", "data.image_size=32")
    assert instantiate(cfg.model.net).config.sample_size == 32


@pytest.mark.parametrize(
    "overrides",
    [
        ["model/noise_scheduler=ddpm_cosine", "model/objective=ddpm"],
        ["model/lr_scheduler=constant"],
        ["trainer=cpu"],
        ["trainer=gpu"],
        ["debug=fast"],
        ["callbacks=none"],
        [
            *DDPM_LINEAR,
            "model.noise_scheduler.prediction_type=v_prediction",
            "model.noise_scheduler.rescale_betas_zero_snr=true",
        ],
    ],
)
def test_config_group_options_compose(compose_config, overrides):
    cfg = compose_config(*overrides)
    instantiate(cfg.model.noise_scheduler)


DATA = sorted(
    p.name.removesuffix(".yaml") for p in CONFIG_ROOT.joinpath("data").iterdir() if p.name.endswith(".yaml")
)


@pytest.mark.parametrize("data", DATA)
def test_every_data_config_composes_with_the_model_following_its_shape(compose_config, data):
    where = {
        "digits": [],
        "dreambooth": ["data.instance_dir=/some/pictures", "data.instance_prompt=a photo of sks dog"],
    }
    cfg = compose_config(f"data={data}", *where.get(data, ["data.path=/some/local/copy"]))
    assert cfg.data.image_size > 0 and cfg.model.net.in_channels == cfg.data.channels


def test_image_size_drives_the_net(compose_config):
    cfg = compose_config("data.image_size=32")
    assert instantiate(cfg.model.net).config.sample_size == 32


@pytest.mark.parametrize("trainer", ["default", "cpu", "gpu", "ddp", "ddp_cpu", "fsdp"])
def test_every_trainer_config_composes_with_every_precision(compose_config, trainer):
    for precision in ("32-true", "16-mixed", "bf16-mixed"):
        cfg = compose_config(f"trainer={trainer}", f"trainer.precision={precision}")
        assert cfg.trainer.precision == precision
    if trainer in ("ddp", "ddp_cpu", "fsdp"):
        strategy = instantiate(cfg.trainer.strategy)
        assert type(strategy).__name__ in ("HydraDDPStrategy", "HydraFSDPStrategy")


def test_the_slurm_launcher_composes_for_a_ddp_sweep():
    from hydra import compose, initialize_config_module

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose(
            "train", overrides=["hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4"],
            return_hydra_config=True,
        )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 1
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf

    assert set(launcher) <= {field.name for field in __import__("dataclasses").fields(SlurmQueueConf)}


def test_the_optuna_search_composes(compose_config):
    from hydra import compose, initialize_config_module

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=digits_optuna"], return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.optimized_metric == "val/loss"
    assert set(cfg.hydra.sweeper.params) == {"model.lr", "model.objective.noise_offset", "data.batch_size"}


@pytest.mark.parametrize(
    "preset,net,alignment",
    [("unet", "build_unet", None), ("sit_tiny", "build_dit", None), ("sit_s", "build_dit", None),
     ("sit_sra", "build_dit", "SelfRepresentationAlignment"), ("sit_repa", "build_dit", "RepresentationAlignment")],
)  # fmt: skip
def test_each_arm_of_the_transformers_study_composes_its_net_and_alignment(
    compose_config, preset, net, alignment
):
    cfg = compose_config("experiment=sit_flowers", f"backbone_preset={preset}")
    assert cfg.model.net._target_.endswith(net) and cfg.run_name == "sit_flowers"
    if alignment is None:
        assert cfg.model.alignment is None
    else:
        assert cfg.model.alignment._target_.endswith(alignment)
    if net == "build_dit":  # the study's sizes: SiT-tiny/2 and SiT-S/4
        assert (cfg.model.net.size, cfg.model.net.patch_size) == (
            ("S", 4) if preset == "sit_s" else ("tiny", 2)
        )
