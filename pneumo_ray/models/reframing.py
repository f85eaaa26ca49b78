"""A learned re-framing of chest films (issue 31, point 3): where a typical film's frame lies.

The networks read how tightly a film is framed (a crop to the central 80% turns normal children
into pneumonia calls), and boxes found by thresholds do not fix it: the largest bright region
is the whole body, so cropping to it keeps the framing, and the lung fields are not found
reliably (``benchmarks/thorax_box.py``). This module learns the framing instead, with no
labels and no hand-drawn boxes:

- each training film is re-framed at random (``random_windows``: a window of the film, from a
  tighter crop to a looser frame padded with black, shifted and stretched a little);
- a small CNN (``ReframingNet``) sees the re-framed film at ``INPUT_SIDE`` px and predicts
  where the *original* frame lies in it (``frame_in_window``), as (left, top, right, bottom)
  in the re-framed film's own coordinates.

Trained over many films, it cannot know one film's original framing from the pixels, so it
predicts a typical film's frame for the anatomy it sees. Re-framing a film to its predicted
box (``reframe``) gives the film as a typical film of the training store frames it: a film
framed more tightly and the same film as taken get nearly the same box on the anatomy, which
``benchmarks/reframing_check.py`` measures before any network is trained on it.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumo_ray.io.images import to_model_input, to_pixels

INPUT_SIDE = 64  # the re-framing network's input, in pixels
FRAME_COLUMN = "frame"  # a training dataset's column of each film's predicted frame (4 floats)
FIT_IMAGES = 2000  # training films (a seeded draw) the training job fits the network on
FIT_EPOCHS = 40  # its epochs: the setting benchmarks/reframing_check.py measured (IoU 0.86)
FIT_SIDE = 128  # the films' side while fitting and predicting (the input is 64 px windows)
ZOOM = (0.6, 1.5)  # window side / film side: < 1 a tighter crop, > 1 a looser frame
ASPECT = 0.15  # log-ratio of the window's sides, at most
SHIFT = 0.1  # the window's centre moves by at most this much of the film beyond its own slack


def random_windows(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` windows of a film, ``(n, 4)`` as (left, top, right, bottom) in the film's
    coordinates (the film is [0, 1] x [0, 1]); parts outside the film come out black."""
    zoom = np.exp(rng.uniform(*np.log(ZOOM), n))
    stretch = np.exp(rng.uniform(-ASPECT, ASPECT, n) / 2)
    sides = np.stack([zoom * stretch, zoom / stretch], axis=1)  # (n, 2): width, height
    slack = np.abs(1.0 - sides) / 2 + SHIFT
    centres = 0.5 + rng.uniform(-1, 1, (n, 2)) * slack
    return np.concatenate([centres - sides / 2, centres + sides / 2], axis=1)


def frame_in_window(windows: np.ndarray) -> np.ndarray:
    """Where the film's frame [0, 1]^2 lies in each window's own coordinates, ``(n, 4)``."""
    windows = np.asarray(windows, dtype=np.float64)
    origin, size = windows[:, :2], windows[:, 2:] - windows[:, :2]
    return np.concatenate([(0.0 - origin) / size, (1.0 - origin) / size], axis=1)


def in_window(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Boxes given in the film's coordinates, in each window's coordinates."""
    origin, size = windows[:, :2], windows[:, 2:] - windows[:, :2]
    return np.concatenate([(boxes[:, :2] - origin) / size, (boxes[:, 2:] - origin) / size], 1)


def in_film(boxes: np.ndarray, windows: np.ndarray) -> np.ndarray:
    """Boxes given in each window's coordinates, in the film's coordinates."""
    origin, size = windows[:, :2], windows[:, 2:] - windows[:, :2]
    return np.concatenate([origin + boxes[:, :2] * size, origin + boxes[:, 2:] * size], 1)


def reframe(images: torch.Tensor, windows: np.ndarray, side: int) -> torch.Tensor:
    """Each image's window, resampled to ``side`` x ``side`` (bilinear; black outside the
    image): float ``(N, 1, S, S)`` -> ``(N, 1, side, side)``."""
    w = torch.as_tensor(np.asarray(windows), dtype=torch.float32)
    theta = torch.zeros(len(w), 2, 3)
    theta[:, 0, 0] = w[:, 2] - w[:, 0]  # grid x in [-1, 1] -> image x: scale and offset
    theta[:, 0, 2] = w[:, 2] + w[:, 0] - 1.0
    theta[:, 1, 1] = w[:, 3] - w[:, 1]
    theta[:, 1, 2] = w[:, 3] + w[:, 1] - 1.0
    grid = nn.functional.affine_grid(theta, [len(w), 1, side, side], align_corners=False)
    return nn.functional.grid_sample(
        images, grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )


def as_input(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, S, S)`` films as float ``(N, 1, S, S)`` in [0, 1]."""
    return to_model_input(np.asarray(pixels))


class ReframingNet(nn.Module):
    """Four stride-2 stages on a ``INPUT_SIDE`` px film, pooled, then the frame's 4 sides."""

    def __init__(self, width: int = 16):
        super().__init__()
        layers, channels = [], 1
        for out in (width, 2 * width, 4 * width, 8 * width):
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, side, side) in [0, 1]
        pooled = self.features((x - 0.5) / 0.25).mean(dim=(2, 3))  # (B, C)
        return self.head(pooled)  # (B, 4): left, top, right, bottom of the frame


def train_reframer(
    pixels: np.ndarray, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
    log=None,
) -> ReframingNet:  # fmt: skip
    """A ``ReframingNet`` trained on random re-framings of ``pixels`` (uint8 ``(N, S, S)``
    films; a new draw of windows every epoch), seeded."""
    images = as_input(pixels)
    rng = np.random.default_rng(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = ReframingNet()
        optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * -(-len(images) // batch_size)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
        net.train()
        for epoch in range(epochs):
            order = torch.as_tensor(rng.permutation(len(images)))
            total = 0.0
            for rows in order.split(batch_size):
                windows = random_windows(len(rows), rng)
                x = reframe(images[rows], windows, INPUT_SIDE)
                target = torch.as_tensor(frame_in_window(windows), dtype=torch.float32)
                loss = nn.functional.smooth_l1_loss(net(x), target, beta=0.05)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item() * len(rows)
            if log is not None and (epoch + 1) % 10 == 0:
                log(f"re-framing epoch {epoch + 1}/{epochs}: loss {total / len(images):.4f}")
    return net.eval()


def predict_frames(net: ReframingNet, pixels: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Where a typical film's frame lies in each film, in its own coordinates ``(N, 4)``;
    ``chunk`` films at a time."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(pixels), chunk):
            films = np.asarray(pixels[start : start + chunk])
            whole = np.tile([0.0, 0.0, 1.0, 1.0], (len(films), 1))
            parts.append(net(reframe(as_input(films), whole, INPUT_SIDE)).double().numpy())
    return np.concatenate(parts) if parts else np.zeros((0, 4))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of boxes row by row, ``(N, 4)`` each as (left, top, right, bottom)."""
    width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = width * height

    return inter / (frame_areas(a) + frame_areas(b) - inter)


def apply_reframing(net: ReframingNet, pixels: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Each film re-framed to its predicted frame, at its own size: uint8 ``(N, S, S)`` in and
    out (black where the frame reaches past the film)."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(pixels), chunk):
            films = np.asarray(pixels[start : start + chunk])
            frames = predict_frames(net, films, chunk)
            parts.append(to_pixels(reframe(as_input(films), frames, films.shape[-1])))
    return np.concatenate(parts) if parts else np.asarray(pixels).copy()


def shrink(pixels: np.ndarray, side: int = FIT_SIDE) -> np.ndarray:
    """uint8 ``(N, S, S)`` films at ``side`` px (antialiased; as they are when not larger)."""
    pixels = np.asarray(pixels)
    if pixels.shape[-1] <= side:
        return pixels.copy()
    x = nn.functional.interpolate(
        as_input(pixels), size=(side, side), mode="bilinear", antialias=True
    )
    return to_pixels(x)


def fit_and_frame(
    pixels: np.ndarray, seed: int, threads: int = 1, epochs: int = FIT_EPOCHS
) -> np.ndarray:
    """Each film's typical frame ``(N, 4)`` from a ``ReframingNet`` fitted (no labels) on a
    seeded draw of at most ``FIT_IMAGES`` of the films, ``epochs`` epochs; ``pixels``:
    uint8 ``(N, S, S)``, best at ``FIT_SIDE`` px (``shrink``)."""
    torch.set_num_threads(threads)
    pixels = np.asarray(pixels)
    draw = np.random.default_rng(seed).permutation(len(pixels))[:FIT_IMAGES]
    net = train_reframer(pixels[np.sort(draw)], epochs=epochs, seed=seed)
    return predict_frames(net, pixels)


def frame_areas(frames: np.ndarray) -> np.ndarray:
    """Each frame's area as a share of its film's: 1.0 a film framed as the store typically
    frames it, larger a film framed tighter (its frame reaches past it)."""
    frames = np.asarray(frames, dtype=np.float64)  # (N, 4) as (left, top, right, bottom)
    return (frames[:, 2] - frames[:, 0]) * (frames[:, 3] - frames[:, 1])
