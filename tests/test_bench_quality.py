"""`diffusion-lab bench quality`: the project's default beside denoising_diffusion_pytorch, end to end at a tiny
budget; and the install hint when the peer is missing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from diffusion_lab.cli import main
from tests.test_renamed import refused

TINY_BENCH = [
    "minutes=0.1", "project_overrides=['model/net=unet_tiny','callbacks.progress_bar.refresh_rate=0']",
    "data.image_size=8", "data.batch_size=16", "peer.dim=8", "peer.dim_mults=[1,2]", "num_samples=12",
    "num_inference_steps=2", "batch_size=12", "kid_subset_size=6",
]  # fmt: skip


def test_bench_quality_trains_both_sides_for_the_budget_and_scores_them_alike(tmp_path, capsys):
    pytest.importorskip("denoising_diffusion_pytorch")
    main(["bench", "quality", *TINY_BENCH, f"out_dir={tmp_path}", f"paths.cache_dir={tmp_path / 'cache'}"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    project, peer = result["project"], result["peer"]
    assert result["nfe"] == 2 and result["num_samples"] == 12 and result["image_size"] == 8
    for side in (project, peer):
        assert side["steps"] > 0 and side["params_m"] > 0 and side["gflop_per_image"] > 0
        assert side["fid"] > 0 and side["kid_std"] >= 0
    # The project's side is `diffusion-lab train` with its defaults: flow matching, sampled by UniPC.
    assert project["sampler"] == "UniPCMultistepScheduler-2"
    config = (tmp_path / "project" / "config.yaml").read_text()
    assert "FlowMatching" in config and "max_time" in config
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert Image.open(tmp_path / "project_samples.png").width > 8 and Image.open(
        tmp_path / "peer_samples.png"
    )


def test_bench_quality_names_the_extra_to_install_when_the_peer_is_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "denoising_diffusion_pytorch", None)  # import fails as if not installed
    output = refused(capsys, "bench", "quality", *TINY_BENCH, f"out_dir={tmp_path}")
    assert "pip install 'diffusion_lab[peers]'" in output
    assert not (tmp_path / "project").exists()  # said before anything trained


def _running(pid: int) -> bool:
    """Whether `pid` runs (a zombie waiting for its reaper does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel kills the child (prctl): Linux")
def test_a_killed_bench_leaves_no_training_child_behind(tmp_path):
    pytest.importorskip("denoising_diffusion_pytorch")
    env = {**os.environ, "DIFFUSION_LAB_CACHE": str(tmp_path / "cache")}
    bench = subprocess.Popen(
        [sys.executable, "-m", "diffusion_lab.cli", "bench", "quality", *TINY_BENCH[1:], "minutes=2",
         f"out_dir={tmp_path}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    lock, child = tmp_path / "project" / ".diffusion_lab.lock", None
    deadline = time.monotonic() + 120
    while child is None and bench.poll() is None and time.monotonic() < deadline:
        try:  # the project's `diffusion-lab train` holds its run folder's lock
            child = json.loads(lock.read_text())["pid"]
        except (FileNotFoundError, ValueError):
            time.sleep(0.2)
    if child is None:
        bench.kill()
        pytest.fail(f"the bench's training child never started (bench exit code {bench.poll()})")
    assert _running(child)
    bench.send_signal(signal.SIGKILL)
    bench.wait()
    deadline = time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child), "the project's training run outlived the killed bench"
