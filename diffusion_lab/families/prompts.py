"""Prompts -> what the UNet is conditioned on: the one place SD 1.x/2.x and SDXL differ in text.

SD 1.x/2.x: one CLIP text encoder, its last hidden states as the cross-attention context. SDXL (Podell et al.
2023, arXiv:2307.01952 section 2.1): two encoders (CLIP ViT-L `CLIPTextModel` and OpenCLIP bigG
`CLIPTextModelWithProjection`), the penultimate hidden states of both concatenated as the context, and the
second encoder's pooled, projected output as an extra embedding. Both are encoded exactly as diffusers'
`StableDiffusionXLPipeline.encode_prompt` does, so training sees what sampling will feed.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    """CLIP input ids, padded to the tokenizer's full context (77) as Stable Diffusion was trained."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@dataclass
class PromptEmbeddings:
    hidden: torch.Tensor  # (N, tokens, D): the cross-attention context
    pooled: torch.Tensor | None  # (N, P): SDXL's pooled embedding; None for one-encoder models


class PromptEncoder:
    """The frozen tokenizers and text encoders of a checkpoint, used together.

    The empty prompt (a dropped caption) encodes as the pipeline's unconditional input: zeros where the
    checkpoint's pipeline sets `force_zeros_for_empty_prompt` (SDXL base: what `StableDiffusionXLPipeline`
    uses for classifier-free guidance without a negative prompt), else the encoding of "". A dropped caption
    thus drops both encoders' inputs together, and trains the unconditional prediction sampling will ask for.
    """

    def __init__(
        self,
        tokenizers: Sequence,
        text_encoders: Sequence[torch.nn.Module],
        zeros_for_empty_prompt: bool = False,
    ) -> None:
        if len(tokenizers) != len(text_encoders) or len(text_encoders) not in (1, 2):
            raise ValueError("one or two (tokenizer, text encoder) pairs")
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.zeros_for_empty_prompt = zeros_for_empty_prompt

    @property
    def is_sdxl(self) -> bool:
        """Two encoders: the model also takes the second one's pooled embedding."""
        return len(self.text_encoders) == 2

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], device: torch.device | str) -> PromptEmbeddings:
        captions = list(captions)
        if not self.is_sdxl:
            ids = token_ids(self.tokenizers[0], captions).to(device)
            embeddings = PromptEmbeddings(self.text_encoders[0](ids)[0], None)
        else:
            hidden, pooled = [], None
            for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
                output = encoder(token_ids(tokenizer, captions).to(device), output_hidden_states=True)
                hidden.append(output.hidden_states[-2])
                pooled = output[0]  # the last encoder's: CLIPTextModelWithProjection's text_embeds
            embeddings = PromptEmbeddings(torch.cat(hidden, dim=-1), pooled)
        if self.zeros_for_empty_prompt:
            empty = torch.tensor([caption == "" for caption in captions], device=embeddings.hidden.device)
            embeddings = PromptEmbeddings(
                _zero_rows(embeddings.hidden, empty),
                None if embeddings.pooled is None else _zero_rows(embeddings.pooled, empty),
            )
        return embeddings


def _zero_rows(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.where(rows.view(-1, *([1] * (values.ndim - 1))), torch.zeros_like(values), values)


class PipelinePromptEncoder:
    """A family's text encoders run by its own diffusers pipeline's `encode_prompt` (SD3, Flux, ...): training,
    the caches and sampling then feed the denoiser the same embeddings by construction. `pipeline` holds only the
    tokenizers and text encoders; `encode(pipeline, captions, device)` calls its `encode_prompt` with the
    family's settings and returns `PromptEmbeddings`."""

    zeros_for_empty_prompt = False  # these pipelines encode "" as their unconditional prompt

    def __init__(self, pipeline, encode, text_encoders: Sequence[torch.nn.Module]) -> None:
        self.pipeline, self.encode = pipeline, encode
        self.text_encoders = [encoder for encoder in text_encoders if encoder is not None]

    @torch.no_grad()
    def __call__(self, captions: Sequence[str], device: torch.device | str) -> PromptEmbeddings:
        return self.encode(self.pipeline, list(captions), torch.device(device))
