"""Post-hoc EMA: EMA lengths rebuilt after training from a run's snapshots, exported, and scored side by side.

The run trained with `callbacks=[default,posthoc_ema]` (`callbacks/posthoc_ema.py`); its folder holds the
snapshots, `checkpoints/last.ckpt` (the network's architecture, frozen parts and scheduler) and its resolved
config (the data the FID reference comes from).
"""

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from diffusion_lab.callbacks.ema import trainable_names, write_weights
from diffusion_lab.core.power_ema import sigma_rel_to_gamma, solve_weights
from diffusion_lab.errors import ConfigError
from diffusion_lab.posthoc_ema.callback import load_snapshot, read_snapshots, verify_snapshot
from diffusion_lab.runs.atomic import write_file, write_text

log = logging.getLogger(__name__)
SIGMA_GRID = np.geomspace(0.002, 0.285, 120)


@dataclass
class RunFiles:
    folder: Path
    checkpoint: Path
    snapshots: list[dict]
    config: dict

    @classmethod
    def of(cls, run: str | Path, skip_bad: bool = False) -> "RunFiles":
        """The run's files; every snapshot is verified against its checksum first. A bad one is named with its
        reason and refused, or with `skip_bad` dropped with a warning."""
        folder = Path(run).expanduser()
        config_path = folder / "config.yaml"
        if not config_path.is_file():
            raise ConfigError(f"run={folder}: no config.yaml, not a `diffusion-lab train` run folder")
        config = OmegaConf.to_container(OmegaConf.load(config_path))
        snapshot_dir = folder / _snapshots_within_run(config)
        snapshots, bad = read_snapshots(snapshot_dir) if snapshot_dir.is_dir() else ([], [])
        checkpoint = folder / "checkpoints" / "last.ckpt"
        if not checkpoint.is_file():
            raise ConfigError(f"run={folder}: no checkpoints/last.ckpt to take the network from")
        step = torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True).get("global_step")
        if step is not None:  # the lengths are of the checkpoint's run, not of a later attempt that crashed
            snapshots = [s for s in snapshots if s["step"] <= step]
        bad += [(s["path"], reason) for s in tqdm(snapshots, desc="verifying snapshots", unit="file")
                if (reason := verify_snapshot(s)) is not None]  # fmt: skip
        if bad:
            listed = "; ".join(f"{path}: {reason}" for path, reason in bad)
            if not skip_bad:
                raise ConfigError(f"{len(bad)} bad EMA snapshot(s): {listed}. skip_bad=true drops them")
            log.warning("dropping %d bad EMA snapshot(s): %s", len(bad), listed)
            dropped = {path for path, _ in bad}
            snapshots = [s for s in snapshots if s["path"] not in dropped]
        if not snapshots:
            raise ConfigError(
                f"run={folder}: no usable EMA snapshots in {snapshot_dir}; train with "
                "callbacks=[default,posthoc_ema] (text-to-image: callbacks=[text_to_image,posthoc_ema])"
            )
        return cls(folder, checkpoint, snapshots, config)

    @property
    def last_step(self) -> int:
        return max(s["step"] for s in self.snapshots)

    def training_ema(self) -> dict | None:
        """The settings of the run's own EMA callback (a fixed decay or a sigma_rel), if it had one."""
        return (self.config.get("callbacks") or {}).get("ema")


def _snapshots_within_run(config: dict) -> Path:
    """Where the snapshots are, relative to the run folder: a copied or moved run reads its own, never the
    absolute path its config recorded."""
    posthoc = (config.get("callbacks") or {}).get("posthoc_ema") or {}
    recorded, run_dir = posthoc.get("out_dir"), (config.get("paths") or {}).get("output_dir")
    if recorded and run_dir:
        try:
            return Path(recorded).relative_to(run_dir)
        except ValueError:
            pass
    return Path("ema_snapshots")


def profile_error(snapshots: list[dict], sigma_rel: float) -> float:
    """How far the snapshots' best combination is from the profile of `sigma_rel` (relative L2; inf outside
    what a power function can be)."""
    try:
        gamma = sigma_rel_to_gamma(sigma_rel)
    except ValueError:
        return math.inf
    steps, gammas = [s["step"] for s in snapshots], [s["gamma"] for s in snapshots]
    return solve_weights(steps, gammas, max(steps), gamma)[1]


def check_lengths(snapshots: list[dict], sigma_rels: list[float], max_error: float) -> None:
    """One error naming every length the snapshots cannot rebuild, and the range they can."""
    refused = [sigma for sigma in sigma_rels if profile_error(snapshots, sigma) > max_error]
    if refused:
        low, high = valid_range(snapshots, max_error)
        raise ConfigError(
            f"sigma_rel={','.join(f'{s:g}' for s in refused)} cannot be rebuilt from these snapshots (relative "
            f"error of the profile > max_error={max_error}); the valid range here is {low:.3f} to {high:.3f}"
        )


def valid_range(snapshots: list[dict], max_error: float) -> tuple[float, float]:
    """The sigma_rel values the snapshots rebuild within `max_error` (relative L2 error of the profile)."""
    steps, gammas = [s["step"] for s in snapshots], [s["gamma"] for s in snapshots]
    target = max(steps)
    good = [
        s for s in SIGMA_GRID if solve_weights(steps, gammas, target, sigma_rel_to_gamma(s))[1] <= max_error
    ]
    if not good:
        raise ConfigError(f"no EMA length rebuilds within max_error={max_error} from these snapshots")
    return float(min(good)), float(max(good))


def reconstruct(
    snapshots: list[dict], names: list[str], sigma_rel: float, max_error: float
) -> tuple[list, float]:
    """(the EMA of length `sigma_rel` at the last snapshot's step, as tensors in `names` order; the profile's
    relative error). Snapshots are read one at a time: memory holds a float64 sum, one snapshot and the result
    (about five float32 copies of the trainable weights), not all N snapshots."""
    check_lengths(snapshots, [sigma_rel], max_error)  # (one small solve; the snapshots are the cost)
    steps, gammas = [s["step"] for s in snapshots], [s["gamma"] for s in snapshots]
    weights, error = solve_weights(steps, gammas, max(steps), sigma_rel_to_gamma(sigma_rel))
    total = None
    for snapshot, weight in zip(snapshots, weights, strict=True):
        tensors = load_snapshot(snapshot["path"], names)
        if total is None:
            total = [torch.zeros_like(t, dtype=torch.float64) for t in tensors]
        for accumulated, tensor in zip(total, tensors, strict=True):
            accumulated.add_(tensor.to(torch.float64), alpha=float(weight))
    return [t.float() for t in total], error


def exponential_sigma_rel(decay: float, step: int, update_every: int = 1) -> float:
    """Where a fixed-decay EMA sits on the sigma_rel axis: its weights beta^k over the last k updates have a
    standard deviation of sqrt(beta) / (1 - beta) updates (each `update_every` steps), relative to the training
    length (a warm-up is ignored)."""
    return update_every * math.sqrt(decay) / (1 - decay) / step


class Network:
    """The run's trained network, taken from its last checkpoint, into which an EMA can be written and exported."""

    def __init__(self, checkpoint: Path) -> None:
        from diffusion_lab.families import load_checkpoint

        self.family, self.parts, _ = load_checkpoint(checkpoint, use_ema=False)
        self.net = self.parts.net
        self.names = trainable_names(self.net)

    def load(self, tensors: list[torch.Tensor]) -> None:
        write_weights(self.net, self.names, tensors)

    def evaluation_source(self, pipeline: str) -> dict:
        """What `eval` loads for an exported length: the folder, or a LoRA folder on top of the base model."""
        return self.family.evaluation_source(self.parts, pipeline)

    def export(self, out_dir: Path) -> Path:
        from diffusion_lab.families.export import write_pipeline

        return write_pipeline(
            out_dir, [self.net], lambda folder: self.family.save_pipeline(self.parts, folder)
        )


FIELDS = ["kind", "sigma_rel", "gamma", "profile_error", "fid", "kid", "kid_std", "pipeline"]


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    """`ema_sweep.csv` and `ema_sweep.md` (the same rows; the best scored length in bold)."""

    def write_csv(staging: Path) -> None:
        with open(staging, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows({key: row.get(key) for key in FIELDS} for row in rows)

    csv_path = write_file(out / "ema_sweep.csv", write_csv)
    best = best_row(rows)
    lines = [
        "| EMA | sigma_rel | gamma | profile error | FID | KID | pipeline |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["kind"], _number(row["sigma_rel"]), _number(row["gamma"]), _number(row["profile_error"]),
            _number(row.get("fid")), _number(row.get("kid")), row["pipeline"] or "",
        ]  # fmt: skip
        if row is best:
            cells = [f"**{cell}**" if cell else cell for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    if best is not None:
        lines += ["", f"Best: sigma_rel={best['sigma_rel']:.3f} (FID {best['fid']:.4g}): {best['pipeline']}"]
    return csv_path, write_text(out / "ema_sweep.md", "\n".join(lines) + "\n")


def best_row(rows: list[dict]) -> dict | None:
    scored = [row for row in rows if row["kind"] == "post-hoc" and math.isfinite(row.get("fid") or math.nan)]
    return min(scored, key=lambda row: row["fid"]) if scored else None


def _number(value) -> str:
    return "" if value is None else f"{value:.4g}"
