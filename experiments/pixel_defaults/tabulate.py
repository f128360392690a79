"""Tables, plots and chosen.yaml of the pixel-defaults study from its Optuna sweep folders.

    python experiments/pixel_defaults/tabulate.py digits=multirun/pixel_defaults/<date> [flowers=...] [...]

Writes summary.csv / trials.md (one row per trial, its parameters as columns, best first), fid_<set>.png
(FID per trial in trial order, for sets of more than one trial) and chosen.yaml (the digits study's best
trial, rounded to two significant digits: what conf/ takes as its defaults). `attention_px` is where a trial
put self-attention, read from its composed config: the side of each feature map that had it.
"""

import csv
import math
import sys
from pathlib import Path

import yaml

from diffusion_lab.plots import line_plot

HERE = Path(__file__).parent
PARAMS = [
    "model.lr", "model.lr_scheduler.num_warmup_steps", "data.batch_size", "study.width",
    "model.net.layers_per_block", "study.attention_lowest", "model.objective.timesteps.mean",
    "model.objective.timesteps.std",
]  # fmt: skip


def two_digits(value):
    if isinstance(value, float) and value != 0:
        return float(f"{value:.2g}")
    return value


def trials(sweep: Path) -> list[dict]:
    rows = []
    with (sweep / "summary.csv").open() as handle:
        for row in csv.DictReader(handle):
            overrides = dict(part.split("=", 1) for part in row["overrides"].split() if "=" in part)
            trial = {"trial": int(row["job"]), "status": row["status"]}
            trial.update({key: yaml.safe_load(overrides[key]) for key in PARAMS if key in overrides})
            for key in ("val/fid", "val/kid_mean", "val/ema_sigma_rel", "global_step"):
                trial[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
            trial["attention_px"] = attention_px(Path(row["output_dir"]) / "config.yaml")
            rows.append(trial)
    return sorted(rows, key=lambda r: r["trial"])


def attention_px(config: Path) -> str:
    """The feature-map sides (px) with self-attention in a trial's composed config, e.g. "8 4"."""
    if not config.is_file():
        return ""
    cfg = yaml.safe_load(config.read_text())
    levels, size = cfg["model"]["net"]["attention_levels"], cfg["data"]["image_size"]
    return " ".join(str(size // 2**level) for level, on in enumerate(levels) if on) or "none"


def plot(rows: list[dict], name: str) -> None:
    """FID of each trial in trial order; the dashed line is the best trial."""
    scored = [r for r in rows if math.isfinite(r["val/fid"])]
    best = min(scored, key=lambda r: r["val/fid"])
    line_plot(HERE / f"fid_{name}.png", [r["trial"] for r in scored], [r["val/fid"] for r in scored],
              title=f"pixel defaults study, {name}: FID per trial (500 samples, random_conv)",
              x_label="trial", y_label="FID", reference=("best", best["val/fid"], best["trial"]),
              log_x=False)  # fmt: skip


def main(argv: list[str]) -> None:
    sweeps = dict(arg.split("=", 1) for arg in argv)
    table = []
    for name, folder in sweeps.items():
        rows = trials(Path(folder))
        if len(rows) > 1:
            plot(rows, name)
        table += [{"set": name, **row} for row in rows]
    columns = [
        "set",
        "trial",
        "status",
        "val/fid",
        "val/kid_mean",
        "val/ema_sigma_rel",
        "global_step",
        *PARAMS,
        "attention_px",
    ]
    table.sort(key=lambda r: (r["set"], r["val/fid"] if math.isfinite(r["val/fid"]) else math.inf))
    with (HERE / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in table:
        cells = [
            f"{row.get(c):.4g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    (HERE / "trials.md").write_text("\n".join(lines) + "\n")
    digits = [r for r in table if r["set"] == "digits" and math.isfinite(r["val/fid"])]
    if digits:
        best = digits[0]
        chosen = {
            "study": "digits", "trial": best["trial"], "fid": best["val/fid"],
            "params": {key: two_digits(best[key]) for key in PARAMS if key in best},
            "ema_sigma_rel": best["val/ema_sigma_rel"],
        }  # fmt: skip
        text = "# The digits study's best trial (tabulate.py); conf/ composes to these (tests/test_defaults.py).\n"
        (HERE / "chosen.yaml").write_text(text + yaml.safe_dump(chosen, sort_keys=False))


if __name__ == "__main__":
    main(sys.argv[1:])
