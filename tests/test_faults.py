"""Faults a long run meets (kill -9, SIGTERM, NaN, a full disk, a resume in its own folder) and what survives."""

import contextlib
import errno
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

from diffusion_lab.commands.instantiate import build_run
from diffusion_lab.runs.atomic import DiskFull, write_file
from diffusion_lab.runs.checkpoint_io import AtomicCheckpointIO
from diffusion_lab.runs.finite import NonFiniteWeights
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
    killed_mid_write = (
        "import os, sys; from diffusion_lab.runs.atomic import staged\n"
        "with staged(sys.argv[1]) as temporary:\n"
        "    temporary.write_bytes(b'half a checkpoint'); os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", killed_mid_write, tmp_path / "last.ckpt"])
    (orphan,) = temporaries(tmp_path)
    assert not (tmp_path / "last.ckpt").exists()
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


@contextlib.contextmanager
def run_folder_away_from_tmpdir(tmp_path: Path):
    """(run folder, $TMPDIR) on different filesystems: the run on a tmpfs mounted here or, where mounting is
    not permitted, $TMPDIR on /dev/shm. Either way a writer staging in $TMPDIR would have to copy across."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(scratch)], capture_output=True
    )
    if mounted.returncode == 0:
        (tmp_path / "tmpdir").mkdir()
        try:
            yield scratch / "run", tmp_path / "tmpdir"
        finally:
            subprocess.run(["umount", "-l", str(scratch)], check=False)
        return
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second filesystem: neither mount -t tmpfs nor a separate /dev/shm")
    with tempfile.TemporaryDirectory(dir=shm) as tmpdir:
        yield tmp_path / "run", Path(tmpdir)


def test_kill_9_at_random_moments_leaves_loadable_checkpoints_and_resume_finishes(tmp_path):
    """A pre-emption chain: each attempt resumes the last one (`ckpt_path=last`) and dies of SIGKILL, every
    other one in the middle of a checkpoint write (slowed down to give the kill a window)."""
    with run_folder_away_from_tmpdir(tmp_path) as (run_dir, tmpdir):
        (run_dir.parent).mkdir(parents=True, exist_ok=True)
        assert run_dir.parent.stat().st_dev != tmpdir.stat().st_dev
        env, rng, checkpoints = {**ENV, "TMPDIR": str(tmpdir)}, random.Random(0), run_dir / "checkpoints"
        command = [
            sys.executable,
            "-m",
            "diffusion_lab.cli",
            "train",
            *FAST,
            "trainer.max_steps=40",
            "callbacks.model_checkpoint.every_n_train_steps=2",
            "val_every_n_steps=20",
            "trainer.plugins=[{_target_:tests.injection.SlowCheckpointIO}]",
            f"hydra.run.dir={run_dir}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            "ckpt_path=last",
        ]
        kills, mid_write = 0, 0
        for attempt in range(6):
            before = {p.name for p in checkpoints.glob("*.ckpt")}
            process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 120
            if attempt % 2 == 0:  # during the write of this attempt's first new checkpoint
                while process.poll() is None and time.monotonic() < deadline and not temporaries(checkpoints):
                    time.sleep(0.01)
            else:  # once it has saved something new, at a random moment
                while process.poll() is None and time.monotonic() < deadline:
                    if {p.name for p in checkpoints.glob("*.ckpt")} - before:
                        break
                    time.sleep(0.01)
                time.sleep(rng.uniform(0.0, 1.0))
            if process.poll() is None:
                mid_write += bool(temporaries(checkpoints))
                process.send_signal(signal.SIGKILL)
                kills += 1
            process.wait()
            for path in checkpoints.glob("*.ckpt"):  # the hidden temporaries are not checkpoints
                assert "state_dict" in load(path), path
        assert kills >= 5 and mid_write >= 3, (kills, mid_write)
        subprocess.run(command, env=env, check=True, capture_output=True, timeout=600)
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


def _train_in_process(compose_config, *overrides) -> int:
    from diffusion_lab.commands.train import train

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals are caught on the main thread only")
    cfg = compose_config(
        *TINY,
        "trainer.max_steps=8",
        "val_every_n_steps=4",
        "callbacks.model_checkpoint.every_n_train_steps=100",
        "+callbacks.stop._target_=tests.injection.SignalAt",
        *overrides,
    )
    with pytest.raises(SystemExit) as exit_:
        train(cfg)
    return exit_.value.code


def test_ctrl_c_finishes_the_step_saves_it_and_exits_130(compose_config, tmp_path):
    assert _train_in_process(compose_config, "+callbacks.stop.step=5", "+callbacks.stop.signum=2") == 130
    summary = summary_of(tmp_path)
    assert summary["status"] == "interrupted" and summary["message"] == "stopped by SIGINT"
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == summary["global_step"] == 5


def test_sigterm_during_validation_saves_the_trained_weights_not_the_ema(compose_config, tmp_path):
    code = _train_in_process(
        compose_config, "+callbacks.stop.step=4", "+callbacks.stop.during_validation=true"
    )
    assert code == 143
    checkpoint = load(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 4
    # Validation runs on the EMA weights swapped in; the checkpoint must hold the trained ones.
    assert not torch.equal(
        checkpoint["state_dict"]["net.conv_in.weight"], checkpoint["callbacks"]["EMA"]["shadow_params"][0]
    )


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
        "val_every_n_steps=100",
    )
    datamodule, model, trainer = build_run(cfg)
    trainer.fit(model, datamodule=datamodule)
    assert load(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 7
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert "train/loss" in rows[0] and rows[-1].split(",")[rows[0].split(",").index("step")] == "6"


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


def test_a_fatal_error_is_in_train_log_with_its_traceback(tmp_path):
    from diffusion_lab.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "train",
                "data=imagefolder",
                f"data.path={tmp_path / 'no_such_folder'}",
                f"hydra.run.dir={tmp_path}",
            ]
        )
    assert exit_.value.code == 1
    log = (tmp_path / "train.log").read_text()
    assert "fatal:" in log and "Traceback (most recent call last)" in log and "no_such_folder" in log
