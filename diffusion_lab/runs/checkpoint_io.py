"""Lightning checkpoints written like every other artefact: temporary in the same folder, fsync, rename."""

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io import TorchCheckpointIO

from diffusion_lab.runs.atomic import write_file
from diffusion_lab.runs.checksums import CHECKSUM_KEY, tensors_checksum
from diffusion_lab.runs.finite import require_finite


class AtomicCheckpointIO(TorchCheckpointIO):
    """A kill or a full disk mid-save leaves the previous file whole (Lightning's own writer stages in `$TMPDIR`
    and copies across filesystems: a torn `last.ckpt` on scratch, NFS or tmpfs). Weights that are not finite
    are refused: a diverged model is never checkpointed. Remote URLs (s3://, gs://) go to Lightning's writer."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        require_finite(checkpoint.get("state_dict", {}).items(), f"to checkpoint {path}")
        checkpoint[CHECKSUM_KEY] = tensors_checksum(checkpoint.get("state_dict", {}))
        write_file(Path(path), lambda temporary: _save(checkpoint, temporary))
        return None


def _save(checkpoint: dict, path: Path) -> None:
    # Through a Python file: a full disk then surfaces as an OSError (torch's own file stream only says
    # "unexpected pos").
    with path.open("wb") as handle:
        torch.save(checkpoint, handle)
