"""diffusion_lab: Lightning + Hydra training of diffusion models on diffusers components."""
