"""Mistakes a researcher makes on the command line: each is one line naming the key, before anything heavy."""

import logging
import os
import stat

import pytest

from diffusion_lab.cli import main
from diffusion_lab.commands.resume import resolve_checkpoint
from diffusion_lab.errors import ConfigError
from tests import builders


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    return exit_.value.code, captured.out + captured.err


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps='abc': expected int (a parameter of lightning.Trainer)"),
        ("model.lr=abc", "model.lr='abc': expected float"),
        ("data.batch_size=0", "data.batch_size=0: must be above 0"),
        ("model.lr=-1e-3", "model.lr=-0.001: must be above 0"),
        (
            "model/noise_scheduler=ddpm_linear model/objective=ddpm "
            "model.noise_scheduler.rescale_betas_zero_snr=true",
            "zero terminal SNR needs a prediction that is defined at pure noise",
        ),
        ("guard.nonfinite=ignore", "guard.nonfinite='ignore'; valid: stop, skip"),
        (
            "model/objective=flow_matching model/noise_scheduler=flow_match model.objective.timesteps.std=0",
            "model.objective.timesteps.std must be positive, got 0",
        ),
    ],
)
def test_a_wrong_type_or_value_is_one_line_naming_the_key(capsys, tmp_path, override, message):
    code, output = run_cli(capsys, "train", *override.split(), f"hydra.run.dir={tmp_path}")
    assert code == 2 and message in output and "Traceback" not in output


def test_a_value_left_unset_is_one_line_naming_the_key(capsys, tmp_path):
    code, output = run_cli(capsys, "export", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "ckpt_path has no value (??? in the config): set ckpt_path=..." in output
    code, output = run_cli(capsys, "sample", f"out_dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path}")
    assert code == 2 and "name exactly one model: ckpt_path=FILE" in output and "Traceback" not in output


def test_every_trainer_argument_is_a_key_and_a_wrong_one_lists_them(capsys, tmp_path):
    main(["train", "trainer.max_time=00:00:15:00", "--cfg", "job"])
    assert "max_time: 00:00:15:00" in capsys.readouterr().out
    code, output = run_cli(capsys, "train", "trainer.max_tme=00:00:15:00", f"hydra.run.dir={tmp_path}")
    assert code and "Did you mean 'trainer.max_time'" in output and "detect_anomaly" in output


def test_resuming_another_architecture_names_the_keys_that_differ(capsys, trained_run, tmp_path):
    checkpoint = trained_run[0] / "checkpoints" / "last.ckpt"  # unet_tiny
    code, output = run_cli(
        capsys,
        "train",
        "debug=fast",
        "model/net=unet_small",
        f"ckpt_path={checkpoint}",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 2 and "does not fit this model" in output and "model.net.block_out_channels" in output
    assert output.count("size mismatch") == 0


def test_a_val_size_that_holds_out_every_row_names_both_numbers(compose_config, tmp_path):
    from hydra.utils import instantiate

    builders.write_butterflies_parquet(tmp_path / "butterflies", rows=23)
    cfg = compose_config("data=butterflies", f"data.path={tmp_path / 'butterflies'}", "data.num_workers=0")
    with pytest.raises(ConfigError, match=r"data.val_size=64 holds out every row: .* only 23 rows"):
        instantiate(cfg.data).setup("fit")


def test_ckpt_path_last_without_a_checkpoint_says_it_starts_from_step_0(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert resolve_checkpoint("last", tmp_path / "checkpoints", tmp_path) is None
    assert "starting from step 0" in caplog.text
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        resolve_checkpoint(str(tmp_path / "missing.ckpt"), None, tmp_path)


def test_the_exported_pipeline_is_readable_by_others(trained_run):
    umask = os.umask(0)
    os.umask(umask)
    pipeline = trained_run[0] / "pipeline"
    for path in [pipeline, *pipeline.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o777 if path.is_dir() else 0o666) & ~umask, (path, oct(mode))
