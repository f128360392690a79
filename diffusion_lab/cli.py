"""`diffusion-lab COMMAND [overrides]`: each command is a Hydra app over the configs shipped in `conf/`."""

import functools
import importlib
import logging
import os
import sys

import hydra
from omegaconf.errors import MissingMandatoryValue

from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.atomic import require_writable
from diffusion_lab.runs.overrides import (
    CONFIG_MODULE,
    admit_library_arguments,
    bracket_lists,
    explain_bad_overrides,
)
from diffusion_lab.runs.renamed import refuse_renamed_overrides
from diffusion_lab.runs.resolvers import register_resolvers

log = logging.getLogger(__name__)


# command -> (module, task function, primary config); `bench` takes a case name first.
COMMANDS = {
    "train": ("diffusion_lab.commands.train", "train", "train"),
    "sample": ("diffusion_lab.commands.sample", "sample", "sample"),
    "eval": ("diffusion_lab.commands.evaluate", "evaluate", "eval"),
    "export": ("diffusion_lab.commands.export", "export", "export"),
    "ema": ("diffusion_lab.commands.ema", "ema", "ema"),
    "tiny-sd": ("diffusion_lab.commands.tiny_sd", "tiny_sd", "tiny_sd"),
}
LIST_KEYS = {"ema": ("sigma_rel",)}  # command -> keys whose comma-separated values are one list
BENCH_CASES = {
    "train": ("diffusion_lab.benchmarks.train_step", "bench_train", "bench_train"),
    "data": ("diffusion_lab.benchmarks.data_loading", "bench_data", "bench_data"),
    "sampling": ("diffusion_lab.benchmarks.sampling", "bench_sampling", "bench_sampling"),
    "latent_cache": ("diffusion_lab.benchmarks.latent_cache", "bench_latent_cache", "bench_latent_cache"),
    "quality": ("diffusion_lab.benchmarks.quality", "bench_quality", "bench_quality"),
}

USAGE = f"""usage: diffusion-lab COMMAND [key=value ...] [-m] [--cfg job] [--help]

commands:
  train              train a model (no arguments: flow matching on the embedded digits)
  sample             images from a Lightning checkpoint (ckpt_path=FILE) or a diffusers pipeline
                     (pretrained=DIR_OR_HUB_ID): out_dir=DIR
  eval               FID / KID (+ IS, CLIP score) as one JSON line: images=DIR, ckpt_path=... or
                     pretrained=..., vs reference=DIR or data=NAME
  export             Lightning checkpoint -> diffusers pipeline folder: ckpt_path=FILE out_dir=DIR
  ema                post-hoc EMA lengths of a run (callbacks=[default,posthoc_ema]): run=DIR
                     sigma_rel=0.03,0.05,0.1,0.2 [score=true]
  tiny-sd            write a tiny random Stable Diffusion folder for CPU tests: out_dir=DIR
  bench CASE         measure throughput (quality: FID beside denoising_diffusion_pytorch); cases: {", ".join(BENCH_CASES)}

Every config value is overridable (model.lr=1e-4 trainer.max_steps=500); `--help` after a command lists
its config groups. Configs: the package {CONFIG_MODULE} (conf/ in a checkout)
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
    try:
        refuse_renamed_overrides(overrides, label)
        for override in overrides:  # Hydra logs into the run folder before any task runs: check it first
            if override.startswith(("hydra.run.dir=", "hydra.sweep.dir=")):
                require_writable(override.split("=", 1)[1])
    except ConfigError as error:
        print(f"diffusion-lab: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    overrides = admit_library_arguments(config_name, bracket_lists(overrides, LIST_KEYS.get(label, ())))
    task = report_errors(getattr(importlib.import_module(module_name), function_name))
    sys.argv = [f"diffusion-lab {label}", *overrides]
    app = hydra.main(config_path=f"pkg://{CONFIG_MODULE}", config_name=config_name, version_base="1.3")(task)
    try:
        return app()
    except SystemExit as exit_:
        if exit_.code == 1:  # Hydra's own refusal of the command line (ours are 2, 3, 130, 143)
            hint = explain_bad_overrides(config_name, overrides)
            if hint:
                print(hint, file=sys.stderr)
        raise


def report_errors(task):
    """A `ConfigError` (a value the run cannot start with) is one logged line and exit status 2; any other
    error also goes, with its traceback, into the job's log file (Hydra prints it on the terminal)."""

    @functools.wraps(task)
    def run(cfg):
        try:
            return task(cfg)
        except Exception as error:
            if isinstance(error.__cause__, ConfigError):  # raised by a constructor Hydra called
                error = error.__cause__
            if isinstance(error, MissingMandatoryValue):  # a `???` in the config nobody set
                key = error.full_key
                error = ConfigError(f"{key} has no value (??? in the config): set {key}=...")
            if isinstance(error, ConfigError):
                log.error("diffusion-lab: %s", error)
                raise SystemExit(2) from None
            record = log.makeRecord(
                log.name, logging.ERROR, __file__, 0, f"fatal: {error!r}", None, sys.exc_info()
            )
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.handle(record)
            raise

    return run


if __name__ == "__main__":
    main()
