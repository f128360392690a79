"""summary.csv, summary.md and fid_per_nfe.png from results.jsonl (reproduce.sh)."""

import csv
import json
import sys
from pathlib import Path

from diffusion_lab.plots import line_plot

HERE = Path(__file__).parent
NFE_PER_STEP = {"heun": 2}  # Heun evaluates the network twice per step (its last step once)


def nfe(row: dict) -> int:
    return row["steps"] * NFE_PER_STEP.get(row["scheduler"], 1) - (1 if row["scheduler"] == "heun" else 0)


def main(path: str) -> None:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    for row in rows:
        row["nfe"] = nfe(row)
    fields = ["scheduler", "steps", "nfe", "fid", "kid_mean", "kid_std", "seconds"]
    with (HERE / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    schedulers = list(dict.fromkeys(row["scheduler"] for row in rows))
    steps = sorted({row["steps"] for row in rows})
    lines = ["| sampler | " + " | ".join(f"{s} steps: FID (KID x1e-3)" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]  # fmt: skip
    for scheduler in schedulers:
        cells = []
        for s in steps:
            row = next(r for r in rows if r["scheduler"] == scheduler and r["steps"] == s)
            cells.append(f"{row['fid']:.4f} ({row['kid_mean'] * 1e3:.2f}), NFE {row['nfe']}")
        lines.append(f"| {scheduler} | " + " | ".join(cells) + " |")
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    former = next((r for r in rows if r["scheduler"] == "euler" and r["steps"] == 50), None)
    for scheduler in schedulers:
        mine = sorted((r for r in rows if r["scheduler"] == scheduler), key=lambda r: r["nfe"])
        line_plot(HERE / f"fid_per_nfe_{scheduler}.png", [r["nfe"] for r in mine], [r["fid"] for r in mine],
                  title=f"default flow model, {scheduler}: FID per NFE (500 samples, random_conv)",
                  x_label="NFE", y_label="FID",
                  reference=("euler-50 (the former default)", former["fid"], 50) if former else None)  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1])
