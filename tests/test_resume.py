"""Exact resume: N steps, checkpoint, resume, N more == 2N straight (weights, EMA, optimizer, data, RNG)."""

import pytest
import torch

from diffusion_lab.commands.instantiate import build_run
from tests.conftest import DDPM_LINEAR, TINY

STEPS = 8  # total; the checkpoint at STEPS/2 lands mid-epoch (an epoch is 20 batches of 72)


def _run(compose_config, out_dir, *overrides):
    cfg = compose_config(
        *TINY,
        f"trainer.max_steps={STEPS}",
        "val_every_n_steps=1000",
        f"callbacks.model_checkpoint.every_n_train_steps={STEPS // 2}",
        f"callbacks.model_checkpoint.out_dir={out_dir}/checkpoints",
        f"callbacks.sample_grid.out_dir={out_dir}/samples",
        f"callbacks.pipeline_export.out_dir={out_dir}/pipeline",
        f"logger.csv.save_dir={out_dir}",
        "data.batch_size=72",
        "model.net.dropout=0.1",  # draws from the global RNG: its state must come back too
        *overrides,
    )
    datamodule, model, trainer = build_run(cfg)
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMA")
    return model, ema, trainer


@pytest.mark.parametrize(
    "objective",
    [
        DDPM_LINEAR,
        [
            "model/objective=flow_matching",
            "model/noise_scheduler=flow_match",
            "model/objective/timesteps=logit_normal",
        ],
        [
            "model/objective=flow_matching",
            "model/noise_scheduler=flow_match",
            "model/net=dit",
            "model.net.size=tiny",
        ],
    ],
    ids=["ddpm", "flow_matching", "sit"],
)
def test_resume_equals_straight_run(compose_config, tmp_path, objective):
    straight, straight_ema, _ = _run(compose_config, tmp_path / "straight", *objective)
    half = tmp_path / "straight" / "checkpoints" / f"step_{STEPS // 2:07d}.ckpt"
    assert half.exists()
    checkpoint = torch.load(half, weights_only=False)
    assert checkpoint["global_step"] == STEPS // 2 and "EMA" in checkpoint["callbacks"]
    assert checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"], "data position not checkpointed"

    resumed, resumed_ema, trainer = _run(
        compose_config, tmp_path / "resumed", *objective, f"ckpt_path={half}"
    )
    assert trainer.global_step == STEPS
    for (name, a), b in zip(
        straight.net.state_dict().items(), resumed.net.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    for a, b in zip(straight_ema.ema.shadow_params, resumed_ema.ema.shadow_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert straight_ema.ema.optimization_step == resumed_ema.ema.optimization_step == STEPS


@pytest.mark.parametrize(
    "state_path",
    [("callbacks", "RNGStates"), ("loops", "fit_loop", "state_dict", "combined_loader")],
    ids=["without-rng-states", "without-data-position"],
)
def test_resume_missing_a_piece_of_state_would_differ(compose_config, tmp_path, state_path):
    """The check above can fail: drop the RNG states (dropout drifts) or the data position (batches are
    replayed from the epoch start) and the resumed run ends elsewhere."""
    straight, _, _ = _run(compose_config, tmp_path / "straight")
    half = tmp_path / "straight" / "checkpoints" / f"step_{STEPS // 2:07d}.ckpt"
    checkpoint = torch.load(half, weights_only=False)
    *parents, leaf = state_path
    container = checkpoint
    for key in parents:
        container = container[key]
    del container[leaf]
    torch.save(checkpoint, tmp_path / "incomplete.ckpt")
    resumed, _, _ = _run(compose_config, tmp_path / "resumed", f"ckpt_path={tmp_path / 'incomplete.ckpt'}")
    differences = [
        (a - b).abs().max().item()
        for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values(), strict=True)
    ]
    assert max(differences) > 1e-5


def test_resume_equals_straight_run_on_a_local_image_folder(compose_config, tmp_path):
    """The same through the ImageDataModule's stream: its position lives in the Lightning checkpoint."""
    from tests import builders

    builders.write_image_folder(tmp_path / "images", per_class=9)
    data = [f"data.path={tmp_path / 'images'}", "data.batch_size=4", "data.num_workers=0", "data.val_size=3"]
    straight, _, _ = _run(compose_config, tmp_path / "straight", "data=imagefolder", *data)
    half = tmp_path / "straight" / "checkpoints" / f"step_{STEPS // 2:07d}.ckpt"
    stream_state = torch.load(half, weights_only=False)["loops"]["fit_loop"]["state_dict"]["combined_loader"][
        0
    ]
    assert stream_state["dataset_state"]["position"] == STEPS // 2 * 4  # 16 of 24 rows: mid-epoch
    resumed, _, _ = _run(compose_config, tmp_path / "resumed", "data=imagefolder", *data, f"ckpt_path={half}")
    for a, b in zip(straight.net.state_dict().values(), resumed.net.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_resume_with_post_hoc_ema_equals_straight_run(compose_config, tmp_path):
    def run(out_dir, *overrides):
        model, _, trainer = _run(
            compose_config, out_dir, "callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.snapshot_every=2",
            f"callbacks.posthoc_ema.out_dir={out_dir}/ema_snapshots", *overrides,
        )  # fmt: skip
        return next(c for c in trainer.callbacks if type(c).__name__ == "PostHocEMA")

    straight = run(tmp_path / "straight")
    half = tmp_path / "straight" / "checkpoints" / f"step_{STEPS // 2:07d}.ckpt"
    assert "PostHocEMA" in torch.load(half, weights_only=False)["callbacks"]
    resumed = run(tmp_path / "resumed", f"ckpt_path={half}")
    for profile_a, profile_b in zip(straight.profiles, resumed.profiles, strict=True):
        for a, b in zip(profile_a, profile_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    from safetensors.torch import load_file

    # The resumed run writes the snapshots after its restart (steps 6 and 8) as the straight run did.
    for name in ("0000006_sigma0.0500.safetensors", "0000008_sigma0.1000.safetensors"):
        a = load_file(tmp_path / "straight" / "ema_snapshots" / name)
        b = load_file(tmp_path / "resumed" / "ema_snapshots" / name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
