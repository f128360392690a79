"""Multi-process training started from a Hydra job, without Hydra's known traps.

Lightning starts ranks 1..N-1 by rerunning the command line. From a Hydra job that goes wrong three ways:
each rank makes its own timestamped output folder (ashleve/lightning-hydra-template#393), a multirun's ranks
start a sweep of their own, and under an Optuna sweep each rank asks the sampler for a different trial
(#639). Here the other ranks rerun *this job's composed config* (`<run>/.hydra/config.yaml`: the trial's
values included) in *this job's folder*, never the sweep.
"""

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher


def rerun_this_job_command(local_rank: int) -> tuple[list[str], str]:
    """The command line that makes another rank of the running Hydra job, and where to run it."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    run_dir = Path(hydra.runtime.output_dir)
    if not hydra.output_subdir or not (run_dir / hydra.output_subdir / "config.yaml").exists():
        raise RuntimeError(
            "multi-process training needs the job's composed config: keep hydra.output_subdir set"
        )
    command = [
        sys.executable, "-m", "diffusion_lab.cli", "train",
        f"--config-path={run_dir / hydra.output_subdir}", "--config-name=config",
        f"hydra.run.dir={run_dir}", "hydra.output_subdir=null", f"hydra.job.name={hydra.job.name}_rank{local_rank}",
    ]  # fmt: skip
    return command, hydra.runtime.cwd


# Set by the launcher for the ranks it starts; left behind, they would make the next job of a multirun
# believe it is one of those ranks.
_LAUNCH_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


class _RerunThisJobLauncher(_SubprocessScriptLauncher):
    def launch(self, function, *args, trainer=None, **kwargs):
        before = {name: os.environ.get(name) for name in _LAUNCH_ENVIRONMENT}
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        finally:
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _call_children_scripts(self) -> None:
        lightnings_command = subprocess_script._hydra_subprocess_cmd
        subprocess_script._hydra_subprocess_cmd = rerun_this_job_command  # used only when Hydra is running
        try:
            super()._call_children_scripts()
        finally:
            subprocess_script._hydra_subprocess_cmd = lightnings_command


class _RerunThisJob:
    """Mixin for Lightning's multi-process strategies: ranks rerun this job; the process group ends with the
    fit, so the next job of a multirun starts a fresh one (with new ranks) instead of reusing a dead one."""

    def _configure_launcher(self) -> None:
        super()._configure_launcher()
        if isinstance(self._launcher, _SubprocessScriptLauncher):
            self._launcher = _RerunThisJobLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes
            )

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class HydraDDPStrategy(_RerunThisJob, DDPStrategy):
    """DDP whose ranks rerun this Hydra job (see the module docstring)."""


class HydraFSDPStrategy(_RerunThisJob, FSDPStrategy):
    """FSDP whose ranks rerun this Hydra job (see the module docstring)."""
