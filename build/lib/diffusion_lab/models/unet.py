"""A `UNet2DModel` described the way researchers talk about it: widths, depth, where attention goes."""

from collections.abc import Sequence

from diffusers import UNet2DModel


def build_unet(
    sample_size: int,
    in_channels: int,
    block_out_channels: Sequence[int],
    attention_levels: Sequence[bool],
    layers_per_block: int = 2,
    out_channels: int | None = None,
    num_class_embeds: int | None = None,
    attention_head_dim: int | None = 8,
    norm_num_groups: int = 32,
    dropout: float = 0.0,
) -> UNet2DModel:
    """Build a UNet2DModel, failing early and clearly on shapes that would only break mid-training.

    `attention_levels[i]` puts self-attention in the i-th down block and the mirrored up block.
    """
    block_out_channels, attention_levels = list(block_out_channels), list(attention_levels)
    if len(attention_levels) != len(block_out_channels):
        raise ValueError(
            f"attention_levels has {len(attention_levels)} entries but block_out_channels has "
            f"{len(block_out_channels)}: give one true/false per resolution level, e.g. "
            f"{[False] * (len(block_out_channels) - 1) + [True]}"
        )
    downsampling = 2 ** (len(block_out_channels) - 1)
    if sample_size % downsampling:
        valid = [downsampling * k for k in range(1, 5)]
        raise ValueError(
            f"image size {sample_size} is not divisible by {downsampling}, the UNet's downsampling factor "
            f"({len(block_out_channels)} levels): use a multiple such as {valid}, or fewer levels"
        )
    bad_widths = [c for c in block_out_channels if c % norm_num_groups]
    if bad_widths:
        raise ValueError(
            f"block_out_channels {bad_widths} are not divisible by norm_num_groups={norm_num_groups}"
        )
    down_blocks = ["AttnDownBlock2D" if attn else "DownBlock2D" for attn in attention_levels]
    up_blocks = ["AttnUpBlock2D" if attn else "UpBlock2D" for attn in reversed(attention_levels)]
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=block_out_channels,
        down_block_types=down_blocks,
        up_block_types=up_blocks,
        layers_per_block=layers_per_block,
        num_class_embeds=num_class_embeds,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        dropout=dropout,
    )
