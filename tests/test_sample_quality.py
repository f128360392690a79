"""FID/KID during training (SampleQuality) and `diffusion-lab eval`, end to end with offline extractors."""

import contextlib
import csv
import io
import json
import math

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from diffusion_lab.callbacks import EMA, SampleQuality
from diffusion_lab.data import DigitsDataModule
from diffusion_lab.families.tiny import build_tiny_clip
from diffusion_lab.metrics import RandomConvFeatures
from tests.conftest import TINY, bare_trainer
from tests.test_commands import cli

OFFLINE_EXTRACTOR = "feature_extractor@callbacks.sample_quality.feature_extractor=random_conv"


def _last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("scored")
    result = cli(
        "train",
        "debug=fast",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={run_dir / 'cache'}",
        "callbacks=[default,sample_quality]",
        OFFLINE_EXTRACTOR,
        "callbacks.sample_quality.every_n_steps=3",
        "callbacks.sample_quality.num_samples=24",
        "callbacks.sample_quality.num_inference_steps=3",
        "callbacks.sample_quality.batch_size=12",
        "callbacks.sample_quality.kid_subset_size=12",
    )
    return run_dir, result.stdout


def test_callback_logs_fid_and_kid_to_the_metrics_csv_and_its_own_table(scored_run):
    run_dir, stdout = scored_run
    with (run_dir / "metrics.csv").open() as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("val/fid")]
    assert [int(row["step"]) for row in rows] == [3, 6]
    assert all(float(row["val/fid"]) > 0 and row["val/kid_std"] for row in rows)
    with (run_dir / "sample_quality.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["step"] for row in table] == ["3", "6"]
    assert table[0]["fid_protocol"] == "legacy" and table[0]["feature_extractor"] == "RandomConvFeatures"
    assert table[0]["num_samples"] == "24" and table[0]["num_reference"] == "180"  # the whole val split
    assert "Sample quality at step 6: FID" in stdout and "24 samples vs 180 reference" in stdout
    assert len(list((run_dir / "cache" / "fid_reference").glob("*.pt"))) == 1


@pytest.fixture(scope="module")
def samples(scored_run, tmp_path_factory):
    run_dir, _ = scored_run
    out = tmp_path_factory.mktemp("samples") / "sampled"
    cli(
        "sample",
        f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
        f"out_dir={out}",
        "num_images=12",
        "num_inference_steps=3",
    )
    return out


def test_eval_of_a_sample_folder_prints_one_json_line_and_reuses_the_reference_cache(scored_run, samples):
    run_dir, _ = scored_run
    result = cli(
        "eval",
        f"images={samples}",
        "data=digits",
        "feature_extractor=random_conv",
        "kid_subset_size=12",
        f"paths.cache_dir={run_dir / 'cache'}",
    )
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    scores = json.loads(lines[0])
    assert {"fid", "kid_mean", "kid_std", "inception_score"} <= scores.keys()
    assert scores["num_samples"] == 12 and scores["num_reference"] == 180  # settings.json: no grid.png
    assert scores["fid_protocol"] == "legacy"
    assert len(list((run_dir / "cache" / "fid_reference").glob("*.pt"))) == 1  # the training run's features


def _evaluate(*overrides: str) -> dict:
    """`diffusion-lab eval` in this process (the command line itself is tested above)."""
    from hydra import compose, initialize_config_module

    from diffusion_lab.commands.evaluate import evaluate
    from diffusion_lab.runs.overrides import CONFIG_MODULE

    with initialize_config_module(CONFIG_MODULE, version_base="1.3"):
        return evaluate(compose("eval", overrides=list(overrides)))


def test_eval_against_the_same_folder_is_zero(samples, tmp_path):
    scores = _evaluate(
        f"images={samples}",
        f"reference={samples}",
        "feature_extractor=random_conv",
        "kid_subset_size=8",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "fid_protocol=clean",
    )
    assert abs(scores["fid"]) < 1e-6 and abs(scores["kid_mean"]) < 0.01
    assert scores["fid_protocol"] == "clean" and scores["num_reference"] == 12


def test_callback_leaves_the_training_rng_stream_and_weights_alone(compose_config, tmp_path):
    cfg = compose_config(*TINY, "model.lr_scheduler.num_warmup_steps=0")

    def train(with_scores: bool):
        torch.manual_seed(0)
        model, data = instantiate(cfg.model), instantiate(cfg.data)
        callbacks = [EMA(decay=0.9)]
        if with_scores:
            callbacks.append(SampleQuality(
                RandomConvFeatures(input_size=16), every_n_steps=2, num_samples=8, batch_size=8,
                num_inference_steps=2, kid_subset_size=8, cache_dir=str(tmp_path / "cache"),
            ))  # fmt: skip
        bare_trainer(4, callbacks=callbacks).fit(model, datamodule=data)
        return model, torch.rand(4), callbacks

    plain, plain_draw, _ = train(False)
    scored, scored_draw, callbacks = train(True)
    assert callbacks[-1].last_scores["step"] == 4
    assert torch.equal(plain_draw, scored_draw)
    for a, b in zip(plain.parameters(), scored.parameters(), strict=True):
        assert torch.equal(a, b)


def test_callback_scores_a_text_model_with_clip_score_from_captions(tiny_sd, tmp_path):
    from diffusion_lab.models import LatentDiffusion

    clip = build_tiny_clip(tmp_path / "clip")
    data = DigitsDataModule(
        image_size=32, channels=3, batch_size=8, caption_template="a handwritten digit {label}"
    )
    model = LatentDiffusion(pretrained=str(tiny_sd), optimizer=torch.optim.AdamW, lr=1e-3)
    quality = SampleQuality(
        RandomConvFeatures(input_size=32),
        every_n_steps=0,
        num_samples=4,
        batch_size=4,
        num_inference_steps=2,
        guidance_scale=3.0,
        kid_subset_size=4,
        clip_model=str(clip),
        cache_dir=str(tmp_path / "cache"),
    )
    bare_trainer(2, callbacks=[EMA(decay=0.5), quality]).fit(model, datamodule=data)
    scores = quality.last_scores
    assert scores["step"] == 2 and scores["num_samples"] == 4 and scores["clip_score"] >= 0
    assert torch.isfinite(torch.tensor([scores["fid"], scores["kid_mean"]])).all()


def test_eval_samples_a_text_model_and_adds_clip_score(tiny_sd, tmp_path):
    clip = build_tiny_clip(tmp_path / "clip")
    scores = _evaluate(
        f"pretrained={tiny_sd}",
        "data=digits",
        "data.image_size=32",
        "data.channels=3",
        "data.caption_template='a handwritten digit {label}'",
        "feature_extractor=random_conv",
        "num_samples=6",
        "sampling.num_inference_steps=2",
        "kid_subset_size=6",
        f"clip_model={clip}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    )
    assert {"fid", "kid_mean", "kid_std", "inception_score", "clip_score"} <= scores.keys()
    assert scores["num_samples"] == 6 and scores["num_reference"] == 180


# The FID network itself (random weights, offline): two folders of 12 tiny images that differ in brightness.
FOLDER_SIZE = 12


@pytest.fixture(scope="module")
def image_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("folders")
    for name, seed, contrast, offset in (("reference", 0, 1.0, 0), ("generated", 1, 0.6, 60)):
        (root / name).mkdir()
        rng = np.random.default_rng(seed)
        for k in range(FOLDER_SIZE):
            smooth = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
                (32, 32), Image.BICUBIC
            )
            pixels = np.asarray(smooth, dtype=np.float32) * contrast + offset
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(root / name / f"{k:02d}.png")
    return root / "reference", root / "generated"


def _evaluate_inception(folders, weights, cache_dir, protocol: str) -> tuple[dict, str]:
    reference, generated = folders
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        scores = _evaluate(
            f"images={generated}",
            f"reference={reference}",
            "feature_extractor=inception",
            f"feature_extractor.weights_path={weights}",
            f"kid_subset_size={FOLDER_SIZE}",
            f"cache_dir={cache_dir}",
            f"fid_protocol={protocol}",
            "device=cpu",
        )
    return scores, stdout.getvalue()


@pytest.fixture(scope="module")
def inception_legacy_eval(image_folders, inception_weights, tmp_path_factory):
    return _evaluate_inception(image_folders, inception_weights, tmp_path_factory.mktemp("cache"), "legacy")


def test_eval_with_the_inception_network_reports_finite_scores_under_both_protocols(
    image_folders, inception_weights, inception_legacy_eval, tmp_path
):
    legacy, stdout = inception_legacy_eval
    assert json.loads(stdout.strip().splitlines()[-1]) == legacy
    clean, _ = _evaluate_inception(image_folders, inception_weights, tmp_path, "clean")
    for scores in (legacy, clean):
        assert scores["feature_extractor"] == "InceptionV3" and scores["num_samples"] == FOLDER_SIZE
        assert math.isfinite(scores["fid"]) and scores["fid"] > 1 and math.isfinite(scores["kid_mean"])
        assert math.isfinite(scores["inception_score"])
    assert clean["fid_protocol"] == "clean" and clean["fid"] != pytest.approx(legacy["fid"], rel=1e-3)
    assert len(list(tmp_path.glob("*.pt"))) == 1  # the reference features, keyed by the network's digest


def test_eval_legacy_fid_and_kid_match_torch_fidelity_on_the_same_network_and_images(
    image_folders, inception_weights, inception_legacy_eval
):
    import torch_fidelity

    reference, generated = image_folders
    ours, _ = inception_legacy_eval
    theirs = torch_fidelity.calculate_metrics(
        input1=str(generated),
        input2=str(reference),
        cuda=False,
        fid=True,
        kid=True,
        kid_subset_size=FOLDER_SIZE,
        feature_extractor_weights_path=str(inception_weights),
        cache=False,
        save_cpu_ram=True,
        verbose=False,
    )
    # Subsets of the whole set are the whole set: KID's random draws agree too.
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["kid_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-5)


def test_callback_scores_with_the_inception_network_of_the_composed_config(
    compose_config, inception_weights, tmp_path
):
    cfg = compose_config(
        *TINY,
        "callbacks=[default,sample_quality]",
        "data.val_fraction=0.005",
        f"callbacks.sample_quality.feature_extractor.weights_path={inception_weights}",
        "callbacks.sample_quality.every_n_steps=0",
        "callbacks.sample_quality.num_samples=4",
        "callbacks.sample_quality.batch_size=4",
        "callbacks.sample_quality.num_inference_steps=2",
        "callbacks.sample_quality.kid_subset_size=4",
    )
    quality = instantiate(cfg.callbacks.sample_quality)
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    bare_trainer(2, callbacks=[quality]).fit(model, datamodule=data)
    scores = quality.last_scores
    assert scores["step"] == 2 and scores["feature_extractor"] == "InceptionV3"
    assert scores["num_samples"] == 4 and scores["num_reference"] == 9  # 0.5 % of 1,797 digits
    assert torch.isfinite(torch.tensor([scores["fid"], scores["kid_mean"], scores["inception_score"]])).all()
    assert len(list((tmp_path / "cache" / "fid_reference").glob("*.pt"))) == 1
    with (tmp_path / "sample_quality.csv").open() as handle:
        assert [row["feature_extractor"] for row in csv.DictReader(handle)] == ["InceptionV3"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_callback_returns_gpu_memory_after_each_evaluation(compose_config, tmp_path):
    cfg = compose_config(*TINY, "trainer.accelerator=gpu")
    model, data = instantiate(cfg.model), instantiate(cfg.data)
    quality = SampleQuality(
        RandomConvFeatures(input_size=16),
        every_n_steps=2,
        num_samples=64,
        batch_size=32,
        num_inference_steps=2,
        kid_subset_size=32,
        cache_dir=str(tmp_path / "cache"),
    )
    trainer = bare_trainer(2, accelerator="gpu", devices=1, callbacks=[quality])
    trainer.fit(model, datamodule=data)
    after_first = torch.cuda.memory_allocated()
    for _ in range(3):
        quality.evaluate(trainer, model)
    assert torch.cuda.memory_allocated() == after_first
    assert next(quality.extractor.parameters()).device.type == "cpu"
