"""`diffusion-lab bench quality`: the project's default beside denoising_diffusion_pytorch, end to end at a tiny
budget; and the install hint when the peer is missing."""

import json
import sys

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
