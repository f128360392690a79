"""The defaults issue 22 chose: flow matching for every pixel run, the study's values, and the seed recipes
left exactly as they were."""

from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from diffusion_lab.core import FlowMatching
from diffusion_lab.families import load_checkpoint
from diffusion_lab.generation import SampleSettings
from diffusion_lab.runs.overrides import CONFIG_MODULE
from diffusion_lab.runs.resolvers import attention_at_lowest, register_resolvers, unet_widths

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "seed_recipes"
RECORDED = ["model", "data", "trainer", "callbacks", "seed", "val_every_n_steps"]


def test_the_default_run_trains_flow_matching_and_its_grid_and_export_sample_the_flow_way(trained_run):
    """The grid draws with the flow default (UniPC on flow sigmas, experiments/sampler_table); the export carries
    the flow-match Euler scheduler that stock DDPMPipeline samples with, and `sample` on it draws UniPC again."""
    run_dir, _ = trained_run
    family, parts, details = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert details["used_ema"]
    grid_scheduler = family.sampler(parts).scheduler(SampleSettings())  # what the sample grid draws with
    assert (
        type(grid_scheduler).__name__ == "UniPCMultistepScheduler" and grid_scheduler.config.use_flow_sigmas
    )
    exported = yaml.safe_load((run_dir / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert exported["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert "FlowMatching" in (run_dir / "config.yaml").read_text()


@pytest.mark.parametrize("data", [["data=digits"], ["data=imagefolder", "data.path=unused"]])
def test_every_pixel_data_trains_flow_matching_by_default(compose_config, data):
    cfg = compose_config(*data, "model/net=unet_tiny")
    model = instantiate(cfg.model)
    assert isinstance(model.objective, FlowMatching)
    assert type(model.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("recipe", ["ddpm_flowers_128", "ddpm_butterflies_128"])
def test_the_seed_recipes_are_what_they_were_before_the_default_changed(recipe):
    """Every model, data, trainer and callback value as composed before issue 22 (the fixture), and the same
    seed gives the same weights."""
    recorded = OmegaConf.load(FIXTURES / f"{recipe}.yaml")
    GlobalHydra.instance().clear()
    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        cfg = compose(
            "train", overrides=[f"experiment={recipe}", "paths.output_dir=/RUN", "paths.cache_dir=/CACHE"]
        )
    GlobalHydra.instance().clear()
    now = OmegaConf.to_container(cfg, resolve=True)
    assert _without_new_unset_keys({key: now[key] for key in RECORDED}, OmegaConf.to_container(recorded)) == (
        OmegaConf.to_container(recorded)
    )
    nets = []
    for model_config in (recorded.model, cfg.model):
        torch.manual_seed(0)
        model_config = OmegaConf.merge(model_config, {"net": {"block_out_channels": [8, 16], "layers_per_block": 1,
                                                              "attention_levels": [False, True], "norm_num_groups": 4,
                                                              "attention_head_dim": 4, "sample_size": 8}})  # fmt: skip
        nets.append(instantiate(model_config).net.state_dict())
    assert all(torch.equal(nets[0][name], nets[1][name]) for name in nets[0])
    assert "DDPM" in now["model"]["objective"]["_target_"]


def _without_new_unset_keys(now, before):
    """`now` less the keys added since `before` whose value is None (an option that is off: e.g.
    callbacks.ema.sigma_rel), so that only a changed or a switched-on value differs."""
    if not isinstance(now, dict) or not isinstance(before, dict):
        return now
    return {key: _without_new_unset_keys(value, before.get(key)) for key, value in now.items()
            if key in before or value is not None}  # fmt: skip


def test_the_defaults_are_the_values_the_study_chose(compose_config):
    """experiments/pixel_defaults/chosen.yaml is the study's best trial; the default config composes to it."""
    register_resolvers()
    chosen = yaml.safe_load((ROOT / "experiments" / "pixel_defaults" / "chosen.yaml").read_text())
    cfg = compose_config()
    shape = {"width": 32, "channel_mult": [1, 2, 2], "attention_lowest": 1}
    for key, value in chosen["params"].items():
        if key.startswith("study."):
            shape[key.removeprefix("study.")] = value
        else:
            assert OmegaConf.select(cfg, key) == pytest.approx(value, rel=0.05), key
    net = cfg.model.net
    assert list(net.block_out_channels) == unet_widths(shape["width"], shape["channel_mult"])
    assert list(net.attention_levels) == attention_at_lowest(shape["attention_lowest"], shape["channel_mult"])
    assert cfg.callbacks.ema.sigma_rel == chosen["ema_sigma_rel"]


def test_the_study_config_composes_a_net_from_its_scalar_shape(compose_config):
    register_resolvers()
    cfg = compose_config("hparams_search=pixel_defaults", "study.width=48", "study.attention_lowest=2")
    assert list(cfg.model.net.block_out_channels) == [48, 96, 96]
    assert list(cfg.model.net.attention_levels) == [False, True, True]
    with pytest.raises(ValueError, match="choose 0 to 3"):
        attention_at_lowest(4, [1, 2, 2])
