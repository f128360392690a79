"""Diffusers pipeline folders for the models diffusion_lab trains (no Lightning here: `sample` imports it)."""
