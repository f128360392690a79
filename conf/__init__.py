"""diffusion_lab's Hydra configs, installed as the package `diffusion_lab.conf` (see pyproject.toml) and read
through Hydra's `pkg://` config source, the same in a checkout, an editable install and a wheel."""
