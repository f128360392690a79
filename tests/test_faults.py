"""Faults a long run meets (kill -9, SIGTERM, NaN, a full disk, a resume in its own folder) and what survives."""

import contextlib
import errno
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffusion_lab.atomic import DiskFull, write_file
from diffusion_lab.checkpoint_io import AtomicCheckpointIO
from diffusion_lab.commands.instantiate import build_run
from diffusion_lab.finite import NonFiniteWeights
from tests.conftest import TINY
from tests.test_commands import ENV, cli

FAST = ["debug=fast", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false"]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str):
    """A tmpfs of `size` at `path` (a filesystem of its own, and one that fills up); skips where not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"mount -t tmpfs not permitted here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def summary_of(run_dir: Path) -> dict:
    def refuse(constant):
        raise AssertionError(f"run_summary.json holds {constant}: not strict JSON")

    return json.loads((run_dir / "run_summary.json").read_text(), parse_constant=refuse)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp-" in p.name] if folder.exists() else []


# --- write-then-rename ---------------------------------------------------------------------------------------


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    target = write_file(tmp_path / "table.csv", lambda p: p.write_text("old"))

    def half_then_disk_full(temporary: Path) -> None:
        temporary.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFull, match=r"table\.csv.*MiB free"):
        write_file(target, half_then_disk_full)
    assert target.read_text() == "old" and temporaries(tmp_path) == []


def test_a_temporary_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    orphan = tmp_path / f".last.ckpt.tmp-{int(dead.stdout)}"
    orphan.write_bytes(b"half a checkpoint")
    write_file(tmp_path / "other.txt", lambda p: p.write_text("x"))
    assert not orphan.exists()


def test_full_disk_during_a_checkpoint_keeps_the_previous_checkpoint(tmp_path):
    with small_tmpfs(tmp_path / "scratch", "3m") as scratch:
        io, path = AtomicCheckpointIO(), scratch / "last.ckpt"
        io.save_checkpoint({"state_dict": {"w": torch.ones(256, 1024)}, "global_step": 1}, path)  # 1 MiB
        with pytest.raises(DiskFull, match=r"last\.ckpt.*MiB free"):
            io.save_checkpoint({"state_dict": {"w": torch.zeros(512, 1024)}, "global_step": 2}, path)  # 2 MiB
        assert load(path)["global_step"] == 1 and temporaries(scratch) == []


def test_checkpoints_with_non_finite_weights_are_refused():
    with pytest.raises(NonFiniteWeights, match="w"):
        AtomicCheckpointIO().save_checkpoint(
            {"state_dict": {"w": torch.tensor([1.0, float("nan")])}}, "/dev/null"
        )


# --- kill -9 -----------------------------------------------------------------------------------------------


def test_kill_9_at_random_moments_leaves_loadable_checkpoints_and_resume_finishes(tmp_path):
    """A pre-emption chain: each attempt resumes the last one (`ckpt_path=last`) and is killed with SIGKILL,
    half of them while a checkpoint is being written; the run folder is on a tmpfs, $TMPDIR on the disk."""
    with small_tmpfs(tmp_path / "scratch", "256m") as scratch:
        run_dir, tmpdir, rng = scratch / "run", tmp_path / "tmpdir", random.Random(0)
        tmpdir.mkdir()
        command = [
            sys.executable,
            "-m",
            "diffusion_lab.cli",
            "train",
            *FAST,
            "trainer.max_steps=40",
            "callbacks.model_checkpoint.every_n_train_steps=1",
            "trainer.val_check_interval=20",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "ckpt_path=last",
        ]
        checkpoints, kills, mid_write = run_dir / "checkpoints", 0, 0
        for attempt in range(6):
            process = subprocess.Popen(
                command,
                env={**ENV, "TMPDIR": str(tmpdir)},
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 120
            started = next((p for p in checkpoints.glob("*.ckpt")), None) is not None
            # Wait for training to be under way (a new checkpoint), then kill mid-write or at a random moment.
            seen = {p.name for p in checkpoints.glob("*.ckpt")} if started else set()
            while process.poll() is None and time.monotonic() < deadline:
                if {p.name for p in checkpoints.glob("*.ckpt")} - seen:
                    break
                time.sleep(0.01)
            if attempt % 2 == 0:
                while process.poll() is None and time.monotonic() < deadline and not temporaries(checkpoints):
                    pass  # spin: the write of a 1 MB checkpoint is short
            else:
                time.sleep(rng.uniform(0.0, 1.5))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                kills += 1
                mid_write += bool(temporaries(checkpoints))
            process.wait()
            for path in checkpoints.glob("*.ckpt"):  # hidden temporaries are not checkpoints
                assert "state_dict" in load(path), path
        assert kills >= 5
        print(f"{kills} kills, {mid_write} while a checkpoint was being written")
        assert mid_write >= 1, "no kill landed during a checkpoint write"
        subprocess.run(
            command, env={**ENV, "TMPDIR": str(tmpdir)}, check=True, capture_output=True, timeout=600
        )
        assert (
            summary_of(run_dir)["status"] == "finished"
            and load(checkpoints / "last.ckpt")["global_step"] == 40
        )
        assert temporaries(checkpoints) == [] and list(tmpdir.iterdir()) == []


# --- SIGTERM, SIGINT, export, history ----------------------------------------------------------------------


def test_sigterm_saves_the_step_exits_143_and_the_resume_equals_the_straight_run(trained_run, tmp_path):
    straight_dir, _ = trained_run  # debug=fast: 6 steps, checkpoints at 3 and 6
    run_dir = tmp_path / "run"
    common = [*FAST, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    stopped = cli(
        "train",
        *common,
        "+callbacks.stop._target_=tests.injection.SignalAt",
        "+callbacks.stop.step=4",
        check=False,
    )
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    summary = summary_of(run_dir)
    assert summary["status"] == "interrupted" and summary["global_step"] == 4
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4
    assert f"hydra.run.dir={run_dir} ckpt_path=last" in stopped.stdout + stopped.stderr
    assert "interrupted at step 4" in (run_dir / "train.log").read_text()
    rows_before = (run_dir / "metrics.csv").read_text().splitlines()

    resumed = cli("train", *common, "ckpt_path=last")
    assert summary_of(run_dir)["status"] == "finished" and "Finished at step 6" in resumed.stdout
    straight, after = (
        load(straight_dir / "checkpoints" / "last.ckpt"),
        load(run_dir / "checkpoints" / "last.ckpt"),
    )
    assert after["global_step"] == straight["global_step"] == 6
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(after["state_dict"][key], value, rtol=1e-5, atol=1e-6)

    # The history: every row of the first attempt up to its checkpoint is still there, and no step twice.
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert all(
        row in rows
        for row in rows_before[1:]
        if float(row.split(",")[rows_before[0].split(",").index("step")]) < 4
    )
    logged = [
        (column, row.split(",")[header.index("step")])
        for row in rows[1:]
        for column, cell in zip(header, row.split(","), strict=True)
        if cell and column not in ("step", "epoch")
    ]
    assert len(logged) == len(set(logged)), "a replayed step was logged twice"


def test_a_run_killed_during_its_export_is_completed_by_its_resume(tmp_path):
    run_dir = tmp_path / "run"
    common = [*FAST, f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}"]
    killed = cli(
        "train", *common, "callbacks.pipeline_export._target_=tests.injection.KilledDuringExport", check=False
    )
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "pipeline").exists() and not (run_dir / "run_summary.json").exists()
    assert (
        load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 3
    )  # the final step is saved after export

    cli("train", *common, "ckpt_path=last")
    assert summary_of(run_dir)["status"] == "finished"
    assert (run_dir / "pipeline" / "unet").is_dir() and temporaries(run_dir) == []
    assert load(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 6


def test_last_ckpt_holds_the_final_step_and_short_runs_log_it(compose_config, tmp_path):
    cfg = compose_config(
        *TINY,
        "trainer.max_steps=7",
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "trainer.log_every_n_steps=25",
        "trainer.val_check_interval=100",
    )
    datamodule, model, trainer = build_run(cfg)
    trainer.fit(model, datamodule=datamodule)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 7
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0] and rows[-1].split(",")[rows[0].split(",").index("step")] == "6"


# --- divergence --------------------------------------------------------------------------------------------


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


def _guarded_run(compose_config, *overrides):
    cfg = compose_config(
        *TINY,
        "model._target_=tests.injection.NaNLossAt",
        "+model.nan_steps=[2,3]",
        "trainer.max_steps=6",
        "trainer.val_check_interval=100",
        *overrides,
    )
    datamodule, model, trainer = build_run(cfg)
    return model, trainer, datamodule


def test_skip_drops_the_bad_steps_and_the_run_recovers(compose_config):
    model, trainer, datamodule = _guarded_run(compose_config, "guard.nonfinite=skip")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    trainer.fit(model, datamodule=datamodule)
    guard = next(c for c in trainer.callbacks if type(c).__name__ == "NonFiniteGuard")
    assert guard.skipped == 2 and trainer.global_step == 6
    after = model.net.state_dict()
    assert all(torch.isfinite(t).all() for t in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_stop_raises_before_the_weights_see_the_nan(compose_config):
    from diffusion_lab.callbacks import Diverged

    model, trainer, datamodule = _guarded_run(compose_config, "guard.max_consecutive=1")
    with pytest.raises(Diverged, match="step 3"):
        trainer.fit(model, datamodule=datamodule)
    assert all(torch.isfinite(p).all() for p in model.net.parameters())


def test_export_and_sample_refuse_non_finite_weights(trained_run, tmp_path):
    from diffusion_lab.export import export_checkpoint
    from diffusion_lab.generation import load_sampler

    checkpoint = load(trained_run[0] / "checkpoints" / "last.ckpt")
    checkpoint["state_dict"]["net.conv_in.weight"][0] = float("nan")
    checkpoint["callbacks"].pop("EMA")
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(NonFiniteWeights, match="conv_in"):
        export_checkpoint(tmp_path / "bad.ckpt", tmp_path / "pipeline")
    with pytest.raises(NonFiniteWeights):
        load_sampler(str(tmp_path / "bad.ckpt"))
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


def test_slurm_usr1_saves_an_hpc_checkpoint_that_the_requeued_job_resumes(tmp_path):
    """Lightning's SLURM auto-requeue (USR1 before the time limit): the hpc checkpoint is written (through the
    atomic writer), the job dies, and its requeue, the same command, resumes from that checkpoint."""
    slurm = {
        "SLURM_JOB_ID": "4242",
        "SLURM_NTASKS": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_NODELIST": "localhost",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
    }
    run_dir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "diffusion_lab.cli",
        "train",
        *FAST,
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    injected = [
        "+callbacks.usr1._target_=tests.injection.SignalAt",
        "+callbacks.usr1.step=2",
        f"+callbacks.usr1.signum={int(signal.SIGUSR1)}",
        "+callbacks.node_lost._target_=tests.injection.SignalAt",
        "+callbacks.node_lost.step=4",
        f"+callbacks.node_lost.signum={int(signal.SIGKILL)}",
    ]
    first = subprocess.run([*command, *injected], env={**ENV, **slurm}, capture_output=True, text=True)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    (hpc,) = run_dir.glob("hpc_ckpt_*.ckpt")
    assert load(hpc)["global_step"] == 2
    requeued = subprocess.run(command, env={**ENV, **slurm}, capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr[-2000:]
    assert f"resuming from {hpc} (step 2)" in (run_dir / "train.log").read_text()
    assert summary_of(run_dir)["status"] == "finished"
