"""Grad-CAM for the slice models, with torch hooks and no extra dependency.

For an output logit y and the activations A (channels k, positions i, j) of a feature layer:
weights w_k = mean_ij dy/dA_kij, map = ReLU(sum_k w_k A_k), upsampled bilinearly to the input.
By default the feature layer is the timm backbone's last feature stage, the output of
`model.forward_features`, and the logit comes from `model.forward_head` on it (timm's own
`forward` is exactly these two calls).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def grad_cam(
    model: nn.Module,
    images: torch.Tensor,
    output_index: int,
    layer: nn.Module | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Return Grad-CAM maps (N, H, W) of logit `output_index` for a batch (N, C, H, W).

    layer: the module whose output is taken as the activations (a forward hook captures it);
    None uses model.forward_features / model.forward_head. size: output (height, width),
    by default the input's. The maps are not normalised, so maps of several models can be
    averaged. A map is all zero when no position adds to the logit, because of the ReLU.
    The model runs in eval mode (batch norm statistics stay frozen) and its mode is restored.
    """
    if images.ndim != 4:
        raise ValueError(f"images: expected a (N, C, H, W) batch, got shape {tuple(images.shape)}")
    if layer is None and not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(
            f"{type(model).__name__} has no forward_features/forward_head; pass the feature layer as `layer`"
        )
    size = size or (images.shape[-2], images.shape[-1])
    captured: dict[str, torch.Tensor] = {}

    def keep_gradient(gradient: torch.Tensor) -> None:
        captured["gradient"] = gradient

    def keep_activation(_module, _inputs, output) -> None:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"Grad-CAM layer {type(_module).__name__} returned {type(output).__name__}, not a tensor")
        captured["activation"] = output
        output.register_hook(keep_gradient)

    was_training = model.training
    model.eval()
    handle = layer.register_forward_hook(keep_activation) if layer is not None else None
    try:
        with torch.enable_grad():
            # Gradients flow to the activations even when every parameter is frozen.
            inputs = images.detach().clone().requires_grad_(True)
            if layer is None:
                features = model.forward_features(inputs)
                keep_activation(model, (inputs,), features)
                logits = model.forward_head(features)
            else:
                logits = model(inputs)
            if "activation" not in captured:
                raise RuntimeError(f"Grad-CAM layer {type(layer).__name__} did not run in the model's forward pass")
            if not 0 <= output_index < logits.shape[1]:
                raise ValueError(f"output_index {output_index} is out of range for {logits.shape[1]} model outputs")
            model.zero_grad(set_to_none=True)
            logits[:, output_index].sum().backward()
    finally:
        if handle is not None:
            handle.remove()
        model.train(was_training)

    activation = captured["activation"].detach().float()
    gradient = captured["gradient"].detach().float()
    if activation.ndim != 4:
        raise ValueError(f"Grad-CAM needs (N, C, h, w) activations, the layer gave shape {tuple(activation.shape)}")
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * activation).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=size, mode="bilinear", align_corners=False)
    return cam[:, 0].cpu().numpy()


def normalise_map(cam: np.ndarray) -> np.ndarray:
    """Scale a map to [0, 1] by its maximum; an all-zero map stays zero."""
    peak = float(cam.max()) if cam.size else 0.0
    return cam / peak if peak > 0 else np.zeros_like(cam)
