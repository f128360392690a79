"""What `ckpt_path=` resumes from, checked against this run before any training starts."""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from diffusion_lab.callbacks.run_config import RUN_CONFIG
from diffusion_lab.errors import ConfigError
from diffusion_lab.families.checkpoints import current_key, read_checkpoint

log = logging.getLogger(__name__)


def resolve_checkpoint(
    ckpt_path: str | None, checkpoint_dir: str | Path | None, root_dir: str | Path
) -> Path | None:
    """A file; or `last`: this run folder's newest of `last.ckpt` and SLURM's `hpc_ckpt_*.ckpt` (None, said in one
    line, when there is none yet); or, with no `ckpt_path`, a SLURM requeue's `hpc_ckpt_*.ckpt` if there is one."""
    hpc = list(Path(root_dir).glob("hpc_ckpt_*.ckpt"))  # written only by Lightning's SLURM requeue (USR1)
    if not ckpt_path:
        # A requeued SLURM job reruns its command unchanged: Lightning restores its hpc checkpoint by itself.
        return _newest(hpc)
    if ckpt_path != "last":
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"ckpt_path={ckpt_path}: no such checkpoint file")
        return path
    last = Path(checkpoint_dir) / "last.ckpt" if checkpoint_dir is not None else None
    newest = _newest([*hpc, *([last] if last is not None and last.is_file() else [])])
    if newest is None:
        log.warning(
            "ckpt_path=last: no checkpoint in %s yet; starting from step 0", checkpoint_dir or root_dir
        )
    return newest


def _newest(paths: list[Path]) -> Path | None:
    return max(paths, key=lambda path: path.stat().st_mtime) if paths else None


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def config_differences(before: dict, now: dict, prefix: str) -> list[str]:
    """`key: old in the checkpoint, new now` for every leaf that differs between two config trees."""
    old, new = _flat(before, prefix), _flat(now, prefix)
    return [
        f"{key}: {old.get(key, '(absent)')!r} in the checkpoint, {new.get(key, '(absent)')!r} now"
        for key in sorted(old.keys() | new.keys())
        if old.get(key) != new.get(key)
    ]


def check_same_architecture(path: Path, model: torch.nn.Module, cfg: DictConfig) -> int:
    """Raise `ConfigError` naming the config keys that differ when the checkpoint's tensors do not fit `model`
    (instead of Lightning's hundreds of `size mismatch` lines); returns the checkpoint's step."""
    checkpoint = read_checkpoint(path)  # (checksum verified)
    saved = {current_key(key): value for key, value in checkpoint.get("state_dict", {}).items()}
    current = model.state_dict()
    misfits = [key for key in saved if key not in current or saved[key].shape != current[key].shape]
    # Keys only this model has count where they train (slim checkpoints leave the frozen parts out: the VAE,
    # the text encoders and, under LoRA, the UNet's own weights).
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    misfits += [key for key in current if key not in saved and key in trainable]
    if misfits:
        example = misfits[0]
        if example in current and example in saved:
            shapes = f"{tuple(saved[example].shape)} in the checkpoint, {tuple(current[example].shape)} now"
        else:
            shapes = "absent from this model" if example in saved else "absent from the checkpoint"
        recorded = checkpoint.get(RUN_CONFIG)
        if recorded is None:
            keys = "the checkpoint records no config to compare with"
        else:
            now = OmegaConf.to_container(cfg.model, resolve=True)
            differences = config_differences(recorded.get("model", {}), now, "model.")
            keys = "; ".join(differences) or "no model.* key differs (a different code version?)"
        raise ConfigError(
            f"ckpt_path={path} does not fit this model: {len(misfits)} tensors differ "
            f"(e.g. {example}: {shapes}). Config keys that differ: {keys}"
        )
    check_same_shapes(path, checkpoint, cfg)
    check_same_objective(path, checkpoint, model)
    return int(checkpoint.get("global_step", 0))


# Values that set the shape of what the network sees without changing any weight's shape (a UNet takes any
# resolution): a resume with another one would train on without a word.
SHAPE_KEYS = ("data.image_size", "data.channels", "data.buckets", "data.bucket_step", "model.net.sample_size",
              "model.net.in_channels", "model.net.out_channels", "model.net.num_class_embeds")  # fmt: skip


def check_same_shapes(path: Path, checkpoint: dict, cfg: DictConfig) -> None:
    recorded = checkpoint.get(RUN_CONFIG)
    if recorded is None:
        return
    now = OmegaConf.to_container(cfg, resolve=True)
    old, new = _flat(recorded), _flat(now)
    differing = [
        f"{key}: {old[key]!r} in the checkpoint, {new.get(key, '(absent)')!r} now"
        for key in SHAPE_KEYS
        if key in old and old[key] != new.get(key)
    ]
    if differing:
        raise ConfigError(
            f"ckpt_path={path} was trained on other shapes: {'; '.join(differing)}. Resume with the checkpoint's "
            "values, or start a new run"
        )


def check_same_objective(path: Path, checkpoint: dict, model: torch.nn.Module) -> None:
    """A flow checkpoint resumed as DDPM (or the reverse) has weights of the right shapes trained for another
    target: refuse it instead of silently changing the objective mid-run."""
    from diffusion_lab.core.schedulers import flow_settings

    saved = checkpoint.get("diffusers_components", {}).get("noise_scheduler")
    if saved is None:
        return
    trained = "flow_matching" if flow_settings(saved["config"]) else "ddpm"
    current = "flow_matching" if model.objective.kind == "flow" else "ddpm"
    if trained != current:
        raise ConfigError(
            f"ckpt_path={path} was trained with model/objective={trained}; this config has "
            f"model/objective={current}. Resume with model/objective={trained}"
        )
