"""Images and captions -> what a latent family's network sees, the same for live and cached data.

Training (`models.LatentDiffusion`) and the latent cache (`data.LatentCacheDataModule`, given one of these by
its config) call the same methods, so a cached run trains on exactly what an uncached one computes.
"""

import contextlib
from collections.abc import Sequence

import torch

from diffusion_lab.dtypes import dtype_from_name
from diffusion_lab.families.prompts import PromptEmbeddings
from diffusion_lab.families.sd_parts import (
    frozen_parts_fingerprint,
    load_vae,
    pipeline_index,
    vae_fingerprint,
)


class LatentEncoder:
    """The frozen VAE and text encoder(s) of `pretrained` (and the replacement `vae`, if any), loaded on
    first use unless `frozen` hands over parts already loaded; with no `pretrained`, the VAE `vae` alone (a
    network trained from scratch on its latents: the latent DiT). `vae_dtype` (None: follow training) keeps the
    VAE in its own dtype outside autocast: the SD VAE overflows in fp16 (diffusers issue 4424)."""

    def __init__(
        self,
        pretrained: str | None,
        revision: str | None = None,
        vae: str | None = None,
        vae_dtype: str | None = "float32",
        text_encoder_dtype: str | None = None,
        frozen: dict | None = None,
        max_sequence_length: int | None = None,
        use_t5: bool = True,
    ) -> None:
        self.pretrained, self.revision, self.vae_name = pretrained, revision, vae
        # the T5 families' prompt settings (`model.max_sequence_length`, `model.use_t5`): they change the embeddings
        self.text = {"max_sequence_length": max_sequence_length, "use_t5": bool(use_t5)}
        self.vae_dtype, self.text_encoder_dtype = vae_dtype, text_encoder_dtype
        self._frozen = None if frozen is None else dict(frozen)
        self._device = torch.device("cpu")
        self._fingerprint: str | None = None

    def key(self) -> dict:
        """What anything cached from these encoders is keyed on: the exact files and the dtypes."""
        if self._fingerprint is None:
            self._fingerprint = (
                frozen_parts_fingerprint(self.pretrained, self.revision, self.vae_name)
                if self.pretrained
                else vae_fingerprint(self.vae_name)
            )
        key = {"frozen_parts": self._fingerprint, "vae_dtype": str(self.vae_dtype),
               "text_encoder_dtype": str(self.text_encoder_dtype)}  # fmt: skip
        if self.text != {"max_sequence_length": None, "use_t5": True}:  # (older cache keys stay as they were)
            key["text"] = dict(self.text)
        return key

    def _load(self, components: str) -> dict:
        if not self.pretrained:
            return {"vae": load_vae(self.vae_name)} if components != "text" else {}
        from diffusion_lab.families.registry import family_of_pipeline

        index = pipeline_index(self.pretrained, self.revision)
        family = family_of_pipeline(index, where=f"model.pretrained={self.pretrained}")
        return family.load_frozen(self.pretrained, self.revision, self.vae_name, components, **self.text)

    @property
    def frozen(self) -> dict:
        """Every frozen part (VAE, tokenizers, text encoders, `prompts`), loading what is not loaded yet."""
        if self._frozen is None:
            self._frozen = self._load("all")
            self.to(self._device)
        elif "vae" not in self._frozen:
            self._frozen.update(self._load("vae"))
            self.to(self._device)
        if self.pretrained and "prompts" not in self._frozen:
            self._frozen.update(self._load("text"))
            self.to(self._device)
        return self._frozen

    @property
    def vae(self) -> torch.nn.Module:
        if self._frozen is None or "vae" not in self._frozen:
            self._frozen = {**(self._frozen or {}), **self._load("vae")}
            self.to(self._device)
        return self._frozen["vae"]

    @property
    def text_loaded(self) -> bool:
        return self._frozen is not None and "prompts" in self._frozen

    def text_parts(self) -> dict:
        """The tokenizers and text encoders by their pipeline names (loaded if need be), for a pipeline folder."""
        return {name: part for name, part in self.frozen.items() if name not in ("vae", "prompts")}

    def to(self, device: torch.device) -> "LatentEncoder":
        """The VAE (in `vae_dtype`) and text encoders (in `text_encoder_dtype`) on `device`; parts loaded later
        go there too."""
        self._device = torch.device(device)
        frozen = self._frozen or {}
        if "vae" in frozen:
            frozen["vae"].to(device=device, dtype=dtype_from_name(self.vae_dtype))
        for encoder in frozen["prompts"].text_encoders if "prompts" in frozen else ():
            encoder.to(device=device, dtype=dtype_from_name(self.text_encoder_dtype))
        return self

    def release(self) -> None:
        """Drop the loaded parts (the latent cache is built; training reads it)."""
        self._frozen = None

    def release_text(self) -> None:
        """Drop the tokenizers and text encoders only (a prompt cache is filled; the VAE stays)."""
        if self._frozen is not None:
            self._frozen = {name: part for name, part in self._frozen.items() if name == "vae"}

    def restore_vae_dtype(self) -> None:
        """A "true" precision (bf16-true) casts every weight of the model: the VAE goes back to its own."""
        dtype = dtype_from_name(self.vae_dtype)
        if dtype is not None and self.vae.dtype != dtype:
            self.vae.to(dtype)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE's latent distribution (mean, std) in float32 for images in [-1, 1]."""
        no_autocast = torch.autocast(pixels.device.type, enabled=False)
        with no_autocast if self.vae_dtype is not None else contextlib.nullcontext():
            posterior = self.vae.encode(pixels.to(self.vae.dtype)).latent_dist
        return posterior.mean.float(), posterior.std.float()

    def scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        shift = self.vae.config.get("shift_factor") or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def encode_prompts(self, captions: Sequence[str], device) -> PromptEmbeddings:
        return self.frozen["prompts"](captions, device)
