"""Quality at equal wall-clock: the project's default against denoising_diffusion_pytorch's defaults.

The project's side is `diffusion-lab train` itself (a child process, the user's command, with only the data and
`trainer.max_time` given). The peer's side is lucidrains' `Unet` + `GaussianDiffusion` with their own objective,
schedule and sampler, trained the way their `Trainer` trains them (Adam at lr 1e-4 with betas (0.9, 0.99),
gradient norm clipped at 1, ema-pytorch EMA of decay 0.995 every 10 steps) for the same seconds, on batches of
the same DataModule. Both are scored here by the same code: the same extractor, sample count, seeds' count and
number of network evaluations.
"""

import json
import logging
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion_lab.benchmarks.counting import count_flops, parameters_m
from diffusion_lab.errors import ConfigError
from diffusion_lab.families import load_checkpoint
from diffusion_lab.generation import SampleSettings
from diffusion_lab.images import save_grid
from diffusion_lab.metrics.evaluation import evaluation_plan, score_images, score_sampler
from diffusion_lab.metrics.features import extract_features
from diffusion_lab.metrics.protocol import check_protocol
from diffusion_lab.metrics.reference import dataset_batches
from diffusion_lab.runs.atomic import write_text
from diffusion_lab.runs.children import die_with_parent

log = logging.getLogger(__name__)
INSTALL_HINT = "pip install 'diffusion_lab[peers]' (or pip install denoising-diffusion-pytorch==2.3.4)"


def import_peer():
    """The peer package, or a ConfigError saying how to install it."""
    try:
        import denoising_diffusion_pytorch
        from ema_pytorch import EMA
    except ImportError as error:
        raise ConfigError(f"bench quality trains denoising_diffusion_pytorch beside the project: {INSTALL_HINT} "
                          f"({error})") from None  # fmt: skip
    return denoising_diffusion_pytorch, EMA


def forward_gflop(net: torch.nn.Module, inputs: tuple) -> float:
    """GFLOP of one forward pass on one image (one network evaluation of sampling)."""
    with torch.no_grad():
        return count_flops(lambda: net(*inputs)) / 1e9


def train_project(cfg: DictConfig, data_overrides: list[str], out_dir: Path) -> Path:
    """`diffusion-lab train` on the same data for `minutes`, in its own folder; its last checkpoint. The step
    cap is lifted (a schedule over it is then flat): the budget is time."""
    minutes, seconds = divmod(max(1, round(cfg.minutes * 60)), 60)
    hours, minutes = divmod(minutes, 60)
    run_dir = out_dir / "project"
    command = [
        sys.executable, "-m", "diffusion_lab.cli", "train", *data_overrides, f"seed={cfg.seed}",
        f"trainer.max_time=00:{hours:02d}:{minutes:02d}:{seconds:02d}", "trainer.max_steps=100000000", f"hydra.run.dir={run_dir}",
        "run_name=bench_quality_project", *cfg.project_overrides,
    ]  # fmt: skip
    log.info("project side: %s", " ".join(command))
    subprocess.run(command, check=True, preexec_fn=die_with_parent)  # a killed bench leaves no orphan run
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    if not checkpoint.is_file():
        raise RuntimeError(f"the project's run wrote no {checkpoint}")
    return checkpoint


def peer_batches(datamodule, seed: int):
    """The DataModule's training batches as the peer takes them: [0, 1] floats (its auto_normalize), flipped
    at random where the data config flips (its Trainer's augment_horizontal_flip)."""
    flip = bool(getattr(datamodule, "hparams", {}).get("random_flip", False))
    generator = torch.Generator().manual_seed(seed)
    while True:
        for batch in datamodule.train_dataloader():
            pixels = (datamodule.on_after_batch_transfer(batch, 0)["pixels"].float() + 1) / 2
            if flip:
                flips = torch.rand(len(pixels), generator=generator) < 0.5
                pixels = torch.where(flips[:, None, None, None], pixels.flip(-1), pixels)
            yield pixels


def train_peer(cfg: DictConfig, datamodule, image_size: int, channels: int):
    """lucidrains' model trained like his Trainer for `minutes` of wall-clock; (EMA diffusion model, steps)."""
    package, EMA = import_peer()
    torch.manual_seed(cfg.seed)
    unet = package.Unet(dim=cfg.peer.dim, dim_mults=tuple(cfg.peer.dim_mults), channels=channels)
    diffusion = package.GaussianDiffusion(
        unet, image_size=image_size, timesteps=1000, sampling_timesteps=cfg.num_inference_steps
    )  # its defaults: objective pred_v, sigmoid schedule; DDIM when sampling_timesteps < timesteps
    trainer_defaults = cfg.peer.trainer
    optimizer = torch.optim.Adam(diffusion.parameters(), lr=trainer_defaults.train_lr,
                                 betas=tuple(trainer_defaults.adam_betas))  # fmt: skip
    ema = EMA(diffusion, beta=trainer_defaults.ema_decay, update_every=trainer_defaults.ema_update_every)
    batches, steps = peer_batches(datamodule, cfg.seed), 0
    deadline = time.perf_counter() + cfg.minutes * 60
    with tqdm(desc="peer training", unit="step") as progress:
        while time.perf_counter() < deadline:
            loss = diffusion(next(batches))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(diffusion.parameters(), trainer_defaults.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            ema.update()
            steps += 1
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.4f}")
    return ema.ema_model.eval(), steps


def peer_images(model, num_samples: int, batch_size: int, seed: int):
    """[-1, 1] samples of the peer's own sampler, batch by batch."""
    torch.manual_seed(seed)
    for start in tqdm(range(0, num_samples, batch_size), desc="peer sampling", unit="batch"):
        with torch.no_grad():
            yield model.sample(batch_size=min(batch_size, num_samples - start)) * 2 - 1


def bench_quality(cfg: DictConfig) -> dict:
    """`diffusion-lab bench quality`: both sides trained for `minutes`, scored alike; one JSON line."""
    from hydra.core.hydra_config import HydraConfig

    import_peer()  # before any training: a missing peer is said at once
    if cfg.minutes <= 0 or cfg.num_samples < 2 or cfg.num_inference_steps < 1:
        raise ConfigError("bench quality needs minutes > 0, num_samples >= 2 and num_inference_steps >= 1")
    protocol = check_protocol(cfg.fid_protocol)
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    given = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    data_overrides = [o for o in given if o.lstrip("+~").split("=", 1)[0].split(".")[0] in ("data", "paths")]

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    extractor = instantiate(cfg.feature_extractor).eval().requires_grad_(False)
    reference = extract_features(extractor, dataset_batches(datamodule, cfg.reference_split, cfg.batch_size),
                                 protocol, progress=True, description="reference features")  # fmt: skip
    options = dict(kid_subset_size=min(cfg.kid_subset_size, cfg.num_samples, len(reference)),
                   kid_subsets=cfg.kid_subsets, inception_score=False, seed=cfg.seed)  # fmt: skip

    checkpoint = train_project(cfg, data_overrides, out_dir)
    family, parts, _ = load_checkpoint(checkpoint)  # the EMA weights, as the export and the grids use them
    sampler = family.sampler(parts)
    settings = SampleSettings(num_inference_steps=cfg.num_inference_steps)
    plan = evaluation_plan(sampler, cfg.num_samples, cfg.seed)
    shown: list[torch.Tensor] = []  # the grid: the first 64 of the scored images, not sampled again

    def keep_for_grid(start: int, images: torch.Tensor) -> None:
        shown.append(images[: max(0, 64 - start)])

    project_scores = score_sampler(sampler, plan, settings, reference, extractor, protocol, cfg.batch_size,
                                   "cpu", progress=True, on_batch=keep_for_grid, **options)  # fmt: skip
    size, channels = cfg.data.image_size, cfg.data.channels
    probe = torch.zeros(1, channels, size, size)
    project = {
        "fid": project_scores["fid"], "kid": project_scores["kid_mean"], "kid_std": project_scores["kid_std"],
        "steps": torch.load(checkpoint, map_location="cpu", weights_only=False, mmap=True)["global_step"],
        "params_m": parameters_m(parts.net),
        "gflop_per_image": round(forward_gflop(parts.net, (probe, torch.zeros(1))), 4),
        "sampler": f"{type(sampler.scheduler(settings)).__name__}-{cfg.num_inference_steps}",
    }  # fmt: skip
    save_grid(torch.cat(shown), out_dir / "project_samples.png")

    model, peer_steps = train_peer(cfg, datamodule, size, channels)
    peer_generated = list(peer_images(model, cfg.num_samples, cfg.batch_size, cfg.seed))
    peer_features = extract_features(extractor, iter(peer_generated), protocol)
    peer_scores = score_images(peer_features, reference, extractor, protocol, **options)
    peer = {
        "fid": peer_scores["fid"], "kid": peer_scores["kid_mean"], "kid_std": peer_scores["kid_std"],
        "steps": peer_steps, "params_m": parameters_m(model.model),
        "gflop_per_image": round(forward_gflop(model.model, (probe, torch.zeros(1))), 4),
        "sampler": f"DDIM-{cfg.num_inference_steps} (pred_v, sigmoid schedule)",
    }  # fmt: skip
    save_grid(torch.cat(peer_generated)[:64], out_dir / "peer_samples.png")

    result = {
        "minutes": cfg.minutes, "data": OmegaConf.select(cfg, "data.path") or "digits", "image_size": size,
        "batch_size": cfg.data.batch_size, "num_samples": cfg.num_samples, "nfe": cfg.num_inference_steps,
        "reference": len(reference), "extractor": type(extractor).__name__, "project": project, "peer": peer,
        "fid_ratio": round(project["fid"] / peer["fid"], 4) if peer["fid"] > 0 else math.nan,
        "kid_ratio": round(project["kid"] / peer["kid"], 4) if peer["kid"] > 0 else math.nan,
        "out_dir": str(out_dir),
    }  # fmt: skip
    write_text(out_dir / "result.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result
