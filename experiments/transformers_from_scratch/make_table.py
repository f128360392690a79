"""The table of the transformers-from-scratch study from its sweep folders.

    python experiments/transformers_from_scratch/make_table.py ARMS_SWEEP REPA_SWEEP STAND_IN.safetensors

Writes summary.csv and table.md here (one row per arm: its network's parameters and forward GFLOP per image,
optimizer steps and training images per second in the budget, FID and KID of 500 samples) and copies each arm's final
sample grid as samples_<arm>.png.
"""

import csv
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml
from hydra.utils import instantiate

from diffusion_lab.benchmarks.counting import count_flops, parameters_m

HERE = Path(__file__).parent
ARMS = {  # preset -> label, in the table's order
    "unet": "UNet (default, unet_small)",
    "sit_tiny": "SiT-tiny/2",
    "sit_s": "SiT-S/4",
    "sit_sra": "SiT-tiny/2 + SRA",
    "sit_repa": "SiT-tiny/2 + REPA (stand-in ViT-Ti/16)",
}


def network_cost(config: Path) -> tuple[float, float]:
    """(parameters in millions, forward GFLOP per image) of the arm's network, rebuilt from its config."""
    cfg = yaml.safe_load(config.read_text())
    net = instantiate(cfg["model"]["net"])
    size, channels = cfg["data"]["image_size"], cfg["data"]["channels"]
    x = torch.zeros(1, channels, size, size)
    with torch.no_grad():
        flops = count_flops(lambda: net(x, torch.tensor([500.0])))
    return parameters_m(net), flops / 1e9


def rows_of(sweep: Path) -> list[dict]:
    rows = []
    with (sweep / "summary.csv").open() as handle:
        for row in csv.DictReader(handle):
            overrides = dict(part.split("=", 1) for part in row["overrides"].split() if "=" in part)
            preset = overrides["backbone_preset"]
            run_dir = Path(row["output_dir"])
            params, gflop = network_cost(run_dir / "config.yaml")
            cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
            days, hours, minutes, seconds = (int(part) for part in cfg["trainer"]["max_time"].split(":"))
            budget_s = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
            steps = int(float(row["global_step"]))
            rows.append({
                "arm": ARMS[preset], "preset": preset, "status": row["status"], "params_m": round(params, 2),
                "gflop_per_image": round(gflop, 3), "steps": steps,
                "train_images_per_s": round(steps * cfg["data"]["batch_size"] / budget_s, 1), "fid": float(row["val/fid"]),
                "kid_1e3": 1e3 * float(row["val/kid_mean"]), "kid_std_1e3": 1e3 * float(row["val/kid_std"]),
            })  # fmt: skip
            if (run_dir / "samples" / "final.png").is_file():
                shutil.copyfile(run_dir / "samples" / "final.png", HERE / f"samples_{preset}.png")
    return rows


def main(*arguments: str) -> None:
    *sweeps, encoder = arguments
    rows = [row for sweep in sweeps for row in rows_of(Path(sweep))]
    rows.sort(key=lambda row: list(ARMS).index(row["preset"]))
    with (HERE / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best = min(row["fid"] for row in rows)
    lines = [
        "| arm | params (M) | GFLOP / image | steps | img/s | FID | KID (x1e-3) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fid = f"**{row['fid']:.3g}**" if row["fid"] == best else f"{row['fid']:.3g}"
        lines.append(f"| {row['arm']} | {row['params_m']} | {row['gflop_per_image']} | {row['steps']} | "
                     f"{row['train_images_per_s']} | {fid} | {row['kid_1e3']:.3g} ± {row['kid_std_1e3']:.2g} |")  # fmt: skip
    stand_in = json.loads(Path(encoder).with_suffix(".json").read_text())
    lines += ["", f"Stand-in encoder: {stand_in['encoder']} at {stand_in['image_size']} px, {stand_in['epochs']} "
              f"epochs on {stand_in['train_images']} photos, test accuracy {stand_in['test_accuracy']:.1%} "
              f"(chance {stand_in['chance']:.1%})."]  # fmt: skip
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:])
