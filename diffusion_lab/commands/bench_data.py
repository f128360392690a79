"""`diffusion-lab bench data path=DIR`: DataModule images/s, decoded and from the pixel cache, per worker, next
to a bare PIL loop, in the same run."""

import json
import tempfile

from omegaconf import DictConfig

from diffusion_lab.benchmarks.data_loading import (
    bare_pil_images_per_second,
    datamodule_images_per_second,
    image_files,
)


def bench_data(cfg: DictConfig) -> dict:
    files = image_files(cfg.path, cfg.split)
    if not files:
        raise SystemExit(f"no images under {cfg.path}/{cfg.split}")
    with tempfile.TemporaryDirectory(prefix="bench_pixel_cache_") as cache_dir:
        # Alternate the sides and keep each one's best: a shared machine's noise hits both alike.
        bare = 0.0
        speeds = {(workers, side): 0.0 for workers in cfg.workers for side in ("decoded", "cached")}
        for _ in range(cfg.repeats):
            bare = max(bare, bare_pil_images_per_second(files, cfg.image_size))
            for workers, side in speeds:
                speed = datamodule_images_per_second(
                    cfg.path, cfg.split, cfg.image_size, workers, cfg.batch_size,
                    pixel_cache_dir=cache_dir if side == "cached" else None,
                )  # fmt: skip
                speeds[workers, side] = max(speeds[workers, side], speed)
    result = {"images": len(files), "image_size": cfg.image_size, "bare_pil_img_s": round(bare, 1)}
    for workers in cfg.workers:
        decoded, cached = speeds[workers, "decoded"], speeds[workers, "cached"]
        per_worker = decoded / max(1, workers)
        result[f"workers_{workers}"] = {
            "img_s": round(decoded, 1),
            "per_worker_img_s": round(per_worker, 1),
            "per_worker_vs_bare": round(per_worker / bare, 3),
            "cached_img_s": round(cached, 1),
            "cached_vs_decoded": round(cached / decoded, 2),
        }
    print(json.dumps(result))
    return result
