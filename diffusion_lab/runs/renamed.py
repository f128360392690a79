"""Keys that were renamed so that one concept has one name: the old name is refused with the new one.

One name each: the prediction type and zero terminal SNR live on the noise scheduler, inference steps are
`num_inference_steps`, a Lightning checkpoint to read is `ckpt_path`, an output folder is `out_dir`, and
every cadence counts optimizer steps.
"""

import fnmatch

from omegaconf import DictConfig, OmegaConf

from diffusion_lab.errors import ConfigError

# command ("*": every command) -> {old key (fnmatch pattern): new key}
RENAMED_KEYS = {
    "*": {
        "model.prediction_type": "model.noise_scheduler.prediction_type",
        "model.objective.zero_terminal_snr": "model.noise_scheduler.rescale_betas_zero_snr",
        "trainer.val_check_interval": "val_every_n_steps (optimizer steps)",
        "callbacks.*.dirpath": "callbacks.*.out_dir",
    },
    "sample": {"steps": "num_inference_steps", "out": "out_dir"},
    "eval": {"sampling.steps": "sampling.num_inference_steps"},
    "export": {"ckpt": "ckpt_path", "out": "out_dir"},
    "ema": {"out": "out_dir", "sampling.steps": "sampling.num_inference_steps"},
    "tiny-sd": {"out": "out_dir"},
}
# group=option -> its new name
RENAMED_OPTIONS = {
    "model=ddpm": "model=pixel",
    "model=latent_diffusion": "model=latent",
    "experiment=flow_digits": "the default: flow matching on the digits is `diffusion-lab train` with no "
    "arguments (experiment=ddpm_digits is the former DDPM default)",
}


def _new_name(key: str, command: str) -> str | None:
    for table in (RENAMED_KEYS.get(command, {}), RENAMED_KEYS["*"]):
        for old, new in table.items():
            if fnmatch.fnmatchcase(key, old):
                if "*" in old:  # carry the matched part over: callbacks.sample_grid.dirpath -> ...out_dir
                    middle = key[old.index("*") : len(key) - (len(old) - old.index("*") - 1)]
                    new = new.replace("*", middle)
                return new
    return None


def refuse_renamed_overrides(overrides: list[str], command: str) -> None:
    """A command-line key or group option under its old name: one line naming the new one."""
    for override in overrides:
        if "=" not in override or override.startswith("-"):
            continue
        key, _, value = override.lstrip("+~").partition("=")
        option = f"{key}={value}"
        if option in RENAMED_OPTIONS:
            raise ConfigError(f"{option} is now {RENAMED_OPTIONS[option]}")
        new = _new_name(key, command)
        if new is not None:
            raise ConfigError(f"'{key}' is now '{new}'")


def _keys(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        yield f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _keys(value, f"{prefix}{key}.")


def refuse_renamed_keys(cfg: DictConfig, command: str) -> None:
    """A composed config (an experiment file of the user's, say) that sets a key under its old name."""
    for key in _keys(OmegaConf.to_container(cfg, resolve=False)):
        new = _new_name(key, command)
        if new is not None:
            raise ConfigError(f"'{key}' is now '{new}'")
