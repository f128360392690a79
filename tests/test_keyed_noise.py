"""Per-image keyed draws: the noise an image gets does not depend on what else is in its batch."""

import torch

from diffusion_lab.core import keyed_integers, keyed_normal, sample_keys


def test_an_images_noise_and_timestep_do_not_depend_on_its_batch():
    full = sample_keys(seed=3, step=7, sample_ids=torch.arange(8))
    halves = sample_keys(3, 7, torch.arange(0, 8, 2)) + sample_keys(3, 7, torch.arange(1, 8, 2))
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    noise_full = keyed_normal(full, (1, 4, 4), torch.device("cpu"), torch.float32)
    noise_halves = keyed_normal(halves, (1, 4, 4), torch.device("cpu"), torch.float32)
    torch.testing.assert_close(noise_full[order], noise_halves, rtol=0, atol=0)
    assert torch.equal(keyed_integers(full, 1000, "cpu")[order], keyed_integers(halves, 1000, "cpu"))


def test_keys_differ_across_steps_seeds_and_images():
    keys = {k for seed in range(3) for step in range(3) for k in sample_keys(seed, step, torch.arange(50))}
    assert len(keys) == 3 * 3 * 50


def test_keyed_normal_is_standard_normal_and_offset_shifts_channel_means():
    keys = sample_keys(0, 0, torch.arange(512))
    noise = keyed_normal(keys, (3, 8, 8), torch.device("cpu"), torch.float32)
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02
    offset = keyed_normal(keys, (3, 8, 8), torch.device("cpu"), torch.float32, offset=0.5)
    channel_means = (offset - noise).mean(dim=(2, 3))
    assert channel_means.std().item() > 0.3  # one constant per image and channel, std 0.5
    timesteps = keyed_integers(keys, 1000, "cpu")
    assert timesteps.min() >= 0 and timesteps.max() < 1000 and len(timesteps.unique()) > 300


def test_every_bit_of_the_keys_is_a_fair_coin():
    keys = torch.tensor(sample_keys(0, 0, torch.arange(4000)))
    for bit in (0, 1, 8, 24, 40, 62):
        assert abs(((keys >> bit) & 1).float().mean().item() - 0.5) < 0.04
