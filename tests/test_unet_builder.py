"""Architecture from config, and the clear errors for shapes that would only fail mid-training."""

import pytest

from diffusion_lab.models import build_unet


def test_attention_levels_choose_the_block_types_mirrored_on_the_way_up():
    net = build_unet(
        32, 3, [8, 16, 16, 16, 32, 32], [False, False, False, False, True, False], norm_num_groups=4
    )
    assert net.config.down_block_types[4] == "AttnDownBlock2D"
    assert net.config.up_block_types[1] == "AttnUpBlock2D"
    assert sum(block.endswith("AttnDownBlock2D") for block in net.config.down_block_types) == 1
    assert isinstance(net.config.block_out_channels, (list, tuple))


def test_attention_levels_of_the_wrong_length_are_rejected_with_an_example():
    with pytest.raises(ValueError, match=r"attention_levels has 2 entries but block_out_channels has 3"):
        build_unet(16, 1, [8, 16, 16], [False, True], norm_num_groups=4)


def test_image_size_must_divide_by_the_downsampling_factor():
    with pytest.raises(ValueError, match=r"image size 20 is not divisible by 8"):
        build_unet(20, 1, [8, 16, 16, 16], [False] * 4, norm_num_groups=4)


def test_widths_must_divide_by_the_group_norm_groups():
    with pytest.raises(ValueError, match="norm_num_groups"):
        build_unet(16, 1, [8, 12], [False, False], norm_num_groups=8)
