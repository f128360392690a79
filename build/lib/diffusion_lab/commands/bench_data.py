"""`diffusion-lab bench data path=DIR`: DataModule images/s per worker vs a bare PIL loop, same run."""

import json

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
    # Alternate the sides and keep each one's best: a shared machine's noise hits both alike.
    bare, loaders = 0.0, {workers: 0.0 for workers in cfg.workers}
    for _ in range(cfg.repeats):
        bare = max(bare, bare_pil_images_per_second(files, cfg.image_size))
        for workers in cfg.workers:
            speed = datamodule_images_per_second(cfg.path, cfg.split, cfg.image_size, workers, cfg.batch_size)
            loaders[workers] = max(loaders[workers], speed)
    result = {"images": len(files), "image_size": cfg.image_size, "bare_pil_img_s": round(bare, 1)}
    for workers, total in loaders.items():
        per_worker = total / max(1, workers)
        result[f"workers_{workers}"] = {
            "img_s": round(total, 1),
            "per_worker_img_s": round(per_worker, 1),
            "per_worker_vs_bare": round(per_worker / bare, 3),
        }
    print(json.dumps(result))
    return result
