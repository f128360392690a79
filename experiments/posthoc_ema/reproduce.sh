#!/usr/bin/env bash
# Post-hoc EMA (issue 15): train with the callback, then rebuild and score EMA lengths. 2 CPU cores.
set -euo pipefail
# digits: the default run (1,200 steps), DDIM-50 against the 180 held-out digits
diffusion-lab train experiment=ddpm_digits 'callbacks=[default,posthoc_ema]' hydra.run.dir=outputs/posthoc_digits
diffusion-lab ema run=outputs/posthoc_digits sigma_rel=0.035,0.05,0.07,0.1,0.15,0.2 score=true \
  feature_extractor=random_conv num_samples=500 kid_subset_size=200 batch_size=250
# flowers-12, 32 px, flow matching, 800 steps (5 min), flow-match Euler-25 against the 240 test photos
diffusion-lab train experiment=ddpm_digits 'callbacks=[default,posthoc_ema]' hydra.run.dir=outputs/posthoc_flowers \
  data=imagefolder data.path=../shared/data/oxford-flowers-12 data.val_split=test data.image_size=32 \
  data.batch_size=32 +objective_preset=flow_logit_normal trainer.max_steps=800 callbacks.posthoc_ema.snapshot_every=50
diffusion-lab ema run=outputs/posthoc_flowers sigma_rel=0.03,0.04,0.05,0.07,0.1,0.15,0.2 score=true \
  feature_extractor=random_conv num_samples=500 kid_subset_size=200 batch_size=250 sampling.num_inference_steps=25
