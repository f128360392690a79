"""Representation alignment: a loss term, added to any objective's, that pulls one block's tokens through a small
projector toward target tokens of the same image.

REPA (Yu et al. 2024, arXiv:2410.06940; `models.repa`) takes the targets from a frozen pretrained encoder.

SRA (Jiang et al. 2025, arXiv:2505.02831) needs no model from outside the run: the target is a later block of
the run's own EMA network seeing the same image and noise at a lower noise level (its `t - max_gap * u`, u
uniform per image), and the student is an earlier block at the training noise level. The loss is REPA's
negative cosine similarity per token (arXiv:2410.06940 eq. 8; SRA's authors recommend cosine over smooth-L1),
weighted by `weight`; HASTE (arXiv:2505.16792) switches the term off at `stop_step`, where alignment stops helping
and starts to constrain.

The projector is trained and checkpointed with the LightningModule, outside `net`: the EMA, the post-hoc
snapshots and the exported pipeline hold the network alone.
"""

import abc
import contextlib
import copy
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from diffusion_lab.core.random import keyed_uniform, salted
from diffusion_lab.errors import ConfigError

TEACHER_GAP_SALT = 0x5AA


def projector(in_features: int, width: int, out_features: int) -> nn.Sequential:
    """REPA's MLP (three linears with SiLU between), applied token-wise."""
    return nn.Sequential(
        nn.Linear(in_features, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
        nn.Linear(width, out_features),
    )  # fmt: skip


def negative_cosine(tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-cos(token, target) per token (both (B, N, D)), averaged over tokens and images."""
    return -(F.normalize(tokens.float(), dim=-1) * F.normalize(targets.float(), dim=-1)).sum(-1).mean()


def as_tokens(output) -> torch.Tensor:
    """A block's output as (B, N, D) tokens: a UNet block's (B, C, H, W) map is flattened row by row."""
    output = output[0] if isinstance(output, tuple) else output
    return output.flatten(2).transpose(1, 2) if output.ndim == 4 else output


def on_grid(tokens: torch.Tensor, count: int) -> torch.Tensor:
    """(B, N, D) tokens of a square grid resampled (bilinear) to a square grid of `count` tokens."""
    side, new_side = math.isqrt(tokens.shape[1]), math.isqrt(count)
    if side * side != tokens.shape[1] or new_side * new_side != count:
        raise ValueError(f"token grids must be square: {tokens.shape[1]} and {count} tokens")
    if side == new_side:
        return tokens
    grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)
    grid = F.interpolate(grid.float(), size=(new_side, new_side), mode="bilinear", align_corners=False,
                         antialias=new_side < side)  # (shrinking: every token counts)  # fmt: skip
    return grid.flatten(2).transpose(1, 2).to(tokens.dtype)


def transformer_block(net: nn.Module, index: int, key: str) -> nn.Module:
    """Block `index` (1-based, as the papers count: REPA's "block 8") of a DiT."""
    blocks = getattr(net, "transformer_blocks", None)
    if blocks is None:
        raise ConfigError(
            f"{key} names a transformer block, but model.net is a {type(net).__name__}: use model/net=dit"
        )
    if not 1 <= index <= len(blocks):
        raise ConfigError(f"{key}={index}: the DiT has blocks 1 to {len(blocks)}")
    return blocks[index - 1]


class _Tapped(BaseException):  # not an Exception: no `except Exception` on the way may swallow it
    """Ends a forward pass once the tapped block has run (the teacher's later blocks are not needed)."""


@contextlib.contextmanager
def tapped(block: nn.Module, stop: bool = False) -> Iterator[list[torch.Tensor]]:
    """The block's output tokens (B, N, D) of every forward pass inside the `with`; with `stop`, the pass ends
    there (the `with` then swallows the stop)."""
    outputs: list[torch.Tensor] = []

    def keep(module, args, output) -> None:
        outputs.append(output)
        if stop:
            raise _Tapped

    handle = block.register_forward_hook(keep)
    try:
        yield outputs
    except _Tapped:
        pass
    finally:
        handle.remove()


class AlignmentTerm(nn.Module, abc.ABC):
    """What the training step asks of an alignment term: its `weight`, whether it runs at a step (`stop_step`),
    the student block's tokens, and the term (`loss`)."""

    def __init__(self, weight: float, stop_step: int | None) -> None:
        super().__init__()
        if weight < 0:
            raise ConfigError(f"model.alignment.weight must be >= 0, got {weight}")
        self.weight, self.stop_step = float(weight), stop_step

    def active(self, step: int) -> bool:
        return self.weight > 0 and (self.stop_step is None or step < self.stop_step)

    @abc.abstractmethod
    def student(self, net: nn.Module) -> nn.Module:
        """The block whose output the term aligns."""

    @abc.abstractmethod
    def loss(self, objective, net, trainer, batch: dict, x0: torch.Tensor, keys: list[int], tokens,
             **net_kwargs) -> torch.Tensor:  # fmt: skip
        """The term (before `weight`) for a training batch whose student-block output is `tokens`."""

    def prepare(self, trainer) -> None:
        """Once per node before training (LightningModule.prepare_data): build what the term reads from disk."""

    def setup(self, trainer) -> None:
        """On every process before training: open it."""

    @contextlib.contextmanager
    def student_tokens(self, net: nn.Module) -> Iterator[list[torch.Tensor]]:
        with tapped(self.student(net)) as outputs:
            yield outputs


class SelfRepresentationAlignment(AlignmentTerm):
    """SRA: block `student_block` at the training noise level, through the projector, aligned to block
    `teacher_block` of the EMA network (`callbacks.ema`) at a noise level up to `max_gap` of the full range lower
    (SRA's defaults for SiT-XL/2: blocks 8 and 20, gap 0.2; for smaller nets an early and a middle block)."""

    def __init__(
        self,
        net: nn.Module,
        weight: float = 0.5,
        student_block: int = 4,
        teacher_block: int = 8,
        max_gap: float = 0.2,
        projector_width: int = 2048,
        stop_step: int | None = None,
    ) -> None:
        super().__init__(weight, stop_step)
        if not 0 < max_gap <= 1:
            raise ConfigError(f"model.alignment.max_gap must be in (0, 1], got {max_gap}")
        transformer_block(net, student_block, "model.alignment.student_block")
        transformer_block(net, teacher_block, "model.alignment.teacher_block")
        if teacher_block <= student_block:
            raise ConfigError(
                f"model.alignment.teacher_block={teacher_block} must come after student_block={student_block}: "
                "SRA aligns an earlier block to a later one"
            )
        self.student_block, self.teacher_block = student_block, teacher_block
        self.max_gap = float(max_gap)
        width = net.config.num_attention_heads * net.config.attention_head_dim
        self.projector = projector(width, projector_width, width)
        self._teacher: list[
            nn.Module
        ] = []  # a copy of `net` holding the EMA weights; a list: not a submodule

    def student(self, net: nn.Module) -> nn.Module:
        return transformer_block(net, self.student_block, "model.alignment.student_block")

    def teacher(self, net: nn.Module, trainer) -> nn.Module:
        """`net`'s architecture with the EMA's current weights (refreshed every call; frozen, eval mode)."""
        # the EMA callback, found by what it offers (callbacks sit above models: they are not imported here)
        ema = next((c for c in getattr(trainer, "callbacks", []) if hasattr(c, "copy_average_to")), None)
        if ema is None:
            raise ConfigError(
                "model/alignment=sra takes its teacher from callbacks.ema: add the ema callback"
            )
        if not self._teacher:
            self._teacher.append(copy.deepcopy(net).requires_grad_(False).eval())
        teacher = self._teacher[0].to(next(net.parameters()).device)
        trainable = [p for (_, p), (_, own) in zip(teacher.named_parameters(), net.named_parameters(), strict=True)
                     if own.requires_grad]  # fmt: skip
        ema.copy_average_to(trainable)
        return teacher

    def loss(self, objective, net, trainer, batch: dict, x0: torch.Tensor, keys: list[int], tokens,
             **net_kwargs) -> torch.Tensor:  # fmt: skip
        """The SRA term for a training batch whose student tokens (`student_tokens`) are `tokens`: the same
        images and noise the objective drew for these keys, at the teacher's lower noise level."""
        times, noise = objective.draws(x0, keys)
        gaps = self.max_gap * keyed_uniform(salted(keys, TEACHER_GAP_SALT), x0.device)
        earlier = objective.earlier_times(times, gaps)
        teacher = self.teacher(net, trainer)
        block = transformer_block(teacher, self.teacher_block, "model.alignment.teacher_block")
        with torch.no_grad(), tapped(block, stop=True) as outputs:
            teacher(objective.noisy(x0, noise, earlier), objective.network_timesteps(earlier), **net_kwargs)
        return negative_cosine(self.projector(tokens), outputs[0])
