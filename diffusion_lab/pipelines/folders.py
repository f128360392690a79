"""Pipeline folders whose pipeline class diffusers lacks: the class's code travels in the folder."""

import json
import shutil
from pathlib import Path
from types import ModuleType


def save_with_code(pipeline, code: ModuleType, folder: str | Path) -> Path:
    """`pipeline.save_pretrained(folder)`, with the module `code` (self-contained: torch and diffusers only) copied
    in as `pipeline.py` and named by `model_index.json` (`["pipeline", <class>]`), so that
    `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads it without diffusion_lab."""
    folder = Path(folder)
    pipeline.save_pretrained(folder)
    shutil.copyfile(code.__file__, folder / "pipeline.py")
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = ["pipeline", type(pipeline).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return folder


def saved_scheduler(folder: str | Path):
    """The scheduler of a pipeline folder, by the class its config names."""
    import diffusers

    config = diffusers.DDPMScheduler.load_config(Path(folder) / "scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)
