"""Two power-function EMA profiles of the trainable network, snapshotted for post-hoc EMA (`diffusion-lab ema`)."""

import functools
import logging
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from diffusion_lab.callbacks.ema import trainable_names, trainable_parameters
from diffusion_lab.core.power_ema import power_ema_beta, sigma_rel_to_gamma
from diffusion_lab.dtypes import dtype_from_name
from diffusion_lab.errors import ConfigError
from diffusion_lab.runs.atomic import write_file
from diffusion_lab.runs.checksums import tensors_checksum

log = logging.getLogger(__name__)
STORAGE_DTYPES = ("float32", "float16", "bfloat16")


class PostHocEMA(L.Callback):
    """Tracks power-function EMAs (EDM2, arXiv:2312.02696 section 3) of the trainable weights of `pl_module.net`
    (a LoRA run: the adapters), one per `sigma_rels` (EDM2's 0.05 and 0.10 by default), and every
    `snapshot_every` optimizer steps (and at the end) writes each to
    `<out_dir>/<step:07d>_sigma<sigma_rel>.safetensors` in `storage_dtype`, written then renamed. From those
    snapshots `diffusion-lab ema` rebuilds the EMA of any length after training.

    The profiles are float32 on the weights' device (two copies of the trainable weights), part of the Lightning
    checkpoint (a resumed run continues them exactly, and snapshots a crashed attempt wrote past the checkpoint
    it resumes from are moved to `<out_dir>/abandoned/`), updated on every rank alike (DDP keeps the weights
    equal) and written by rank 0 only. Not under FSDP, where each rank holds a shard of the weights.
    """

    end_of_run = True  # work a resumed run with no step left still does (commands.train)

    def __init__(
        self,
        out_dir: str,
        sigma_rels: tuple[float, ...] = (0.05, 0.10),
        snapshot_every: int = 100,
        storage_dtype: str = "float32",
    ) -> None:
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(
                f"callbacks.posthoc_ema.storage_dtype={storage_dtype!r}; choose one of {STORAGE_DTYPES}"
            )
        if snapshot_every < 1:
            raise ValueError(
                f"callbacks.posthoc_ema.snapshot_every must be a positive integer, got {snapshot_every}"
            )
        self.out_dir = Path(out_dir)
        self.sigma_rels = [float(sigma) for sigma in sigma_rels]
        self.gammas = [sigma_rel_to_gamma(sigma) for sigma in self.sigma_rels]
        self.snapshot_every, self.storage_dtype = snapshot_every, storage_dtype
        self.profiles: list[list[torch.Tensor]] | None = None
        self._state_to_load: dict | None = None
        self._restored = False
        self._last_step = 0

    @property
    def state_key(self) -> str:
        return "PostHocEMA"

    def _ensure_profiles(self, pl_module: L.LightningModule) -> list[list[torch.Tensor]]:
        if self.profiles is not None and self._state_to_load is None:  # every step after the first
            return self.profiles
        device = next(iter(trainable_parameters(pl_module))).device
        if self._state_to_load is not None:
            saved, self._state_to_load = self._state_to_load, None
            self.profiles = [[tensor.float() for tensor in profile] for profile in saved["profiles"]]
        if self.profiles is None:
            weights = [p.detach().float().clone() for p in trainable_parameters(pl_module)]
            self.profiles = [[w.clone() for w in weights] for _ in self.gammas]
        self.profiles = [[tensor.to(device) for tensor in profile] for profile in self.profiles]
        return self.profiles

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if "FSDP" in type(trainer.strategy).__name__:
            raise ConfigError(
                "callbacks.posthoc_ema does not run under FSDP (each rank holds a shard of the weights): "
                "use trainer=ddp, or remove it"
            )

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._ensure_profiles(pl_module)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # after a restore: the next optimizer step is the next update
        if trainer.global_step and not self._restored:
            raise ConfigError(
                f"callbacks.posthoc_ema was added to a run resumed at step {trainer.global_step}: its profiles "
                "would start there while their snapshots claim the whole run. Add it from the start"
            )
        if trainer.is_global_zero and self.out_dir.is_dir():  # a crashed attempt's snapshots past this point
            later = [s["path"] for s in read_snapshots(self.out_dir)[0] if s["step"] > trainer.global_step]
            if later:
                (self.out_dir / "abandoned").mkdir(exist_ok=True)
                for path in later:
                    path.rename(self.out_dir / "abandoned" / path.name)
                log.warning(
                    "post-hoc EMA: moved %d snapshots past step %d to abandoned/",
                    len(later),
                    trainer.global_step,
                )

    @torch.no_grad()
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # an accumulation micro-batch, not an optimizer step
            return
        self._last_step = step
        profiles = self._ensure_profiles(pl_module)
        for index, weight in enumerate(
            trainable_parameters(pl_module)
        ):  # one fp32 copy of one tensor at a time
            weight = weight.detach().float()
            for profile, gamma in zip(profiles, self.gammas, strict=True):
                profile[index].lerp_(weight, 1.0 - power_ema_beta(step, gamma))
        if step % self.snapshot_every == 0:
            self._snapshot(trainer, pl_module, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.flush(trainer, pl_module)

    def flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        """Snapshots of the last step too (once), then every snapshot of this run up to it."""
        if (
            self._last_step
            and not (self.out_dir / snapshot_name(self._last_step, self.sigma_rels[-1])).exists()
        ):
            self._snapshot(trainer, pl_module, self._last_step)
        return [s for s in read_snapshots(self.out_dir)[0] if s["step"] <= self._last_step]

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Stopped by a signal (with a checkpoint of this step): the snapshots reach the same step.
        if self.profiles is not None and type(exception).__name__ == "RunInterrupted":
            self.on_train_end(trainer, pl_module)

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        if not trainer.is_global_zero:  # every rank holds the same profiles; one writes them
            return
        names = trainable_names(pl_module.net)
        dtype = dtype_from_name(self.storage_dtype)
        for sigma_rel, gamma, profile in zip(self.sigma_rels, self.gammas, self.profiles, strict=True):
            tensors = {
                name: tensor.to("cpu", dtype).contiguous()
                for name, tensor in zip(names, profile, strict=True)
            }
            metadata = {"step": str(step), "sigma_rel": repr(sigma_rel), "gamma": repr(gamma),
                        "sha256": tensors_checksum(tensors)}  # fmt: skip
            path = self.out_dir / snapshot_name(step, sigma_rel)
            write_file(path, functools.partial(_save, tensors, metadata))
        log.info("post-hoc EMA: snapshots of step %d in %s", step, self.out_dir)

    def state_dict(self) -> dict:
        return {} if self.profiles is None else {"sigma_rels": self.sigma_rels, "profiles": self.profiles}

    def load_state_dict(self, state_dict: dict) -> None:
        if not state_dict:
            return
        self._restored = True
        if state_dict["sigma_rels"] != self.sigma_rels:
            raise ConfigError(
                f"the checkpoint tracked sigma_rels {state_dict['sigma_rels']}, this run {self.sigma_rels}: "
                "resume with the same callbacks.posthoc_ema.sigma_rels"
            )
        if self.profiles is None:
            self._state_to_load = state_dict
        else:  # restored after fit start (FSDP, DeepSpeed): keep the weights' device
            device = self.profiles[0][0].device
            self.profiles = [[t.float().to(device) for t in profile] for profile in state_dict["profiles"]]


def _save(tensors: dict, metadata: dict, path: Path) -> None:
    save_file(tensors, str(path), metadata=metadata)


def snapshot_name(step: int, sigma_rel: float) -> str:
    return f"{step:07d}_sigma{sigma_rel:.4f}.safetensors"


def read_snapshots(folder: str | Path) -> tuple[list[dict], list[tuple[Path, str]]]:
    """(every readable snapshot in `folder`, sorted by (step, gamma): dicts of `step`, `sigma_rel`, `gamma`,
    `path`, `sha256`; the files that could not be read, each with the reason)."""
    from safetensors import safe_open

    snapshots, bad = [], []
    for path in sorted(Path(folder).glob("*_sigma*.safetensors")):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except Exception as error:  # truncated, not safetensors: named, not a bare SafetensorError
            bad.append((path, f"unreadable ({error})"))
            continue
        if not {"step", "sigma_rel", "gamma"} <= metadata.keys():
            bad.append((path, "no step / sigma_rel / gamma in its metadata"))
            continue
        snapshots.append(
            {"step": int(metadata["step"]), "sigma_rel": float(metadata["sigma_rel"]),
             "gamma": float(metadata["gamma"]), "path": path, "sha256": metadata.get("sha256")}
        )  # fmt: skip
    return sorted(snapshots, key=lambda s: (s["step"], s["gamma"])), bad


def verify_snapshot(snapshot: dict) -> str | None:
    """Why the snapshot's tensors do not match the checksum written with them, or None when they do (or it
    predates checksums)."""
    if snapshot.get("sha256") is None:
        return None
    try:
        tensors = load_file(str(snapshot["path"]))
    except Exception as error:
        return f"unreadable ({error})"
    if tensors_checksum(tensors) != snapshot["sha256"]:
        return "its tensors do not match the checksum written with them (flipped or overwritten bytes)"
    return None


def load_snapshot(path: str | Path, names: list[str]) -> list[torch.Tensor]:
    tensors = load_file(str(path))
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ConfigError(
            f"{path} does not hold {missing[0]} (and {len(missing) - 1} more): not this network's snapshot"
        )
    return [tensors[name] for name in names]
