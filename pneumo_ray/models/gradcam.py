"""Grad-CAM (Selvaraju et al., ICCV 2017) of the bundle's CNNs: the gradient of a class's
logit with respect to the last convolutional feature map, averaged over space, weighs that
map's channels; the weighted sum, through a ReLU and scaled to [0, 1], shows where the network
looked. The scoring job's heatmaps (``scoring.heatmaps``) and the training report's
counterfactual check (``models.counterfactual``) both take their maps from here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch
    from torch import nn


def cam_layer(model: nn.Module) -> nn.Module:
    """The last convolutional feature map of a CNN of the bundle (before its pooling)."""
    from torch import nn

    features = model.features
    if isinstance(features, nn.Sequential):  # the design's CNN
        return features[-1][2]  # last block's BatchNorm: conv -> ReLU -> BN, before the pool
    if hasattr(features, "layer4"):  # resnets
        return features.layer4
    if hasattr(features, "_blocks"):  # EfficientNet-Lite: its last block (stride 32)
        return features._blocks[-1]
    return features.features  # densenet, efficientnet


def grad_cam(model: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM maps ``(B, S, S)`` in [0, 1] for a batch ``x`` (B, 1, S, S).

    ``target``: the class index per image for a multi-logit network; None for a one-logit
    (binary) network, whose logit is explained.
    """
    import torch
    import torch.nn.functional as F

    captured: dict[str, torch.Tensor] = {}
    handle = cam_layer(model).register_forward_hook(
        lambda _module, _inputs, output: captured.__setitem__("maps", output)
    )
    try:
        with torch.enable_grad():
            logits = model(x)
            score = logits if target is None else logits.gather(1, target[:, None])[:, 0]
            (grads,) = torch.autograd.grad(score.sum(), captured["maps"])
    finally:
        handle.remove()
    maps = captured["maps"].detach()  # (B, C, h, w)
    weights = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    cam = F.relu((weights * maps).sum(dim=1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    peak = cam.flatten(1).amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)  # (B,)
    return (cam[:, 0] / peak[:, None, None]).cpu().numpy()
