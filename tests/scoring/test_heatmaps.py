"""Grad-CAM overlays (pneumo_ray.scoring.heatmaps) for every architecture of the bundle's CNNs."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pneumo_ray.models.gradcam import grad_cam
from pneumo_ray.models.networks import build_network
from pneumo_ray.scoring.heatmaps import (
    PANEL,
    TITLE,
    explain,
    heatmap_name,
    jet,
    overlay_png,
)


@pytest.mark.parametrize("architecture", ["seed", "resnet18", "densenet121", "efficientnet_b0"])
def test_grad_cam_gives_one_map_per_image_scaled_to_one(architecture):
    torch.manual_seed(0)
    spec = {"architecture": architecture}
    binary = build_network("binary", 64, spec).eval()
    multiclass = build_network("multiclass", 64, spec).eval()
    x = torch.rand(3, 1, 64, 64)
    maps = grad_cam(binary, x)
    assert maps.shape == (3, 64, 64) and maps.dtype == np.float32
    peaks = maps.reshape(3, -1).max(axis=1)
    # Scaled to a peak of 1; all zero where no channel gives positive evidence (ReLU).
    assert maps.min() >= 0 and all(p == pytest.approx(1.0) or p == 0 for p in peaks)
    assert peaks.max() == pytest.approx(1.0)
    by_class = [grad_cam(multiclass, x, torch.full((3,), c)) for c in range(3)]
    assert not np.allclose(by_class[0], by_class[1])  # each class has its own evidence
    assert all(p.grad is None for p in binary.parameters())  # no gradient left behind


def test_the_map_follows_the_channels_the_logit_reads():
    """Channel 0 fires on very bright pixels, channel 1 on any bright pixel; the logit reads
    channel 0 only. Grad-CAM must light the very bright blob and not the merely bright one,
    though channel 1 fires on both (a map that ignored the gradients would show both)."""
    model = build_network("binary", 32).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d | torch.nn.BatchNorm1d):
                module.weight.fill_(1.0)  # eval BatchNorm with running stats 0/1: identity
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        convs[0].weight[0, 0, 1, 1] = convs[0].weight[1, 0, 1, 1] = 1.0
        convs[0].bias[0], convs[0].bias[1] = -0.75, -0.25  # ReLU thresholds
        for conv in convs[1:]:
            conv.weight[0, 0, 1, 1] = conv.weight[1, 1, 1, 1] = 1.0  # carry both channels
        model.embed[1].weight.view(128, 256, 2, 2)[0, 0] = 1.0  # unit 0: channel 0, anywhere
        model.head.weight[0, 0] = 1.0
    x = torch.zeros(1, 1, 32, 32)
    x[..., 4:28, 20:28] = 1.0  # very bright, on the right
    x[..., 4:28, 4:12] = 0.5  # bright, on the left
    cam = grad_cam(model, x)[0]
    assert cam[:, 16:].sum() > 5 * cam[:, :16].sum() and cam.max() == pytest.approx(1.0)


def test_overlay_has_a_gray_x_ray_and_coloured_maps():
    image = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    cam = np.zeros((64, 64), np.float32)
    cam[20:40, 20:40] = 1.0
    png = overlay_png(image, [("X-ray", None), ("binary", cam), ("3-class", cam)])
    picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    assert picture.shape == (PANEL + TITLE, 3 * PANEL, 3)
    xray = picture[TITLE:, :PANEL]
    assert np.all(xray[..., 0] == xray[..., 1]) and np.all(xray[..., 1] == xray[..., 2])
    hot = picture[TITLE + PANEL // 2, PANEL + PANEL // 2]
    assert hot[0] > hot[2] + 60  # red where the map is high
    assert np.allclose(jet(np.array([0.0, 1.0])), [[0, 0, 0.5], [0.5, 0, 0]])


def test_explain_writes_a_png_per_image_of_a_bundle():
    from ..models.test_bundle import tiny_bundle

    bundle = tiny_bundle()
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32), np.uint8)
    predictions = bundle.predict(images)
    pngs = explain(bundle, images, predictions)
    assert len(pngs) == 2 and all(p.startswith(b"\x89PNG") for p in pngs)
    assert heatmap_name("s3://b/x.jpeg") == heatmap_name("s3://b/x.jpeg") != heatmap_name("/x")
