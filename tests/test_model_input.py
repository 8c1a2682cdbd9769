"""Model input built from uint8 slice stacks: per item (training) and per batch."""

from __future__ import annotations

import numpy as np
import torch
import pytest

from csfd.data import batch_model_input, stack_indices, to_model_input


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(9, 40, 40), dtype=np.uint8)


def test_model_input_scales_exactly(volume):
    stack = volume[2:5]
    image = to_model_input(stack, 40)
    assert image.dtype == np.float32
    assert image.flags.c_contiguous
    assert np.array_equal(image, stack.astype(np.float32) / 255.0)


def test_model_input_from_transposed_view(volume):
    # A non-contiguous view must still give a C-contiguous array with the view's values.
    view = volume[2:5].transpose(0, 2, 1)
    image = to_model_input(view, 40)
    assert image.flags.c_contiguous
    assert np.array_equal(image, np.ascontiguousarray(view).astype(np.float32) / 255.0)


@pytest.mark.parametrize("image_size", [40, 24])
@pytest.mark.parametrize("context", [0, 1, 2])
def test_batch_matches_per_item(volume, image_size, context):
    positions = np.array([0, 1, 4, 8])
    expected = np.stack([to_model_input(volume[stack_indices(p, len(volume), context)], image_size) for p in positions])
    batch = batch_model_input(volume, positions, context, image_size)
    assert batch.shape == (4, 2 * context + 1, image_size, image_size)
    assert batch.dtype == np.float32
    assert np.array_equal(batch, expected)

    nhwc = batch_model_input(volume, positions, context, image_size, channels_last=True)
    assert nhwc.flags.c_contiguous
    assert np.array_equal(nhwc, expected.transpose(0, 2, 3, 1))


def test_inference_batch_is_channels_last(volume):
    from csfd.inference import _stacks

    images = _stacks(volume, np.array([0, 4, 8]), 1, 24)
    assert images.shape == (3, 3, 24, 24)
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(images, torch.from_numpy(batch_model_input(volume, np.array([0, 4, 8]), 1, 24)))


def test_batch_from_memory_map(volume, tmp_path):
    path = tmp_path / "volume.npy"
    np.save(path, volume)
    mapped = np.load(path, mmap_mode="r")
    positions = np.array([3, 8])
    assert np.array_equal(batch_model_input(mapped, positions, 1, 40), batch_model_input(volume, positions, 1, 40))


def test_resize_five_channels_matches_four(volume):
    # OpenCV resizes at most 4 channels at once with INTER_AREA; 5 go one at a time.
    five = to_model_input(volume[0:5], 24)
    four = to_model_input(volume[0:4], 24)
    assert five.shape == (5, 24, 24)
    assert np.array_equal(five[:4], four)
