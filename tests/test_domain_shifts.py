"""The fixed domain shifts of Protocol D (``hf_cft.data.shifts``): deterministic, shape- and dtype-preserving, and
each does what its name says."""

import pytest
import torch

from hf_cft.data import DOMAIN_SHIFTS, SHIFT_PARAMETERS, domain_shift
from hf_cft.errors import ImageInputsError, OptionError


def _images(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(40, 216, (n, 3, size, size), generator=g, dtype=torch.uint8)
    x[:, 0, :, : size // 2] = 230  # some structure: a bright red left half
    return x


@pytest.mark.parametrize("name", DOMAIN_SHIFTS)
def test_every_shift_is_deterministic_and_keeps_shape_and_dtype(name):
    x = _images()
    before = x.clone()
    y = domain_shift(x, name)
    assert y.dtype == torch.uint8 and y.shape == x.shape
    assert torch.equal(domain_shift(x, name), y)  # same input, same output
    assert torch.equal(x, before)  # the input is not modified
    assert not torch.equal(y, x)  # and every shift changes the images
    # images are shifted independently (except noise, drawn for the whole batch)
    if name != "noise":
        assert torch.equal(domain_shift(x[1:2], name), y[1:2])


def test_grayscale_has_equal_channels_equal_to_the_luma():
    x = _images()
    y = domain_shift(x, "grayscale")
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    luma = (x.double() * torch.tensor([0.299, 0.587, 0.114], dtype=torch.double).view(1, 3, 1, 1)).sum(1)
    assert (y[:, 0].double() - luma).abs().max() <= 0.5 + 1e-9


def test_low_contrast_shrinks_each_channels_std_by_the_factor_and_keeps_its_mean():
    x = _images(size=32)
    y = domain_shift(x, "low_contrast")
    factor = SHIFT_PARAMETERS["low_contrast"]["factor"]
    xs, ys = x.double().std(dim=(2, 3)), y.double().std(dim=(2, 3))
    assert torch.allclose(ys, factor * xs, atol=0.5)  # uint8 rounding only
    assert torch.allclose(y.double().mean(dim=(2, 3)), x.double().mean(dim=(2, 3)), atol=0.5)


def test_blur_keeps_flat_images_and_removes_high_frequencies():
    flat = torch.full((1, 3, 16, 16), 77, dtype=torch.uint8)
    assert torch.equal(domain_shift(flat, "blur"), flat)
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None]) % 2 * 255).to(torch.uint8).expand(1, 3, 16, 16)
    y = domain_shift(checker.contiguous(), "blur").double()
    assert y.std() < 0.05 * checker.double().std()  # a σ = 2 blur flattens a one-pixel checkerboard


def test_noise_is_seeded_and_has_the_stated_std():
    x = torch.full((8, 3, 32, 32), 128, dtype=torch.uint8)
    a, b = domain_shift(x, "noise", seed=0), domain_shift(x, "noise", seed=1)
    assert torch.equal(a, domain_shift(x, "noise", seed=0)) and not torch.equal(a, b)
    std = (a.double() - 128).std() / 255
    assert abs(std - SHIFT_PARAMETERS["noise"]["std"]) < 0.01


def test_sketch_draws_dark_edges_on_white():
    flat = torch.full((1, 3, 16, 16), 90, dtype=torch.uint8)
    assert torch.equal(domain_shift(flat, "sketch"), torch.full_like(flat, 255))  # no edge: blank paper
    step = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    step[..., 8:] = 255  # a vertical edge between columns 7 and 8
    y = domain_shift(step, "sketch")
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    assert int(y[0, 0, :, 7:9].max()) == 0  # the edge is black
    assert int(y[0, 0, :, :6].min()) == 255 and int(y[0, 0, :, 10:].min()) == 255  # elsewhere white


def test_jpeg_is_lossy_and_close_in_the_mean():
    x = _images(size=32)
    y = domain_shift(x, "jpeg")
    assert (y.double() - x.double()).abs().mean() > 5  # quality 10 destroys detail
    assert (y.double().mean() - x.double().mean()).abs() < 10  # but keeps the image


def test_bad_inputs_are_refused_by_name():
    with pytest.raises(OptionError, match="'sketchy'"):
        domain_shift(_images(), "sketchy")
    with pytest.raises(ImageInputsError, match="uint8"):
        domain_shift(_images().float(), "blur")
    with pytest.raises(ImageInputsError, match=r"\[3, 16, 16\]"):  # one image without the batch dimension
        domain_shift(_images()[0], "blur")
    with pytest.raises(ImageInputsError, match=r"\[4, 1, 16, 16\]"):  # one channel
        domain_shift(_images()[:, :1], "blur")
