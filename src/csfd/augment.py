"""Slice-stack augmentation on uint8 with OpenCV, shared by every stage that trains.

A stack is (channels, H, W) uint8: neighbouring slices as channels (2.5D). The same random
geometric transform applies to every channel so that the slices stay registered.
"""

from __future__ import annotations

import cv2
import numpy as np

from csfd.config import AugmentConfig


def augment_stack(stack: np.ndarray, config: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Return an augmented copy of a (C, H, W) uint8 stack: rotation, flip, crop, intensity."""
    channels, height, width = stack.shape
    image = np.ascontiguousarray(stack.transpose(1, 2, 0))  # OpenCV wants H, W, C

    # Random resized crop: keep an area fraction in [crop_scale_min, 1] with a square aspect,
    # then resize back to the input size.
    scale = rng.uniform(config.crop_scale_min, 1.0) if config.crop_scale_min < 1.0 else 1.0
    side_h = max(1, int(round(height * np.sqrt(scale))))
    side_w = max(1, int(round(width * np.sqrt(scale))))
    top = int(rng.integers(0, height - side_h + 1))
    left = int(rng.integers(0, width - side_w + 1))

    angle = rng.uniform(-config.rotate_degrees, config.rotate_degrees) if config.rotate_degrees > 0 else 0.0
    flip = rng.random() < config.hflip_probability

    # One affine matrix for crop + rotation keeps a single interpolation pass.
    centre = (left + side_w / 2.0, top + side_h / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    matrix[0, :] *= width / side_w
    matrix[1, :] *= height / side_h
    matrix[0, 2] += width / 2.0 - centre[0] * width / side_w
    matrix[1, 2] += height / 2.0 - centre[1] * height / side_h
    if flip:
        matrix[0, :] = -matrix[0, :]
        matrix[0, 2] += width - 1
    out = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderValue=0)
    if out.ndim == 2:
        out = out[:, :, None]

    if config.brightness > 0 or config.contrast > 0:
        alpha = 1.0 + rng.uniform(-config.contrast, config.contrast)
        beta = 255.0 * rng.uniform(-config.brightness, config.brightness)
        out = cv2.convertScaleAbs(out, alpha=alpha, beta=beta)
        if out.ndim == 2:
            out = out[:, :, None]
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def hflip_stack(stack: np.ndarray) -> np.ndarray:
    """Mirror a (C, H, W) stack left to right; used for test-time augmentation."""
    return np.ascontiguousarray(stack[:, :, ::-1])
