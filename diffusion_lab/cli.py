"""`diffusion-lab COMMAND [overrides]`: each command is a Hydra app over the configs in `conf/`."""

import difflib
import importlib
import os
import sys
from pathlib import Path

import hydra

from diffusion_lab.resolvers import register_resolvers

CONFIG_DIR = Path(__file__).resolve().parent.parent / "conf"

# command -> (module, task function, primary config); `bench` takes a case name first.
COMMANDS = {
    "train": ("diffusion_lab.commands.train", "train", "train"),
    "sample": ("diffusion_lab.commands.sample", "sample", "sample"),
    "eval": ("diffusion_lab.commands.evaluate", "evaluate", "eval"),
    "export": ("diffusion_lab.commands.export", "export", "export"),
    "tiny-sd": ("diffusion_lab.commands.tiny_sd", "tiny_sd", "tiny_sd"),
}
BENCH_CASES = {
    "train": ("diffusion_lab.commands.bench_train", "bench_train", "bench_train"),
    "data": ("diffusion_lab.commands.bench_data", "bench_data", "bench_data"),
    "sampling": ("diffusion_lab.commands.bench_sampling", "bench_sampling", "bench_sampling"),
    "latent_cache": ("diffusion_lab.commands.bench_latent_cache", "bench_latent_cache", "bench_latent_cache"),
}

USAGE = f"""usage: diffusion-lab COMMAND [key=value ...] [-m] [--cfg job] [--help]

commands:
  train              train a model (no arguments: DDPM on the embedded digits)
  sample             images from a checkpoint, pipeline folder or hub id: pretrained=PATH_OR_ID out=DIR
  eval               FID / KID (+ IS, CLIP score) as one JSON line: images=DIR or pretrained=..., vs
                     reference=DIR or data=NAME
  export             Lightning checkpoint -> diffusers pipeline folder: ckpt=PATH out=DIR
  tiny-sd            write a tiny random Stable Diffusion folder for CPU tests: out=DIR
  bench CASE         measure throughput; cases: {", ".join(BENCH_CASES)}

Every config value is overridable (model.lr=1e-4 trainer.max_steps=500); `--help` after a command lists
its config groups. Configs: {CONFIG_DIR}
"""


def _resolve(argv: list[str]) -> tuple[tuple[str, str, str], list[str], str]:
    command, rest = argv[0], argv[1:]
    if command == "bench":
        if not rest or "=" in rest[0] or rest[0].startswith("-"):
            raise SystemExit(f"diffusion-lab bench: name a case first; valid cases: {', '.join(BENCH_CASES)}")
        if rest[0] not in BENCH_CASES:
            raise SystemExit(
                f"diffusion-lab bench: unknown case {rest[0]!r}; valid cases: {', '.join(BENCH_CASES)}"
            )
        return BENCH_CASES[rest[0]], rest[1:], f"bench {rest[0]}"
    if command not in COMMANDS:
        raise SystemExit(
            f"diffusion-lab: unknown command {command!r}; valid commands: {', '.join(COMMANDS)}, bench"
        )
    return COMMANDS[command], rest, command


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return None
    (module_name, function_name, config_name), overrides, label = _resolve(argv)
    register_resolvers()
    # submitit asks SLURM for USR2 before a time-out; Lightning's SLURM auto-requeue (checkpoint, requeue,
    # resume) listens for USR1. Read by submitit when imported, so set before Hydra loads its launcher.
    os.environ.setdefault("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    task = getattr(importlib.import_module(module_name), function_name)
    sys.argv = [f"diffusion-lab {label}", *overrides]
    app = hydra.main(config_path=str(CONFIG_DIR), config_name=config_name, version_base="1.3")(task)
    try:
        return app()
    except SystemExit as exit_:
        if exit_.code:
            hint = explain_bad_overrides(config_name, overrides)
            if hint:
                print(hint, file=sys.stderr)
        raise


def explain_bad_overrides(config_name: str, overrides: list[str]) -> str | None:
    """After Hydra rejects a command line: name the unknown keys, the valid ones beside them, a likely fix."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import DictConfig, OmegaConf

    try:
        parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("-")])
    except Exception:
        return None
    groups = [
        o
        for o in parsed
        if (CONFIG_DIR / o.key_or_group.replace(".", "/")).is_dir() and not o.is_sweep_override()
    ]
    messages = []
    try:
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=[o.input_line for o in groups])
    except Exception:
        return None
    for override in parsed:
        key = override.key_or_group
        if override in groups or override.is_add() or override.is_force_add() or key.startswith("hydra"):
            continue
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
        if not isinstance(parent, DictConfig) or leaf in list(parent):  # `in parent` misses `???` keys
            continue
        valid = sorted(str(k) for k in parent if not str(k).startswith("_"))
        close = difflib.get_close_matches(leaf, valid, n=1)
        where = f"'{parent_key}'" if parent_key else "the top level"
        suggestion = f" Did you mean '{parent_key + '.' if parent_key else ''}{close[0]}'?" if close else ""
        messages.append(
            f"diffusion-lab: unknown config key '{key}'. Valid keys under {where}: {', '.join(valid)}.{suggestion}"
        )
    return "\n".join(messages) or None


if __name__ == "__main__":
    main()
