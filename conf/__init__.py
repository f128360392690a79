"""diffusion_lab's Hydra configs, installed as the package `diffusion_lab.conf` (see pyproject.toml) and read
through Hydra's `pkg://` config source, the same in a checkout, an editable install and a wheel."""

# The resolvers these configs use (${unet_widths:...}, ${attention_up_to:...}, ...): registered whenever the
# configs are read, by the CLI, `hydra.compose` in a notebook or a test.
from diffusion_lab.runs.resolvers import register_resolvers  # noqa: E402

register_resolvers()
