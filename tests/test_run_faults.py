"""Runs you can trust, part 2: each case a new user hit, reproduced, with the behaviour it now has."""

import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_lab.cli import main
from diffusion_lab.runs.run_lock import LOCK_NAME
from tests.test_commands import ENV
from tests.test_renamed import refused


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_summary.json").read_text())


def write_parquet_with_a_truncated_jpeg(root: Path, bad_row: int, rows: int = 21) -> Path:
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(buffer, format="JPEG")
        return buffer.getvalue()

    images = [{"bytes": jpeg(), "path": None} for _ in range(rows)]
    images[bad_row] = {"bytes": jpeg()[:200], "path": None}
    features = Features({"image": ImageFeature(), "label": Value("int64")})
    (root / "data").mkdir(parents=True, exist_ok=True)
    Dataset.from_dict({"image": images, "label": [0] * rows}, features=features).to_parquet(
        str(root / "data" / "train-00000-of-00001.parquet")
    )
    return root


def children_of(pid: int) -> list[int]:
    listed = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(line) for line in listed.stdout.split()]


@pytest.mark.slow
@pytest.mark.parametrize(("bad_row", "loader"), [(5, "train"), (0, "validation")])
def test_a_fatal_error_in_a_loader_worker_ends_the_run_within_seconds(tmp_path, bad_row, loader):
    # Row 0 is held out (data.val_size=2): the validation loader's worker hits it; row 5 the training one's.
    data = write_parquet_with_a_truncated_jpeg(tmp_path / "data", bad_row)
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "diffusion_lab.cli", "train", "data=imagefolder", f"data.path={data}",
        "data.streaming=true", "data.val_size=2", "data.image_size=16", "data.num_workers=2", "data.batch_size=4",
        "model/net=unet_tiny", "trainer.max_steps=4", "val_every_n_steps=2", "trainer.num_sanity_val_steps=0",
        "callbacks.progress_bar.refresh_rate=0", f"hydra.run.dir={run_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen_workers: set[int] = set()
    started = time.monotonic()
    while process.poll() is None and time.monotonic() - started < 120:
        seen_workers |= set(children_of(process.pid))
        time.sleep(0.2)
    assert process.poll() is not None, "the run hung after its loader failed"  # it used to wait until killed
    assert process.returncode == 1, process.communicate()[1][-2000:]
    assert time.monotonic() - started < 60  # startup (~10 s on 2 cores), a few steps and the failure
    summary = summary_of(run_dir)
    assert summary["status"] == "failed" and "data.max_bad_fraction" in summary["message"]
    time.sleep(0.5)
    assert seen_workers, "the run was meant to have loader workers"
    assert not [pid for pid in seen_workers if Path(f"/proc/{pid}").exists()], (
        "a loader worker outlived the run"
    )
    assert not (run_dir / LOCK_NAME).exists()


def test_a_fatal_error_in_a_callback_ends_the_run_and_kills_its_workers(tmp_path):
    import multiprocessing

    with pytest.raises(SystemExit) as exit_:
        main(["train", "debug=fast", "data.num_workers=2", "trainer.max_steps=50", f"hydra.run.dir={tmp_path}",
              "+callbacks.fail._target_=tests.injection.RaiseAt", "+callbacks.fail.step=3",
              "callbacks.progress_bar.refresh_rate=0"])  # fmt: skip
    assert exit_.value.code == 1
    assert not multiprocessing.active_children(), "a loader worker outlived the failed run"
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed" and summary["message"] == "injected failure at step 3"
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_run_that_ends_without_an_optimizer_step_is_failed_not_finished(tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "debug=fast", "trainer.limit_train_batches=0", f"hydra.run.dir={tmp_path}",
              "callbacks.progress_bar.refresh_rate=0"])  # fmt: skip
    assert exit_.value.code == 1
    summary = summary_of(tmp_path)
    assert summary["status"] == "failed" and "without one optimizer step" in summary["message"]


def test_sigterm_during_the_final_fid_exits_143_and_the_resume_does_only_that_work(tmp_path):
    # The FID is the last end-of-run work: the grid and the export before it were done, the score was not.
    args = ["train", "debug=fast", "data.image_size=16", "callbacks=[default,sample_quality]",
            "feature_extractor@callbacks.sample_quality.feature_extractor=random_conv",
            "callbacks.sample_quality.num_samples=64", "callbacks.sample_quality.batch_size=16",
            "callbacks.sample_quality.num_inference_steps=4",
            "callbacks.progress_bar.refresh_rate=0", f"paths.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    straight, run_dir = tmp_path / "straight", tmp_path / "stopped"
    main([*args, f"hydra.run.dir={straight}"])
    with pytest.raises(SystemExit) as exit_:
        main([*args, f"hydra.run.dir={run_dir}",
              "callbacks.sample_quality._target_=tests.injection.SignalledDuringFinalScore"])  # fmt: skip
    assert exit_.value.code == 143
    assert summary_of(run_dir)["status"] == "interrupted"
    assert not (run_dir / "sample_quality.csv").exists()
    exported = (run_dir / "pipeline" / "model_index.json").stat().st_mtime_ns

    main([*args, f"hydra.run.dir={run_dir}", "ckpt_path=last"])
    assert "finishing the end-of-run work" in (run_dir / "train.log").read_text()
    summary = summary_of(run_dir)
    assert summary["status"] == "finished" and summary["global_step"] == 6
    assert summary["val/fid"] == summary_of(straight)["val/fid"]  # the same weights, samples and score
    assert (run_dir / "samples" / "final.png").read_bytes() == (
        straight / "samples" / "final.png"
    ).read_bytes()
    assert (
        run_dir / "pipeline" / "model_index.json"
    ).stat().st_mtime_ns == exported  # done before: not redone


def test_a_second_job_on_a_live_runs_folder_is_refused(capsys, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = {
            "host": socket.gethostname(),
            "pid": holder.pid,
            "started": time.time(),
            "heartbeat": time.time(),
        }
        (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
        output = refused(capsys, "train", "debug=fast", f"hydra.run.dir={tmp_path}")
        assert f"is in use by another run (host {lock['host']}, pid {holder.pid}" in output
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "checkpoints").exists()
    finally:
        holder.kill()


def test_a_stale_lock_is_taken_over_with_a_line_saying_so(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = {"host": socket.gethostname(), "pid": dead.pid, "started": 0, "heartbeat": 0}
    (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
    main(
        [
            "train",
            "debug=fast",
            "trainer.max_steps=2",
            f"hydra.run.dir={tmp_path}",
            "callbacks.progress_bar.refresh_rate=0",
        ]
    )
    log = (tmp_path / "train.log").read_text()
    assert "taking over the lock" in log and f"pid {dead.pid}" in log
    assert summary_of(tmp_path)["status"] == "finished" and not (tmp_path / LOCK_NAME).exists()


def test_a_lock_from_another_host_counts_as_stale_only_once_its_heartbeat_stops(tmp_path):
    from diffusion_lab.errors import ConfigError
    from diffusion_lab.runs.run_lock import RunLock

    beating = {"host": "node-17", "pid": 1, "started": time.time(), "heartbeat": time.time()}
    (tmp_path / LOCK_NAME).write_text(json.dumps(beating))
    with pytest.raises(ConfigError, match="host node-17"):
        RunLock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({**beating, "heartbeat": time.time() - 3600}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_batch_larger_than_the_training_split_is_refused(capsys, tmp_path):
    output = refused(capsys, "train", "data.batch_size=2000", f"hydra.run.dir={tmp_path}")
    assert "data.batch_size=2000 is larger than the training split: 1617 rows" in output
    assert summary_of(tmp_path)["status"] == "failed"


def test_a_resume_at_another_resolution_names_the_keys_that_differ(capsys, tmp_path):
    main(["train", "debug=fast", "trainer.max_steps=2", "data.image_size=8", "model/net=unet_tiny",
          f"hydra.run.dir={tmp_path}", "callbacks.progress_bar.refresh_rate=0"])  # fmt: skip
    output = refused(capsys, "train", "debug=fast", "trainer.max_steps=4", "data.image_size=16",
                     "model/net=unet_tiny", f"hydra.run.dir={tmp_path}", "ckpt_path=last")  # fmt: skip
    assert "data.image_size: 8 in the checkpoint, 16 now" in output


def bad_models(run_dir: Path, folder: Path) -> tuple[Path, Path]:
    """(a text file, a copy of the run's pipeline folder without its unet/)."""
    import shutil

    text = folder / "notes.txt"
    text.write_text("not a model")
    broken = folder / "broken"
    shutil.copytree(run_dir / "pipeline", broken)
    shutil.rmtree(broken / "unet")
    return text, broken


@pytest.mark.parametrize(
    ("command", "arguments", "message"),
    [
        ("export", ["ckpt_path={text}", "out_dir={out}"], "not a Lightning checkpoint"),
        ("export", ["ckpt_path={missing}", "out_dir={out}"], "no such checkpoint file"),
        ("eval", ["pretrained={broken}", "data=digits"], "the pipeline folder lacks unet/"),
        (
            "eval",
            ["ckpt_path={ckpt}", "data=digits", "num_samples=0"],
            "num_samples=0: must be a whole number",
        ),
        (
            "eval",
            ["ckpt_path={ckpt}", "data=digits", "sampling.num_inference_steps=-2"],
            "must be a whole number",
        ),
        ("ema", ["run={run}", "num_samples=0"], "num_samples=0: must be a whole number above 0"),
    ],
)
def test_bad_export_eval_and_ema_inputs_are_one_line(
    capsys, tmp_path, trained_run, command, arguments, message
):
    run_dir, _ = trained_run
    text, broken = bad_models(run_dir, tmp_path)
    filled = [a.format(text=text, broken=broken, out=tmp_path / "out", missing=tmp_path / "none.ckpt",
                       ckpt=run_dir / "checkpoints" / "last.ckpt", run=run_dir) for a in arguments]  # fmt: skip
    output = refused(capsys, command, *filled)
    assert message in output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["num_inference_steps=0"], "num_inference_steps=0: must be a whole number above 0"),
        (["num_images=-1"], "num_images=-1: must be a whole number above 0"),
        (["ckpt_path={text}"], "not a Lightning checkpoint"),
        (["pretrained={text}"], "is a file: pretrained= names a diffusers pipeline"),
        (["pretrained={broken}"], "the pipeline folder lacks unet/"),
    ],
)
def test_bad_sample_inputs_are_one_line_and_leave_no_output_folder(
    capsys, tmp_path, trained_run, arguments, message
):
    run_dir, _ = trained_run
    text, broken = bad_models(run_dir, tmp_path)
    model = (
        []
        if any(a.startswith(("ckpt_path", "pretrained")) for a in arguments)
        else [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}"]
    )
    filled = [a.format(text=text, broken=broken) for a in arguments]
    output = refused(capsys, "sample", *model, *filled, f"out_dir={tmp_path / 'out'}")
    assert message in output and not (tmp_path / "out").exists()


def test_a_run_folder_that_cannot_be_written_is_one_line(capsys, tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"mount -t tmpfs not permitted here: {mounted.stderr.decode().strip()}")
    try:
        output = refused(capsys, "train", "debug=fast", f"hydra.run.dir={folder}", "ckpt_path=last")
        assert f"the run folder {folder} cannot be written (Read-only file system)" in output
        assert len(output.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_bad_snapshots_are_named_dropped_on_request_and_a_copied_run_reads_its_own(capsys, tmp_path):
    import shutil

    run = tmp_path / "run"
    main(["train", "debug=fast", "callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.snapshot_every=2",
          "trainer.max_steps=8", f"hydra.run.dir={run}", "callbacks.progress_bar.refresh_rate=0"])  # fmt: skip
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(run / "ema_snapshots")  # the copy's config still names these: it must read its own
    snapshots = sorted((copy / "ema_snapshots").glob("*.safetensors"))
    flipped, truncated = snapshots[1], snapshots[2]
    data = bytearray(flipped.read_bytes())
    data[-1000:] = bytes(byte ^ 0xFF for byte in data[-1000:])  # tensor bytes, the header left whole
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:50])
    capsys.readouterr()

    output = refused(capsys, "ema", f"run={copy}", "sigma_rel=0.1")
    assert "2 bad EMA snapshot(s)" in output
    assert (
        f"{flipped}: its tensors do not match the checksum" in output and f"{truncated}: unreadable" in output
    )

    main(["ema", f"run={copy}", "sigma_rel=0.1", "skip_bad=true", f"out_dir={tmp_path / 'sweep'}"])
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert (
        "dropping 2 bad EMA snapshot(s)" in output and "6 snapshots up to step 8 rebuild sigma_rel" in output
    )
    assert (tmp_path / "sweep" / "sigma_0.100" / "model_index.json").exists()


def test_a_checkpoint_whose_weights_changed_after_writing_is_refused(capsys, tmp_path, trained_run):
    import torch

    run_dir, _ = trained_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert checkpoint["state_dict_sha256"]  # written with every checkpoint
    name = next(iter(checkpoint["state_dict"]))
    checkpoint["state_dict"][name].view(-1)[0] += 1.0  # one changed weight, the checksum left as written
    damaged = tmp_path / "damaged.ckpt"
    torch.save(checkpoint, damaged)
    output = refused(capsys, "export", f"ckpt_path={damaged}", f"out_dir={tmp_path / 'out'}")
    assert f"ckpt_path={damaged}: its weights do not match the checksum" in output
    assert not (tmp_path / "out").exists()


def test_the_lock_holder_keeps_its_heartbeat_fresh_and_releases_on_exit(tmp_path):
    from diffusion_lab.runs.run_lock import RunLock

    with RunLock(tmp_path, heartbeat_s=0.05):
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"] > first
    assert not (tmp_path / LOCK_NAME).exists()
