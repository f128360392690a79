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
# flowers-12, 32 px, 5 minutes per trial, against the 240 test photos (pixel cache on)
diffusion-lab train -m hparams_search=pixel_defaults hydra.sweeper.n_trials=4 \
  data=imagefolder data.path=../shared/data/oxford-flowers-12 data.val_split=test data.image_size=32 \
  trainer.max_time=00:00:05:00 hydra.sweep.dir=multirun/pixel_defaults_flowers
python "$here/tabulate.py" digits=multirun/pixel_defaults_digits flowers=multirun/pixel_defaults_flowers
