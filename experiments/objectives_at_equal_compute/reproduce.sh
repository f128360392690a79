#!/usr/bin/env bash
# Objectives at equal wall-clock (issue 13), 2 CPU cores, one arm at a time. Each sweep writes summary.md and
# summary.csv in its multirun folder; summary.csv here merges the two.
set -euo pipefail
# digits, 16 px, 2.5 min per arm, 500 samples x 50 steps against the 180 held-out digits
diffusion-lab train -m experiment=compare_objectives \
  +objective_preset=ddpm_epsilon,ddpm_v,flow_uniform,flow_logit_normal \
  feature_extractor@callbacks.sample_quality.feature_extractor=random_conv \
  trainer.max_time=00:00:02:30 callbacks.sample_quality.num_samples=500
# flowers-12, 32 px, 4 min per arm, 500 samples x 25 steps against the 240 test photos (pixel cache on)
diffusion-lab train -m experiment=compare_objectives \
  +objective_preset=ddpm_epsilon,ddpm_v,flow_uniform,flow_logit_normal \
  feature_extractor@callbacks.sample_quality.feature_extractor=random_conv \
  data=imagefolder data.path=../shared/data/oxford-flowers-12 data.val_split=test data.image_size=32 \
  data.batch_size=32 trainer.max_time=00:00:04:00 \
  callbacks.sample_quality.num_samples=500 callbacks.sample_quality.num_inference_steps=25
