#!/usr/bin/env bash
# `diffusion-lab bench quality` for issue 22's two goals, 2 CPU cores, one run at a time, nothing else running.
# Each run folder gets result.json (the JSON line it prints), project_samples.png, peer_samples.png and the
# project's own training run (project/); the first three are copied here.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
keep() { mkdir -p "$here/$2"; cp "$1"/result.json "$1"/project_samples.png "$1"/peer_samples.png "$here/$2/"; }
# flowers-12 at 32 px: 15 minutes a side, 500 samples, 50 network evaluations, against the 240 test photos
diffusion-lab bench quality minutes=15 data=imagefolder data.path=../shared/data/oxford-flowers-12 \
  data.val_split=test data.image_size=32 data.batch_size=32 out_dir=outputs/bench_quality_flowers
keep outputs/bench_quality_flowers flowers
# digits at 16 px: 2.5 minutes a side (the new `make train` fits in that; the former default took 4.6)
diffusion-lab bench quality minutes=2.5 out_dir=outputs/bench_quality_digits
keep outputs/bench_quality_digits digits
