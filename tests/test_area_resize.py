"""The 3/4 area shrink must give cv2.INTER_AREA's output pixel for pixel."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from csfd.area_resize import is_three_quarters, shrink_three_quarters
from csfd.dicom_io import Window, read_slice
from csfd.volume import resize_keep_aspect


def opencv_area(image: np.ndarray) -> np.ndarray:
    rows, cols = image.shape
    return cv2.resize(image, (cols * 3 // 4, rows * 3 // 4), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("shape", [(512, 512), (768, 512), (4, 8), (16, 4)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_image_equals_opencv(shape, seed):
    image = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    np.testing.assert_array_equal(shrink_three_quarters(image), opencv_area(image))


def test_rounding_ties_equal_opencv():
    # Values 0..3 make many area means end in exactly .5, where half-up and half-to-even differ.
    image = np.random.default_rng(3).integers(0, 4, size=(256, 256), dtype=np.uint8)
    expected = opencv_area(image)
    rows = image.reshape(64, 4, 64, 4).astype(np.int64)
    weights = np.array([[3, 1, 0, 0], [0, 2, 2, 0], [0, 0, 1, 3]])
    sums = np.einsum("pa,qb,iajb->ipjq", weights, weights, rows).reshape(192, 192)
    assert np.count_nonzero(sums % 16 == 8) > 1000  # the image has ties to round
    np.testing.assert_array_equal(shrink_three_quarters(image), expected)


def test_extreme_values_do_not_overflow():
    image = np.full((512, 512), 255, dtype=np.uint8)
    image[::2, ::3] = 0
    np.testing.assert_array_equal(shrink_three_quarters(image), opencv_area(image))
    assert shrink_three_quarters(np.full((8, 8), 255, dtype=np.uint8)).min() == 255


def test_real_slice_equals_opencv(real_ct_dir):
    path = real_ct_dir / "cspine-slice" / "IM-0001-0001-0001.dcm"
    windowed = read_slice(path, window=Window(center=400.0, width=1800.0)).pixels
    assert windowed.shape == (512, 512)
    np.testing.assert_array_equal(shrink_three_quarters(windowed), opencv_area(windowed))


def test_strided_input_equals_opencv():
    image = np.random.default_rng(4).integers(0, 256, size=(512, 1024), dtype=np.uint8)[:, ::2]
    np.testing.assert_array_equal(shrink_three_quarters(image), opencv_area(np.ascontiguousarray(image)))


def test_resize_keep_aspect_takes_fast_path(monkeypatch):
    calls = []

    def counting(image):
        calls.append(image.shape)
        return shrink_three_quarters(image)

    monkeypatch.setattr("csfd.volume.shrink_three_quarters", counting)
    image = np.random.default_rng(5).integers(0, 256, size=(512, 512), dtype=np.uint8)
    np.testing.assert_array_equal(resize_keep_aspect(image, 384), opencv_area(image))
    assert calls == [(512, 512)]
    resize_keep_aspect(image, 256)  # a factor of 2 stays on OpenCV
    resize_keep_aspect(image.astype(np.float32), 384)  # float images stay on OpenCV
    assert calls == [(512, 512)]


@pytest.mark.parametrize(
    ("shape", "new_shape", "expected"),
    [
        ((512, 512), (384, 384), True),
        ((768, 512), (576, 384), True),
        ((512, 512), (256, 256), False),
        ((716, 512), (384, 275), False),
        ((510, 510), (383, 383), False),
        ((512, 512), (384, 383), False),
    ],
)
def test_is_three_quarters(shape, new_shape, expected):
    assert is_three_quarters(shape, new_shape) is expected


def test_rejects_sides_not_divisible_by_four():
    with pytest.raises(ValueError, match="510 x 512"):
        shrink_three_quarters(np.zeros((510, 512), dtype=np.uint8))


def test_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint16"):
        shrink_three_quarters(np.zeros((512, 512), dtype=np.uint16))
