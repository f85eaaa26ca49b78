"""Grad-CAM explanations of the binary and three-class networks, as PNG overlays.

Grad-CAM (Selvaraju et al., ICCV 2017): the gradient of a class's logit with respect to the
last convolutional feature map, averaged over space, weighs that map's channels; the weighted
sum, through a ReLU and scaled to [0, 1], shows where the network looked. The binary network
explains its pneumonia logit, the three-class network its predicted class. The map is taken on
the image as the network sees it (no test-time flip).

Each overlay is one PNG: the X-ray, the binary network's map and the three-class network's,
side by side, each titled; written by the scoring actors to ``OUT/_reports/<run>/heatmaps/``.
"""

from __future__ import annotations

import hashlib
import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pneumo_ray.models.gradcam import grad_cam

if TYPE_CHECKING:
    pass

PANEL = 256  # pixels per panel of the overlay
TITLE = 16


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colormap: [0, 1] -> RGB in [0, 1] (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def _panel(image: np.ndarray, cam: np.ndarray | None) -> np.ndarray:
    gray = Image.fromarray(image).resize((PANEL, PANEL), Image.Resampling.BILINEAR)
    base = np.repeat(np.asarray(gray, dtype=np.float32)[..., None] / 255.0, 3, axis=2)
    if cam is None:
        return base
    heat = Image.fromarray(np.round(cam * 255).astype(np.uint8))
    heat = np.asarray(heat.resize((PANEL, PANEL), Image.Resampling.BILINEAR), np.float32) / 255
    alpha = 0.15 + 0.45 * heat[..., None]  # the X-ray stays readable where the map is low
    return (1 - alpha) * base + alpha * jet(heat)


def overlay_png(image: np.ndarray, panels: list[tuple[str, np.ndarray | None]]) -> bytes:
    """One PNG of titled panels: ``image`` (S, S) uint8, then each (title, map or None)."""
    canvas = np.concatenate([_panel(image, cam) for _, cam in panels], axis=1)
    pixels = Image.fromarray(np.round(canvas * 255).astype(np.uint8))
    out = Image.new("RGB", (pixels.width, pixels.height + TITLE), "white")
    out.paste(pixels, (0, TITLE))
    draw = ImageDraw.Draw(out)
    try:
        font = ImageFont.load_default(size=TITLE - 3)  # scalable where Pillow has FreeType
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()
    for i, (title, _) in enumerate(panels):
        draw.text((i * PANEL + 4, 1), title, fill="black", font=font)
    buffer = io.BytesIO()
    out.save(buffer, format="PNG", compress_level=1)  # 9x faster than optimize, 15% larger
    return buffer.getvalue()


def heatmap_name(image_uri: str) -> str:
    """The overlay's file name: stable per image, so a retried task rewrites the same file."""
    return hashlib.sha1(image_uri.encode()).hexdigest()[:20] + ".png"


def explain(bundle, images, predictions: dict[str, np.ndarray]) -> list[bytes]:
    """Overlay PNGs for a batch of decoded images ``(B, S, S)`` (numpy or a tensor on the
    bundle's device) and the bundle's predictions for them."""
    import torch

    from pneumo_ray.io.images import as_numpy, to_model_input
    from pneumo_ray.io.labels import CLASS_LABELS

    x = to_model_input(images).to(bundle.device)  # (B, 1, S, S)
    predicted = torch.as_tensor(
        [CLASS_LABELS.index(str(c)) for c in predictions["pred_class"]], device=bundle.device
    )
    binary = grad_cam(bundle.binary, x)
    multiclass = grad_cam(bundle.multiclass, x, predicted)
    pixels = as_numpy(images)
    return [
        overlay_png(
            pixels[i],
            [
                ("X-ray", None),
                (f"binary: p_pneumonia {float(predictions['p_pneumonia'][i]):.2f}", binary[i]),
                (f"3-class: {predictions['pred_class'][i]}", multiclass[i]),
            ],
        )
        for i in range(len(pixels))
    ]
