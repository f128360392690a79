"""One name per concept: every old name is refused with exit 2 and one line naming the new one, on the command
line and in a config file, before anything is built or written."""

import pytest

from diffusion_lab.cli import main
from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.config_checks import check_run_config


def refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    return captured.out + captured.err


@pytest.mark.parametrize(
    ("command", "old", "new"),
    [
        ("train", "model.prediction_type=v_prediction", "model.noise_scheduler.prediction_type"),
        ("train", "model.objective.zero_terminal_snr=true", "model.noise_scheduler.rescale_betas_zero_snr"),
        ("train", "trainer.val_check_interval=10", "val_every_n_steps"),
        ("train", "callbacks.sample_grid.dirpath=/tmp/x", "callbacks.sample_grid.out_dir"),
        ("train", "callbacks.model_checkpoint.dirpath=/tmp/x", "callbacks.model_checkpoint.out_dir"),
        ("train", "model=ddpm", "model=pixel"),
        ("train", "experiment=flow_digits", "experiment=ddpm_digits is the former DDPM default"),
        ("train", "model=latent_diffusion", "model=latent"),
        ("sample", "steps=10", "num_inference_steps"),
        ("sample", "out=/tmp/x", "out_dir"),
        ("eval", "sampling.steps=10", "sampling.num_inference_steps"),
        ("export", "ckpt=/tmp/x.ckpt", "ckpt_path"),
        ("export", "out=/tmp/x", "out_dir"),
        ("ema", "out=/tmp/x", "out_dir"),
        ("tiny-sd", "out=/tmp/x", "out_dir"),
    ],
)
def test_an_old_name_on_the_command_line_is_refused_naming_the_new_one(capsys, tmp_path, command, old, new):
    output = refused(capsys, command, old, f"hydra.run.dir={tmp_path / 'run'}")
    assert new in output and len(output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_an_old_name_in_a_config_file_is_refused_too(compose_config):
    cfg = compose_config(
        "debug=fast", "++trainer.val_check_interval=3"
    )  # as a user's own experiment file could
    with pytest.raises(ConfigError, match="'trainer.val_check_interval' is now 'val_every_n_steps"):
        check_run_config(cfg)


def test_a_pretrained_checkpoint_file_is_refused_naming_ckpt_path(capsys, tmp_path):
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"not read")
    output = refused(capsys, "sample", f"pretrained={checkpoint}", f"out_dir={tmp_path / 'out'}")
    assert f"ckpt_path={checkpoint}" in output
    assert not (tmp_path / "out").exists()


def test_flow_matching_refuses_the_ddpm_fields_it_would_ignore(capsys, tmp_path):
    output = refused(
        capsys,
        "train",
        "model/noise_scheduler=ddpm_linear",
        "model/objective=flow_matching",
        f"hydra.run.dir={tmp_path}",
    )
    assert "model/objective=flow_matching does not use" in output and "prediction_type" in output
    assert "model/noise_scheduler=flow_match" in output


def test_flow_matching_on_a_latent_model_refuses_a_changed_prediction_type(compose_config):
    cfg = compose_config(
        "model=latent", "model/objective=flow_matching", "model.noise_scheduler.prediction_type=epsilon"
    )
    with pytest.raises(ConfigError, match="does not use model.noise_scheduler's prediction_type"):
        check_run_config(cfg)


def test_the_flow_default_and_preset_compose_and_pass_the_checks(compose_config):
    check_run_config(compose_config())  # flow matching on the digits (experiment=flow_digits before issue 22)
    check_run_config(compose_config("+objective_preset=flow_logit_normal"))


def test_a_prediction_type_preset_reaches_a_latent_models_scheduler(compose_config, tiny_sd):
    # It died with a TypeError when latent models kept their own `model.prediction_type`.
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = compose_config("experiment=sd_finetune_tiny", "+objective_preset=ddpm_v")
    check_run_config(cfg)
    with open_dict(cfg):
        cfg.model.pretrained = str(tiny_sd)
    model = instantiate(cfg.model)
    assert model.noise_scheduler.config.prediction_type == "v_prediction"
    assert model.objective.prediction_type == "v_prediction"


def test_a_latent_model_built_in_python_refuses_ddpm_fields_under_flow_matching(tiny_sd):
    import functools

    import torch

    from diffusion_lab.core import FlowMatching
    from diffusion_lab.models import LatentDiffusion

    with pytest.raises(ConfigError, match="does not use model.noise_scheduler's prediction_type"):
        LatentDiffusion(
            str(tiny_sd), optimizer=functools.partial(torch.optim.AdamW), lr=1e-4,
            objective=functools.partial(FlowMatching), noise_scheduler={"prediction_type": "v_prediction"},
        )  # fmt: skip
