#!/usr/bin/env bash
# FID / KID per sampler and NFE of the default flow model (issue 22), 2 CPU cores, one evaluation at a time.
#   bash experiments/sampler_table/reproduce.sh [CKPT]
# CKPT: the last checkpoint of a default `diffusion-lab train` (no arguments); trained here when not given.
# Every evaluation: 500 samples (seeds 0-499) against the 180 held-out digits, random_conv features.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
ckpt="${1:-}"
if [ -z "$ckpt" ]; then
  run="outputs/sampler_table_default"
  diffusion-lab train hydra.run.dir="$run"
  ckpt="$run/checkpoints/last.ckpt"
fi
out="$here/results.jsonl"
: > "$out.partial"
for scheduler in euler heun dpm++ unipc; do
  for steps in 10 20 50; do
    start=$(date +%s.%N)
    line=$(diffusion-lab eval ckpt_path="$ckpt" data=digits feature_extractor=random_conv num_samples=500 \
      batch_size=250 kid_subset_size=200 sampling.scheduler="$scheduler" sampling.num_inference_steps="$steps" | tail -1)
    seconds=$(python -c "import time; print(round(time.time() - $start, 1))")
    python -c "import json, sys; row = json.loads(sys.argv[1]); row.update(scheduler=sys.argv[2], steps=int(sys.argv[3]), seconds=float(sys.argv[4])); print(json.dumps(row))" \
      "$line" "$scheduler" "$steps" "$seconds" >> "$out.partial"
  done
done
mv "$out.partial" "$out"
python "$here/tabulate.py" "$out"
