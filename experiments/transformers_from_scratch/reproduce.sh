#!/usr/bin/env bash
# Transformers from scratch at equal wall-clock (issue 23), 2 CPU cores, one arm at a time, nothing else running.
# flowers-12 at 32 px; each arm trains for 5 minutes (experiment=sit_flowers), then scores 500 samples (UniPC,
# 20 steps: NFE 20) against the 240 test photos with the offline random_conv extractor.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-multirun/transformers_from_scratch}"
mkdir -p "$out"
encoder="$out/stand_in_vit_ti16.safetensors"
# REPA's stand-in encoder (DINOv2 needs a download): ViT-Ti/16 trained on the 720 training photos' species
[ -f "$encoder" ] || python "$here/stand_in_encoder.py" ../shared/data/oxford-flowers-12 "$encoder" 30
diffusion-lab train -m experiment=sit_flowers data.path=../shared/data/oxford-flowers-12 \
  backbone_preset=unet,sit_tiny,sit_s,sit_sra hydra.sweep.dir="$out/arms"
diffusion-lab train -m experiment=sit_flowers data.path=../shared/data/oxford-flowers-12 backbone_preset=sit_repa \
  model.alignment.encoder.checkpoint="$(realpath "$encoder")" hydra.sweep.dir="$out/repa"
python "$here/make_table.py" "$out/arms" "$out/repa" "$encoder"
