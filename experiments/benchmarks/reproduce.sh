#!/usr/bin/env bash
# The benchmarks behind summary.md; each prints one JSON line (project and baseline measured in the same run).
set -euo pipefail
diffusion-lab bench train                                                   # 2 CPU cores: small UNet, 16 px, batch 64
diffusion-lab bench train model/net=unet_butterflies data.image_size=128 data.channels=3 trainer=gpu batch_size=64 \
  trainer.precision=bf16-mixed                                              # GPU: the diffusers tutorial's 128 px UNet
diffusion-lab bench sampling                                                # 2 CPU cores
diffusion-lab bench data path=../shared/data/oxford-flowers-12 image_size=32 'workers=[0,2]' repeats=2
diffusion-lab bench latent_cache
