"""Measurement helpers for `diffusion-lab bench`: timing, FLOP counting, baselines."""
