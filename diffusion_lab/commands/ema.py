"""`diffusion-lab ema run=RUN_DIR sigma_rel=0.03,0.05,0.1,0.2 [score=true]`: post-hoc EMA lengths of a run."""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from diffusion_lab.commands.inputs import require_positive
from diffusion_lab.core.power_ema import sigma_rel_to_gamma
from diffusion_lab.errors import ConfigError
from diffusion_lab.plots import line_plot
from diffusion_lab.posthoc_ema.sweep import (
    Network,
    RunFiles,
    best_row,
    check_lengths,
    exponential_sigma_rel,
    reconstruct,
    valid_range,
    write_tables,
)

log = logging.getLogger(__name__)


def _sigma_rels(value) -> list[float]:
    """The lengths asked for, in increasing order, once each (they name folders at 3 decimals)."""
    values = list(value) if OmegaConf.is_list(value) or isinstance(value, list | tuple) else [value]
    try:
        return sorted({round(float(v), 3) for v in values})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"sigma_rel={value!r}: give numbers, e.g. sigma_rel=0.03,0.05,0.1,0.2") from error


def _scoring_config(cfg: DictConfig, run: RunFiles) -> DictConfig:
    """`eval`'s settings (protocol, sample count, seeds, extractor), the reference from the run's data unless
    one was named."""
    scoring = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # (not struct: keys may be added)
    if not (cfg.reference or cfg.get("data")):
        scoring.data = run.config["data"]
    return scoring


def _on_axis(sigma_rel: float) -> float | None:
    """A fixed-decay EMA longer than a uniform average of the whole run (1/sqrt(12)) has no place on the axis."""
    return sigma_rel if sigma_rel < 12**-0.5 else None


def ema(cfg: DictConfig) -> dict:
    from diffusion_lab.commands.evaluate import evaluate

    require_positive(cfg, "num_samples", "batch_size", "sampling.num_inference_steps")
    run = RunFiles.of(cfg.run, skip_bad=cfg.skip_bad)
    out = Path(cfg.out_dir) if cfg.out_dir else run.folder / "ema_sweep"
    sigmas = _sigma_rels(cfg.sigma_rel)
    check_lengths(run.snapshots, sigmas, cfg.max_error)  # before anything is exported
    low, high = valid_range(run.snapshots, cfg.max_error)
    log.info(
        "%d snapshots up to step %d rebuild sigma_rel %.3f to %.3f",
        len(run.snapshots),
        run.last_step,
        low,
        high,
    )
    network = Network(run.checkpoint)
    rows = []
    for sigma in tqdm(sigmas, desc="post-hoc EMA", unit="length"):
        tensors, error = reconstruct(run.snapshots, network.names, sigma, cfg.max_error)
        network.load(tensors)
        path = network.export(out / f"sigma_{sigma:.3f}")
        rows.append({"kind": "post-hoc", "sigma_rel": sigma, "gamma": sigma_rel_to_gamma(sigma),
                     "profile_error": error, "pipeline": str(path)})  # fmt: skip
    training_ema = run.training_ema()
    if cfg.score:
        scoring = _scoring_config(cfg, run)
        for row in rows:
            source = network.evaluation_source(row["pipeline"])
            scores = evaluate(OmegaConf.merge(scoring, {**source, "ckpt_path": None, "images": None}))
            row.update(fid=scores["fid"], kid=scores["kid_mean"], kid_std=scores["kid_std"])
        if training_ema is not None:  # the run's own EMA, for comparison
            decay, every = float(training_ema["decay"]), int(training_ema.get("update_every", 1))
            scores = evaluate(
                OmegaConf.merge(
                    scoring,
                    {
                        "ckpt_path": str(run.checkpoint),
                        "pretrained": None,
                        "lora": None,
                        "images": None,
                        "use_ema": True,
                    },
                )
            )
            pipeline = run.folder / "pipeline"
            if training_ema.get("sigma_rel") is not None:  # a power-function EMA: already on the axis
                kind, sigma = (
                    f"training EMA sigma_rel {training_ema['sigma_rel']}",
                    float(training_ema["sigma_rel"]),
                )
            else:
                kind, sigma = f"fixed decay {decay}", exponential_sigma_rel(decay, run.last_step, every)
            rows.append({"kind": kind, "sigma_rel": sigma,
                         "gamma": None, "profile_error": None, "fid": scores["fid"], "kid": scores["kid_mean"],
                         "kid_std": scores["kid_std"], "pipeline": str(pipeline) if pipeline.is_dir() else None})  # fmt: skip
    csv_path, md_path = write_tables(rows, out)
    summary = {"run": str(run.folder), "step": run.last_step, "valid_sigma_rel": [round(low, 4), round(high, 4)],
               "table": str(csv_path), "markdown": str(md_path), "pipelines": [row["pipeline"] for row in rows]}  # fmt: skip
    best = best_row(rows)
    if best is not None:
        fixed = next((row for row in rows if row["kind"] != "post-hoc"), None)
        posthoc = [row for row in rows if row["kind"] == "post-hoc"]
        summary["plot"] = str(
            line_plot(
                out / "ema_sweep.png", [row["sigma_rel"] for row in posthoc], [row["fid"] for row in posthoc],
                title=f"post-hoc EMA at step {run.last_step}: FID against EMA length", x_label="sigma_rel (log)",
                y_label="FID", reference=(fixed["kind"], fixed["fid"], _on_axis(fixed["sigma_rel"])) if fixed else None,
            )
        )  # fmt: skip
        summary["best"] = {"sigma_rel": best["sigma_rel"], "fid": best["fid"], "pipeline": best["pipeline"]}
        if fixed is not None:
            summary["fixed_ema_fid"] = fixed["fid"]
        print(
            f"best EMA length: sigma_rel={best['sigma_rel']:.3f} (FID {best['fid']:.4g}) -> {best['pipeline']}"
        )
    print(json.dumps(summary))
    return summary
