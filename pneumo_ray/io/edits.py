"""Label-preserving edits of chest films: what differs between how two sites frame and annotate
the same lungs, not what is in them.

    tighter or looser framing, laterality markers and burned-in text, a border or collimation
    band, exposure (brightness, contrast, gamma), a small rotation, a horizontal flip

Each edit takes a uint8 batch ``(B, S, S)`` and returns one of the same shape and dtype; edits
that place something (a marker's exact spot) draw it from a seeded generator, so an edit is the
same given its seed. The counterfactual check (``pneumo_ray.models.counterfactual``) asks how
far a bundle's calls move under each; the training augmentation (``io.images.BatchAugment``
with ``framing``) pastes the same kind of stamps on images of every class so that no stamp, and
no framing, can tell the classes apart.

Stamps are rendered with Pillow's built-in font (no font file is needed).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

STAMP_PX = 48  # the rendered height of a stamp's font; stamps are resized to where they go

# What technologists and modalities burn into films: laterality and projection markers, the
# exposure, times, dates and ids.
STAMP_TEXTS = (
    "R", "L", "PA", "AP", "SUPINE", "ERECT", "PORTABLE",
    "kVp 70", "mAs 2.5", "80 kV", "10:42", "23:17", "2016-03-08", "ID 004512",
)  # fmt: skip

CORNERS = ("top_left", "top_right", "bottom_left", "bottom_right")
EDGES = ("left", "right", "top", "bottom")


@functools.lru_cache(maxsize=64)
def stamp_mask(text: str, bold: bool = False) -> np.ndarray:
    """``text`` rendered white on black, cropped to its ink: float32 ``(h, w)`` in [0, 1]."""
    font = ImageFont.load_default(size=STAMP_PX)
    stroke = 2 if bold else 0
    left, top, right, bottom = font.getbbox(text, stroke_width=stroke)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text(
        (2 - left, 2 - top), text, fill=255, font=font, stroke_width=stroke, stroke_fill=255
    )
    mask = np.asarray(canvas, dtype=np.float32) / 255.0
    rows, cols = np.nonzero(mask > 0.05)
    return mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]


def sized_stamp(text: str, height: int, bold: bool = False) -> np.ndarray:
    """``stamp_mask`` resized to ``height`` pixels, its aspect kept."""
    mask = stamp_mask(text, bold)
    width = max(1, round(mask.shape[1] * height / mask.shape[0]))
    image = Image.fromarray((mask * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(image, dtype=np.float32) / 255.0


def stamp_position(
    side: int, shape: tuple[int, int], where: str, margin: int, jitter: tuple[float, float]
) -> tuple[int, int]:
    """The (row, column) of a stamp's top-left corner ``where`` (a corner or an edge's
    middle), ``margin`` pixels in from the border, moved by ``jitter`` (two values in [-1, 1])
    times half a margin."""
    height, width = shape
    far_row, far_col = side - height - margin, side - width - margin
    mid_row, mid_col = (side - height) // 2, (side - width) // 2
    row, col = {
        "top_left": (margin, margin),
        "top_right": (margin, far_col),
        "bottom_left": (far_row, margin),
        "bottom_right": (far_row, far_col),
        "left": (mid_row, margin),
        "right": (mid_row, far_col),
        "top": (margin, mid_col),
        "bottom": (far_row, mid_col),
    }[where]
    row = int(np.clip(row + round(jitter[0] * margin / 2), 0, side - height))
    col = int(np.clip(col + round(jitter[1] * margin / 2), 0, side - width))
    return row, col


def stamp(
    images: np.ndarray,
    text: str,
    where: str,
    seed: int = 0,
    height: float = 0.07,
    value: int = 255,
    bold: bool = True,
) -> np.ndarray:
    """Burn ``text`` into every image at ``where``, ``height`` of the side tall, in grey
    ``value`` (255: white, as markers and overlays are)."""
    side = images.shape[-1]
    mask = sized_stamp(text, max(6, round(height * side)), bold)
    if mask.shape[1] > side - 4:  # a long text on a small image: fit it to the width
        mask = (
            np.asarray(
                Image.fromarray((mask * 255).astype(np.uint8)).resize(
                    (side - 4, max(3, round(mask.shape[0] * (side - 4) / mask.shape[1])))
                ),
                dtype=np.float32,
            )
            / 255.0
        )
    rng = np.random.default_rng(seed)
    out = images.astype(np.float32)
    margin = max(1, round(0.03 * side))
    for image in out:
        row, col = stamp_position(side, mask.shape, where, margin, tuple(rng.uniform(-1, 1, 2)))
        patch = image[row : row + mask.shape[0], col : col + mask.shape[1]]
        patch[...] = patch * (1 - mask) + value * mask
    return _to_u8(out)


def crop(images: np.ndarray, fraction: float) -> np.ndarray:
    """Tighter framing: the central ``fraction`` of each side, resized back to the full side."""
    side = images.shape[-1]
    keep = max(2, round(fraction * side))
    start = (side - keep) // 2
    return _resize_each(images[:, start : start + keep, start : start + keep], side)


def pad(images: np.ndarray, fraction: float, value: int = 0) -> np.ndarray:
    """Looser framing: each image shrunk to ``fraction`` of the side in the middle of a band of
    grey ``value`` (0: the unexposed black around a collimated film)."""
    side = images.shape[-1]
    inner = max(2, round(fraction * side))
    start = (side - inner) // 2
    out = np.full_like(images, value)
    out[:, start : start + inner, start : start + inner] = _resize_each(images, inner)
    return out


def border(images: np.ndarray, fraction: float, value: int) -> np.ndarray:
    """A band ``fraction`` of the side wide on all four sides, in grey ``value``."""
    width = max(1, round(fraction * images.shape[-1]))
    out = images.copy()
    out[:, :width], out[:, -width:] = value, value
    out[:, :, :width], out[:, :, -width:] = value, value
    return out


def brightness(images: np.ndarray, factor: float) -> np.ndarray:
    return _to_u8(images.astype(np.float32) * factor)


def contrast(images: np.ndarray, factor: float) -> np.ndarray:
    """Contrast about each image's mean (as the training jitter does)."""
    x = images.astype(np.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    return _to_u8((x - mean) * factor + mean)


def gamma(images: np.ndarray, value: float) -> np.ndarray:
    """A tone curve: pixels in [0, 1] raised to ``value``."""
    return _to_u8(255.0 * (images.astype(np.float32) / 255.0) ** value)


def rotate(images: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation about the centre (bilinear; black where nothing was)."""
    return np.stack(
        [
            np.asarray(
                Image.fromarray(image).rotate(degrees, Image.Resampling.BILINEAR, fillcolor=0)
            )
            for image in images
        ]
    )


def hflip(images: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(images[:, :, ::-1])


def _resize_each(images: np.ndarray, side: int) -> np.ndarray:
    return np.stack(
        [
            np.asarray(Image.fromarray(image).resize((side, side), Image.Resampling.BILINEAR))
            for image in images
        ]
    )


def _to_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


# --- the check's edits -----------------------------------------------------------------------


@dataclass(frozen=True)
class Edit:
    """One label-preserving edit of the counterfactual check."""

    name: str
    family: str  # framing, marker, text, border, exposure, geometry
    apply: Callable[[np.ndarray, int], np.ndarray]  # (images, seed) -> images


def _corner_text(images: np.ndarray, seed: int) -> np.ndarray:
    """Exposure, time, date and a projection marker, one in each corner."""
    texts = ("kVp 70", "10:42", "2016-03-08", "PORTABLE")
    for i, (text, where) in enumerate(zip(texts, CORNERS, strict=True)):
        images = stamp(images, text, where, seed + i, height=0.045)
    return images


CHECK_EDITS: tuple[Edit, ...] = (
    Edit("crop 0.9", "framing", lambda x, s: crop(x, 0.9)),
    Edit("crop 0.8", "framing", lambda x, s: crop(x, 0.8)),
    Edit("crop 0.7", "framing", lambda x, s: crop(x, 0.7)),
    Edit("pad 0.9", "framing", lambda x, s: pad(x, 0.9)),
    Edit("pad 0.8", "framing", lambda x, s: pad(x, 0.8)),
    Edit("crop 0.8 + R", "framing", lambda x, s: stamp(crop(x, 0.8), "R", "top_right", s)),
    Edit("R top right", "marker", lambda x, s: stamp(x, "R", "top_right", s)),
    Edit("L top left", "marker", lambda x, s: stamp(x, "L", "top_left", s)),
    Edit("R right edge", "marker", lambda x, s: stamp(x, "R", "right", s)),
    Edit("text corners", "text", _corner_text),
    Edit("text bottom edge", "text", lambda x, s: stamp(x, "ID 004512", "bottom", s, 0.045)),
    Edit("black band 0.08", "border", lambda x, s: border(x, 0.08, 0)),
    Edit("white band 0.08", "border", lambda x, s: border(x, 0.08, 255)),
    Edit("brightness 0.85", "exposure", lambda x, s: brightness(x, 0.85)),
    Edit("brightness 1.15", "exposure", lambda x, s: brightness(x, 1.15)),
    Edit("contrast 0.85", "exposure", lambda x, s: contrast(x, 0.85)),
    Edit("contrast 1.15", "exposure", lambda x, s: contrast(x, 1.15)),
    Edit("gamma 0.8", "exposure", lambda x, s: gamma(x, 0.8)),
    Edit("gamma 1.25", "exposure", lambda x, s: gamma(x, 1.25)),
    Edit("rotate -5", "geometry", lambda x, s: rotate(x, -5.0)),
    Edit("rotate +5", "geometry", lambda x, s: rotate(x, 5.0)),
    Edit("flip", "geometry", lambda x, s: hflip(x)),
)
"""The counterfactual check's edits, each within what another site's films show."""
