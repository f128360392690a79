"""Experiment management at scale, on the CPU: sweeps with a summary table, Optuna, W&B offline, DDP that
is correct (sharding, identical ranks, same weights as one process), and DDP inside sweeps."""

import csv
import json

import pytest
import torch
import yaml

from tests.test_commands import cli

FAST = ["debug=fast", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false"]
PROBE = "+callbacks.probe._target_=tests.ddp_probe.RankProbe"


def _probe(run_dir) -> dict:
    return json.loads((run_dir / "rank_probe.json").read_text())


def test_grid_multirun_makes_a_folder_per_run_and_one_summary_table(tmp_path):
    sweep = tmp_path / "sweep"
    cli("train", "-m", *FAST, "model.lr=1e-4,3e-4", "data.batch_size=8,16", f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [[o for o in row["overrides"].split() if o.startswith(("model.lr", "data.batch"))] for row in rows] == [
        ["model.lr=0.0001", "data.batch_size=8"], ["model.lr=0.0001", "data.batch_size=16"],
        ["model.lr=0.0003", "data.batch_size=8"], ["model.lr=0.0003", "data.batch_size=16"],
    ]  # fmt: skip
    for row in rows:
        assert row["status"] == "finished" and float(row["val/loss"]) > 0 and float(row["images_per_s"]) > 0
        assert float(row["wall_time_s"]) > 0 and (sweep / row["job"] / "checkpoints" / "last.ckpt").exists()
    markdown = (sweep / "summary.md").read_text()
    assert "Lowest val/loss" in markdown and markdown.count("\n| ") == 5  # header + 4 runs


def test_optuna_search_runs_three_trials_and_reports_the_best(tmp_path):
    sweep = tmp_path / "optuna"
    cli("train", "-m", "hparams_search=digits_optuna", *FAST, "hydra.sweeper.n_trials=3",
        f"hydra.sweep.dir={sweep}", f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"model.lr", "model.objective.noise_offset", "data.batch_size"}
    with (sweep / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    assert best["best_value"] == pytest.approx(
        min(float(row["val/loss"]) for row in rows), rel=1e-5
    )  # 6 digits


def test_wandb_offline_and_tensorboard_runs_write_their_config_and_images(tmp_path):
    run_dir = tmp_path / "run"
    cli("train", *FAST, "logger=[csv,wandb,tensorboard]", "model.lr=0.00123", f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    # wandb-core keeps an offline run in one uncompressed protobuf log: the resolved config is in it as JSON.
    record = next(offline_runs[0].glob("run-*.wandb")).read_bytes()
    assert b'run_name\x82\x01\r"flow_digits"' in record
    assert b'"lr":0.00123' in record and b'"block_out_channels":[8,16]' in record  # model and its UNet
    assert b"train/loss" in record and b"val/loss" in record
    assert list((offline_runs[0] / "files" / "media" / "images").glob("samples_*.png"))
    assert (run_dir / "metrics.csv").exists()  # and the CSV logger beside it
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert "samples" in events.Tags()["images"] and "train/loss" in events.Tags()["scalars"]


def test_ddp_on_two_cpu_processes_equals_one_process_with_the_doubled_batch(tmp_path):
    """With flow matching and logit-normal timesteps (the shared step and the keyed draws are those of every
    objective; the DDPM draws are pinned by test_objectives' bit-identity test)."""
    single, double = tmp_path / "single", tmp_path / "ddp"
    common = [
        *FAST,
        "model/objective=flow_matching",
        "model/noise_scheduler=flow_match",
        "model/objective/timesteps=logit_normal",
        "trainer.max_steps=4",
        "val_every_n_steps=2",
        f"paths.cache_dir={tmp_path / 'cache'}",
        "callbacks.model_checkpoint.every_n_train_steps=4",  # last.ckpt: the final step
    ]
    cli("train", *common, "trainer=cpu", "data.batch_size=16", f"hydra.run.dir={single}",
        f"{PROBE}", f"+callbacks.probe.path={single / 'rank_probe.json'}")  # fmt: skip
    cli("train", *common, "trainer=ddp_cpu", "data.batch_size=8", f"hydra.run.dir={double}",
        "callbacks=[default,posthoc_ema]", "callbacks.posthoc_ema.snapshot_every=2",
        f"{PROBE}", f"+callbacks.probe.path={double / 'rank_probe.json'}")  # fmt: skip
    one, two = _probe(single), _probe(double)
    # Sharding: each step the two ranks see disjoint halves of exactly the one-process batch.
    rank0, rank1 = (torch.tensor(two["indices"][r]).reshape(4, 8) for r in (0, 1))
    alone = torch.tensor(one["indices"][0]).reshape(4, 16)
    for step in range(4):
        assert not set(rank0[step].tolist()) & set(rank1[step].tolist())
        assert sorted(rank0[step].tolist() + rank1[step].tolist()) == sorted(alone[step].tolist())
    # Every rank holds the same weights, EMA and post-hoc EMA profiles, and so does rank 0's checkpoint.
    assert two["held"][0] == two["held"][1] and len(two["held"][0]) == 5
    # Post-hoc EMA snapshots: both profiles at steps 2 and 4, written by rank 0 alone.
    assert sorted(p.name for p in (double / "ema_snapshots").iterdir()) == [
        "0000002_sigma0.0500.safetensors", "0000002_sigma0.1000.safetensors",
        "0000004_sigma0.0500.safetensors", "0000004_sigma0.1000.safetensors",
    ]  # fmt: skip
    assert "post-hoc EMA: snapshots" in (double / "train.log").read_text()
    assert "post-hoc EMA" not in (double / "train_rank1.log").read_text()
    checkpoint = torch.load(double / "checkpoints" / "last.ckpt", weights_only=False)
    ema_sum = sum(float(s.double().sum()) for s in checkpoint["callbacks"]["EMA"]["shadow_params"])
    assert ema_sum == pytest.approx(two["held"][0][1], rel=1e-9)
    # The average moved on every optimizer step (diffusers issue 1895); each rank's RNG state is checkpointed.
    assert checkpoint["callbacks"]["EMA"]["optimization_step"] == checkpoint["global_step"] == 4
    assert len(checkpoint["callbacks"]["RNGStates"]["per_rank"]) == 2
    assert (double / "samples" / "final.png").exists() and (double / "pipeline" / "model_index.json").exists()
    assert sorted(p.name for p in double.iterdir() if p.is_dir()) == [
        ".hydra",
        "checkpoints",
        "ema_snapshots",
        "pipeline",
        "samples",
    ]

    # Logged losses are averaged over the ranks: the loss of the whole batch, as one process logs it.
    def logged(run_dir):
        with (run_dir / "metrics.csv").open() as handle:
            return [float(row["train/loss"]) for row in csv.DictReader(handle) if row.get("train/loss")]

    assert len(logged(single)) == 4 and logged(double) == pytest.approx(logged(single), rel=1e-4)
    # The same training: weights after 4 steps agree with the one-process run.
    straight = torch.load(single / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in checkpoint["state_dict"].items():
        torch.testing.assert_close(value, straight[name], atol=2e-5, rtol=1e-4)
    assert not list(tmp_path.glob("outputs")) and not (double / "train_rank1").exists()
    assert sorted(p.name for p in double.iterdir() if p.suffix == ".log") == ["train.log", "train_rank1.log"]


def test_multirun_of_ddp_runs_and_optuna_with_ddp_keep_one_folder_and_one_trial_per_run(tmp_path):
    sweep = tmp_path / "sweep"
    cli("train", "-m", "hparams_search=digits_optuna", *FAST, "trainer=ddp_cpu", "trainer.max_steps=2",
        "val_every_n_steps=2", "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}",
        f"paths.cache_dir={tmp_path / 'cache'}", PROBE, "+callbacks.probe.path=${paths.output_dir}/rank_probe.json",
    )  # fmt: skip
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        probe = _probe(sweep / job)
        lr = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        trial_lr = float(next(item.split("=")[1] for item in lr if item.startswith("model.lr=")))
        assert probe["held"][0] == probe["held"][1]  # both ranks trained the same trial
        assert probe["held"][0][2] == pytest.approx(trial_lr)
    assert len(list(csv.DictReader((sweep / "summary.csv").open()))) == 2


def test_a_requeued_run_in_its_own_folder_resumes_from_its_last_checkpoint(tmp_path):
    """What a SLURM requeue does: the same job again, in the same folder, with ckpt_path=last."""
    run_dir = tmp_path / "run"
    first = cli("train", *FAST, "ckpt_path=last", f"hydra.run.dir={run_dir}")  # nothing to resume yet
    assert "Finished at step 6" in first.stdout
    again = cli("train", *FAST, "ckpt_path=last", "trainer.max_steps=9", f"hydra.run.dir={run_dir}")
    assert (
        f"Restored all states from the checkpoint at {run_dir / 'checkpoints' / 'last.ckpt'}"
        in again.stdout + again.stderr
    )
    assert json.loads((run_dir / "run_summary.json").read_text())["global_step"] == 9
