"""Prompt embeddings kept on disk, so a run whose images come from the latent cache never loads its text encoders.

T5-XXL alone is 9.5 GB in bf16 (SD3, Flux): held beside the transformer it decides whether a run fits 24 GB. With
`model.prompt_cache=DIR`, every prompt a run encodes (its captions when they are not cached with the latents, the
empty prompt of caption dropout, the prompt grid's prompts and negative) is looked up in
`DIR/<key>/<sha256 of the prompt>.safetensors`; the text encoders load only to encode what is missing, and the
model releases them once the grid's prompts are in (`LatentDiffusion.prepare_data`). The folder is named by the
same key as the latent cache (`LatentEncoder.key()`: the exact text-encoder files, their dtype, the prompt
settings), so a change never reads stale rows. Rows are float32 and written then renamed, one file per prompt:
two ranks writing the same prompt write the same bytes, and a kill leaves no torn file.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffusion_lab.families.prompts import PromptEmbeddings
from diffusion_lab.runs.atomic import write_file


class PromptCache:
    """`cache(prompts, device) -> PromptEmbeddings`, the same as `encoder.encode_prompts` returns."""

    def __init__(self, encoder, cache_dir: str | Path) -> None:
        self.encoder, self.cache_dir = encoder, Path(cache_dir)
        self._folder: Path | None = None
        self.encoded = 0  # prompts this process encoded (cache misses), for logs and tests

    @property
    def folder(self) -> Path:
        if self._folder is None:
            key = json.dumps(self.encoder.key(), sort_keys=True)
            self._folder = self.cache_dir / hashlib.sha256(key.encode()).hexdigest()[:20]
        return self._folder

    def path(self, prompt: str) -> Path:
        return self.folder / f"{hashlib.sha256(prompt.encode()).hexdigest()[:32]}.safetensors"

    def _read(self, prompt: str) -> dict | None:
        path = self.path(prompt)
        return load_file(str(path)) if path.is_file() else None

    def fill(self, prompts: Sequence[str], device, batch_size: int = 16) -> int:
        """Encode and store the prompts not cached yet (loading the text encoders if any is missing); returns how
        many were encoded."""
        missing = [prompt for prompt in dict.fromkeys(prompts) if not self.path(prompt).is_file()]
        if missing:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.encoder.to(device)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            embeddings = self.encoder.encode_prompts(chunk, device)
            for row, prompt in enumerate(chunk):
                tensors = {"hidden": embeddings.hidden[row].float().cpu().contiguous()}
                if embeddings.pooled is not None:
                    tensors["pooled"] = embeddings.pooled[row].float().cpu().contiguous()
                write_file(self.path(prompt), lambda temporary, t=tensors: save_file(t, str(temporary)))
        self.encoded += len(missing)
        return len(missing)

    def __call__(self, prompts: Sequence[str], device) -> PromptEmbeddings:
        prompts = list(prompts)
        self.fill(prompts, device)
        rows = {prompt: self._read(prompt) for prompt in dict.fromkeys(prompts)}
        hidden = torch.stack([rows[prompt]["hidden"] for prompt in prompts]).to(device)
        pooled = None
        if "pooled" in rows[prompts[0]]:
            pooled = torch.stack([rows[prompt]["pooled"] for prompt in prompts]).to(device)
        return PromptEmbeddings(hidden, pooled)
