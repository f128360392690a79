"""Non-finite losses and gradients: the guard stops or skips before the weights see them, and nothing
non-finite is checkpointed, exported or sampled."""

import lightning as L
import pytest
import torch

from diffusion_lab.commands.instantiate import build_run
from diffusion_lab.runs.finite import NonFiniteWeights
from tests.conftest import TINY
from tests.test_commands import cli
from tests.test_faults import FAST, load, summary_of


def test_a_diverging_run_stops_non_zero_as_diverged_and_saves_nothing_non_finite(tmp_path):
    run_dir = tmp_path / "run"
    result = cli(
        "train",
        *FAST,
        "model.lr=1000",
        "trainer.max_steps=30",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        check=False,
    )
    assert result.returncode == 3, result.stderr[-2000:]
    summary = summary_of(run_dir)
    assert summary["status"] == "diverged" and "non-finite" in summary["message"]
    assert "diverged: non-finite" in (run_dir / "train.log").read_text()
    assert not (run_dir / "pipeline").exists()
    for path in (run_dir / "checkpoints").glob("*.ckpt"):
        state = load(path)["state_dict"]
        assert all(torch.isfinite(tensor).all() for tensor in state.values()), path


class WeightsPerStep(L.Callback):
    def __init__(self) -> None:
        self.weights = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights[trainer.global_step] = pl_module.net.conv_in.weight.detach().clone()


def _guarded_run(compose_config, *overrides):
    cfg = compose_config(
        *TINY,
        "model._target_=tests.injection.NaNLossAt",
        "trainer.max_steps=7",
        "val_every_n_steps=100",
        *overrides,
    )
    datamodule, model, trainer = build_run(cfg)
    recorder = WeightsPerStep()
    trainer.callbacks.append(recorder)
    return model, trainer, datamodule, recorder


@pytest.mark.parametrize("fault", ["+model.nan_steps=[2,3]", "+model.inf_gradient_steps=[2,3]"])
def test_skip_leaves_the_weights_alone_on_bad_steps_and_the_run_recovers(compose_config, fault):
    model, trainer, datamodule, recorder = _guarded_run(compose_config, "guard.nonfinite=skip", fault)
    trainer.fit(model, datamodule=datamodule)
    guard = next(c for c in trainer.callbacks if type(c).__name__ == "NonFiniteGuard")
    assert guard.skipped == 2 and trainer.global_step == 7
    weights = recorder.weights  # after optimizer steps 1..7; steps 3 and 4 were the bad ones
    assert torch.equal(weights[2], weights[3]) and torch.equal(weights[3], weights[4])
    assert not torch.equal(weights[4], weights[5]) and not torch.equal(weights[1], weights[2])
    assert all(torch.isfinite(p).all() for p in model.net.parameters())


def test_skip_stops_as_diverged_after_max_consecutive_bad_steps(compose_config):
    from diffusion_lab.callbacks import Diverged

    model, trainer, datamodule, _ = _guarded_run(
        compose_config, "guard.nonfinite=skip", "guard.max_consecutive=2", "+model.nan_steps=[2,3]"
    )
    with pytest.raises(Diverged, match=r"step 4 .*2 bad steps in a row"):
        trainer.fit(model, datamodule=datamodule)


@pytest.mark.parametrize("fault", ["+model.nan_steps=[2]", "+model.inf_gradient_steps=[2]"])
def test_stop_raises_before_the_weights_see_the_fault(compose_config, fault):
    from diffusion_lab.callbacks import Diverged

    model, trainer, datamodule, recorder = _guarded_run(compose_config, fault)
    with pytest.raises(Diverged, match="step 3"):
        trainer.fit(model, datamodule=datamodule)
    assert max(recorder.weights) == 2 and torch.equal(model.net.conv_in.weight, recorder.weights[2])


def test_export_and_sample_refuse_non_finite_weights(trained_run, tmp_path):
    from diffusion_lab.families import load_sampler
    from diffusion_lab.families.export import export_checkpoint

    checkpoint = load(trained_run[0] / "checkpoints" / "last.ckpt")
    checkpoint["state_dict"]["net.conv_in.weight"][0] = float("nan")
    checkpoint["callbacks"].pop("EMA")
    checkpoint.pop("state_dict_sha256")  # as a checkpoint written elsewhere: no checksum to refuse it first
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(NonFiniteWeights, match="conv_in"):
        export_checkpoint(tmp_path / "bad.ckpt", tmp_path / "pipeline")
    with pytest.raises(NonFiniteWeights):
        load_sampler(ckpt_path=str(tmp_path / "bad.ckpt"))
    assert not (tmp_path / "pipeline").exists()


def test_a_diverged_job_is_one_row_of_the_sweep_and_the_sweep_goes_on(tmp_path):
    sweep = tmp_path / "sweep"
    result = cli(
        "train",
        "-m",
        *FAST,
        "model.lr=1000,1e-3",
        "trainer.max_steps=30",
        f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert result.returncode == 0
    rows = (sweep / "summary.csv").read_text().splitlines()
    statuses = [row.split(",")[2] for row in rows[1:]]
    assert statuses == ["diverged", "finished"]
