"""Post-hoc EMA: the power-function profiles, their reconstruction from snapshots, and `diffusion-lab ema`."""

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffusion_lab.core.power_ema import power_ema_beta, sigma_rel_to_gamma
from diffusion_lab.errors import ConfigError
from diffusion_lab.posthoc_ema import PostHocEMA
from diffusion_lab.posthoc_ema.callback import read_snapshots
from diffusion_lab.posthoc_ema.sweep import reconstruct, valid_range
from tests.test_commands import cli

STEPS, EVERY = 400, 20


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 eq. 3, the relation `sigma_rel_to_gamma` inverts."""
    return math.sqrt(gamma + 1) / ((gamma + 2) * math.sqrt(gamma + 3))


def test_sigma_rel_and_gamma_convert_both_ways():
    # EDM2 section 3.1: sigma_rel 0.05 and 0.10 are gamma 16.97 and 6.94.
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for sigma in np.geomspace(0.005, 0.28, 25):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(sigma)) == pytest.approx(sigma, rel=1e-9)
    for gamma in (0.1, 1.0, 6.94, 16.97, 100.0):
        assert sigma_rel_to_gamma(gamma_to_sigma_rel(gamma)) == pytest.approx(gamma, rel=1e-7)
    with pytest.raises(ValueError, match="sigma_rel must be in"):
        sigma_rel_to_gamma(0.3)


def _trajectory() -> torch.Tensor:
    """Weights that drift and jitter, one row per optimizer step."""
    generator = torch.Generator().manual_seed(0)
    drift = torch.linspace(0, 20, STEPS)[:, None]
    return torch.randn(STEPS, 6, generator=generator, dtype=torch.float64).cumsum(0) + drift


def _direct_power_ema(weights: torch.Tensor, gamma: float) -> torch.Tensor:
    average = weights[0].clone()
    for step in range(1, len(weights) + 1):
        beta = power_ema_beta(step, gamma)
        average = beta * average + (1 - beta) * weights[step - 1]
    return average


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """The callback itself over the synthetic trajectory: (callback, snapshots, trajectory)."""
    folder = tmp_path_factory.mktemp("snapshots")
    trajectory = _trajectory()
    net = torch.nn.Linear(2, 2)  # weight 4 + bias 2 = the trajectory's 6 numbers
    module = SimpleNamespace(net=net)
    callback = PostHocEMA(str(folder), sigma_rels=(0.05, 0.10), snapshot_every=EVERY)
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    with torch.no_grad():
        for step in range(1, STEPS + 1):
            net.weight.copy_(trajectory[step - 1, :4].view(2, 2))
            net.bias.copy_(trajectory[step - 1, 4:])
            trainer.global_step = step
            callback.on_train_batch_end(trainer, module, None, None, step)
    return callback, read_snapshots(folder)[0], trajectory


def test_the_reconstruction_of_a_tracked_profile_is_that_profile(tracked):
    callback, snapshots, _ = tracked
    assert len(snapshots) == 2 * STEPS // EVERY and max(s["step"] for s in snapshots) == STEPS
    for sigma, profile in zip((0.05, 0.10), callback.profiles, strict=True):
        rebuilt, error = reconstruct(snapshots, ["weight", "bias"], sigma, max_error=0.05)
        assert error < 1e-6
        for a, b in zip(rebuilt, profile, strict=True):
            torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sigma", [0.03, 0.07, 0.15])
def test_an_untracked_length_matches_the_power_ema_computed_directly(tracked, sigma):
    _, snapshots, trajectory = tracked
    rebuilt, _ = reconstruct(snapshots, ["weight", "bias"], sigma, max_error=0.05)
    direct = _direct_power_ema(trajectory, sigma_rel_to_gamma(sigma))
    got = torch.cat([t.flatten() for t in rebuilt]).double()
    # Against the spread between the two tracked profiles: what choosing a length is about.
    spread = (
        _direct_power_ema(trajectory, sigma_rel_to_gamma(0.05)) - _direct_power_ema(trajectory, 6.94)
    ).abs()
    assert (got - direct).abs().max() < 0.05 * spread.max()


def test_a_length_the_snapshots_cannot_rebuild_is_refused_with_the_valid_range(tracked):
    _, snapshots, _ = tracked
    low, high = valid_range(snapshots, 0.05)
    assert 0.005 < low < 0.05 and 0.10 < high < 0.285
    with pytest.raises(ConfigError, match=rf"sigma_rel=0.28 .*valid range here is {low:.3f} to {high:.3f}"):
        reconstruct(snapshots, ["weight", "bias"], 0.28, max_error=0.05)


def test_the_ema_command_exports_each_length_scores_them_and_names_the_best(tmp_path):
    """Also `callbacks.posthoc_quality`, which scores lengths as the run ends: its FID of a length is the
    command's, computed afterwards from the same snapshots, samples and reference."""
    run = tmp_path / "run"
    cli("train", "debug=fast", "callbacks=[default,posthoc_ema,sample_quality,posthoc_quality]",
        "callbacks.posthoc_ema.snapshot_every=2", "trainer.max_steps=8", f"hydra.run.dir={run}",
        "feature_extractor@callbacks.sample_quality.feature_extractor=random_conv",
        "callbacks.sample_quality.at_end=false", "callbacks.sample_quality.num_samples=24",
        "callbacks.sample_quality.num_inference_steps=3", "callbacks.sample_quality.kid_subset_size=12",
        "callbacks.posthoc_quality.sigma_rels=[0.05,0.1]", "optimized_metric=val/fid",
        f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    with (run / "posthoc_quality.csv").open() as handle:
        at_end = {float(row["sigma_rel"]): float(row["fid"]) for row in csv.DictReader(handle)}
    assert set(at_end) == {0.05, 0.1}
    summary = json.loads((run / "run_summary.json").read_text())
    assert float(summary["val/fid"]) == pytest.approx(min(at_end.values()), rel=1e-5)
    assert float(summary["val/ema_sigma_rel"]) == pytest.approx(min(at_end, key=at_end.get))
    refused = cli("ema", f"run={run}", "sigma_rel=0.02,0.2", check=False)
    assert refused.returncode == 2 and "valid range here is" in refused.stderr
    out = tmp_path / "sweep"
    result = cli(
        "ema", f"run={run}", "sigma_rel=0.05,0.08,0.1", f"out_dir={out}", "score=true", "num_samples=24",
        "sampling.num_inference_steps=3", "feature_extractor=random_conv", "kid_subset_size=12", f"cache_dir={tmp_path / 'fid'}",
    )  # fmt: skip
    assert "best EMA length: sigma_rel=" in result.stdout
    with (out / "ema_sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["kind"] for row in rows] == ["post-hoc"] * 3 + ["training EMA sigma_rel 0.1"]
    assert all(float(row["fid"]) > 0 and float(row["kid"]) == float(row["kid"]) for row in rows)
    by_length = {float(row["sigma_rel"]): float(row["fid"]) for row in rows if row["kind"] == "post-hoc"}
    for sigma in (0.05, 0.1):
        assert by_length[sigma] == pytest.approx(at_end[sigma], rel=1e-4)
    unets = [DiffusionPipeline.from_pretrained(out / f"sigma_{s}").unet for s in ("0.050", "0.080", "0.100")]
    first = [p.detach().clone() for p in unets[0].parameters()]
    for other in unets[1:]:
        assert any(not torch.equal(a, b) for a, b in zip(first, other.parameters(), strict=True))
    assert "**post-hoc**" in (out / "ema_sweep.md").read_text() and Image.open(
        out / "ema_sweep.png"
    ).size == (640, 420)


def test_a_lora_run_gets_its_lengths_as_lora_folders_scored_on_the_base_model(tmp_path):
    run = tmp_path / "run"
    cli("train", "experiment=sdxl_lora_tiny", "callbacks=[text_to_image,posthoc_ema]",
        "callbacks.posthoc_ema.snapshot_every=2", "trainer.max_steps=6", "val_every_n_steps=3",
        "callbacks.prompt_grid.every_n_steps=0", "callbacks.prompt_grid.num_inference_steps=2",
        "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run}",
        f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    snapshot = next((run / "ema_snapshots").iterdir())
    from safetensors.torch import load_file

    assert all("lora" in name for name in load_file(snapshot))  # the adapters only
    out = tmp_path / "sweep"
    cli("ema", f"run={run}", "sigma_rel=0.05,0.1", f"out_dir={out}", "score=true", "num_samples=8",
        "sampling.num_inference_steps=2",
        "sampling.guidance_scale=2.0", "feature_extractor=random_conv", "kid_subset_size=4",
        f"cache_dir={tmp_path / 'fid'}")  # fmt: skip
    for sigma in ("0.050", "0.100"):
        assert (out / f"sigma_{sigma}" / "pytorch_lora_weights.safetensors").is_file()
    with (out / "ema_sweep.csv").open() as handle:
        assert [row["kind"] for row in csv.DictReader(handle)] == ["post-hoc", "post-hoc", "fixed decay 0.99"]


def test_a_resume_moves_aside_snapshots_past_its_step_and_a_late_callback_is_refused(tmp_path):
    net = torch.nn.Linear(2, 2)
    module, trainer = SimpleNamespace(net=net), SimpleNamespace(global_step=0, is_global_zero=True)
    first = PostHocEMA(str(tmp_path), snapshot_every=2)
    for step in range(1, 7):  # a crashed attempt got to step 6; its checkpoint is at step 2
        trainer.global_step = step
        first.on_train_batch_end(trainer, module, None, None, step)
    resumed = PostHocEMA(str(tmp_path), snapshot_every=2)
    resumed.load_state_dict(first.state_dict())
    trainer.global_step = 2
    resumed.on_train_start(trainer, module)
    assert sorted(s["step"] for s in read_snapshots(tmp_path)[0]) == [2, 2]
    assert len(list((tmp_path / "abandoned").iterdir())) == 4
    with pytest.raises(ConfigError, match="added to a run resumed at step 2"):
        PostHocEMA(str(tmp_path / "late")).on_train_start(trainer, module)


def test_an_ema_of_length_sigma_rel_is_the_power_function_profile_post_hoc_ema_tracks():
    """`callbacks.ema.sigma_rel` averages as EDM2's profile of that length: the EMA callback and the post-hoc
    profile of the same sigma_rel agree step for step (and with the direct recursion)."""
    from diffusion_lab.callbacks import EMA

    trajectory = _trajectory()[:120]
    net = torch.nn.Linear(2, 2)
    module = SimpleNamespace(net=net, device=torch.device("cpu"))
    ema = EMA(sigma_rel=0.1)
    trainer = SimpleNamespace(global_step=0)
    with torch.no_grad():
        for step in range(1, len(trajectory) + 1):
            net.weight.copy_(trajectory[step - 1, :4].view(2, 2))
            net.bias.copy_(trajectory[step - 1, 4:])
            trainer.global_step = step
            ema.on_train_batch_end(trainer, module, None, None, step)
    averaged = torch.cat([p.flatten() for p in ema.ema.shadow_params]).double()
    torch.testing.assert_close(
        averaged, _direct_power_ema(trajectory, sigma_rel_to_gamma(0.1)), rtol=1e-5, atol=1e-4
    )
    with pytest.raises(ValueError, match="update_every"):
        EMA(sigma_rel=0.1, update_every=10)
