#!/usr/bin/env bash
# The pixel-defaults study (issue 22), 2 CPU cores, one trial at a time, nothing else running (the budget is time).
# Optuna TPE over lr, warm-up, batch size, UNet width / depth / attention and the logit-normal timestep density;
# each trial trains for a fixed wall-clock budget, then scores 500 samples (flow-match Euler, 20 steps) at each
# EMA length rebuilt post hoc from its own snapshots; the trial's value is the FID at its best length.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# digits, 16 px, 2.5 minutes per trial, against the 180 held-out digits
diffusion-lab train -m hparams_search=pixel_defaults hydra.sweeper.n_trials=10 \
  hydra.sweep.dir=multirun/pixel_defaults_digits
# flowers-12, 32 px, 5 minutes per trial, against the 240 test photos (pixel cache on): first the defaults as
# `data=imagefolder` gives them (batch 16, attention on the 8 px maps), scored like a trial, then the study
flowers="data=imagefolder data.path=../shared/data/oxford-flowers-12 data.val_split=test data.image_size=32
  trainer.max_time=00:00:05:00"
# shellcheck disable=SC2086
diffusion-lab train -m hparams_search=pixel_defaults $flowers hydra.sweeper.n_trials=1 \
  model.lr=2.4e-3 model.lr_scheduler.num_warmup_steps=200 data.batch_size=16 study.width=48 \
  model.net.layers_per_block=1 study.attention_lowest=1 model.objective.timesteps.mean=-0.088 \
  model.objective.timesteps.std=1.2 hydra.sweep.dir=multirun/pixel_defaults_flowers_default
# shellcheck disable=SC2086
diffusion-lab train -m hparams_search=pixel_defaults $flowers hydra.sweeper.n_trials=4 \
  hydra.sweep.dir=multirun/pixel_defaults_flowers
python "$here/tabulate.py" digits=multirun/pixel_defaults_digits flowers=multirun/pixel_defaults_flowers \
  flowers_default=multirun/pixel_defaults_flowers_default
