"""Would cropping every film to its thorax make the input framing-independent (issue 31, point 3)?

    python benchmarks/thorax_box.py [--store ../shared/data/chest_xray] [--images 300] [--seed 0]

Two label-free thorax boxes, found on a 32 or 64 px copy of each training image as decoded
for the networks:

- ``body``: the bounding box of the largest bright connected region (above Otsu's threshold),
  the issue's suggestion;
- ``lungs``: the bounding box of the two largest dark regions (below Otsu's threshold, after
  an opening) that do not touch the image's edge: the lung fields, where the body is the frame.

A crop to the box is framing-independent when a film framed more tightly gives the same box
on the anatomy. The check edits each film with the counterfactual check's own tighter framing
(``edits.crop``, the central 80% of each side), finds the box again and maps it back to the
film's coordinates: the box's IoU with the unedited film's box is 1 for a perfectly
framing-independent crop, and 0.64 (the edit's own area) for no crop at all. Printed per
method: the box's area (median, by class), how often no box is found, and the IoU.

Only training images are read, and no network: this runs before any training it would decide.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.io import edits  # noqa: E402
from pneumo_ray.io.data import list_store, load_image  # noqa: E402

CROP = 0.8  # the check's "crop to the central 80%"
SIZE = 224


def small(image: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    resized = Image.fromarray(image).resize((side, side), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.float32) / 255.0


def otsu(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist / hist.sum()
    w, mu = np.cumsum(p), np.cumsum(p * edges[:-1])
    between = (mu[-1] * w - mu) ** 2 / (w * (1.0 - w) + 1e-12)
    return float(edges[np.argmax(between) + 1])


def bounds(mask: np.ndarray, margin: float) -> tuple[float, float, float, float]:
    """(top, left, bottom, right) of ``mask``'s pixels as fractions of the side, widened."""
    side = mask.shape[0]
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom = rows[0] / side - margin, (rows[-1] + 1) / side + margin
    left, right = cols[0] / side - margin, (cols[-1] + 1) / side + margin
    return max(top, 0.0), max(left, 0.0), min(bottom, 1.0), min(right, 1.0)


def body_box(image: np.ndarray) -> tuple | None:
    from scipy import ndimage

    x = small(image, 32)
    labels, n = ndimage.label(x > otsu(x))
    if n == 0:
        return None
    sizes = ndimage.sum(np.ones_like(x), labels, range(1, n + 1))
    return bounds(labels == np.argmax(sizes) + 1, 1 / 32)


def lung_box(image: np.ndarray, side: int = 64) -> tuple | None:
    from scipy import ndimage

    x = ndimage.gaussian_filter(small(image, side), 1.0)
    dark = ndimage.binary_opening(x < otsu(x), iterations=2)
    labels, n = ndimage.label(dark)
    edge = set(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]).tolist())
    regions = [
        (int((labels == k).sum()), k)
        for k in range(1, n + 1)
        if k not in edge and (labels == k).sum() >= 0.01 * side * side
    ]
    if not regions:
        return None
    keep = [k for _, k in sorted(regions, reverse=True)[:2]]
    return bounds(np.isin(labels, keep), 0.06)


def area(box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(
        0.0, min(a[3], b[3]) - max(a[1], b[1])
    )
    return inter / (area(a) + area(b) - inter)


def in_film_coordinates(box) -> tuple:
    """A box found on the edited (cropped) film, in the unedited film's coordinates."""
    offset = (1.0 - CROP) / 2
    return tuple(offset + CROP * v for v in box)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store", default=str(Path(__file__).resolve().parents[2] / "shared/data/chest_xray")
    )
    parser.add_argument("--images", type=int, default=300, help="training images drawn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    train = sorted((i for i in list_store(args.store) if i.split == "train"), key=lambda i: i.uri)
    drawn = random.Random(args.seed).sample(train, min(args.images, len(train)))
    films = np.stack([load_image(image.uri, SIZE) for image in drawn])
    tighter = edits.crop(films, CROP)
    is_normal = np.array([image.label == "normal" for image in drawn])
    summary = {}
    print(f"{len(drawn)} training images ({is_normal.sum()} normal), crop to {CROP:.0%}")
    print(
        f"{'box':<6} {'area normal':>12} {'area pneum.':>12} {'no box':>7} "
        f"{'IoU med [p10-p90]':>22}"
    )
    for name, find in (("body", body_box), ("lungs", lung_box)):
        areas, found, overlaps = [], [], []
        for film, edited in zip(films, tighter, strict=True):
            box, box_edited = find(film), find(edited)
            found.append(box is not None)
            areas.append(area(box) if box else np.nan)
            both = box is not None and box_edited is not None
            overlaps.append(iou(box, in_film_coordinates(box_edited)) if both else 0.0)
        areas, overlaps = np.array(areas), np.array(overlaps)
        row = {
            "area_normal": float(np.nanmedian(areas[is_normal])),
            "area_pneumonia": float(np.nanmedian(areas[~is_normal])),
            "no_box": float(1.0 - np.mean(found)),
            "iou_median": float(np.median(overlaps)),
            "iou_p10": float(np.percentile(overlaps, 10)),
            "iou_p90": float(np.percentile(overlaps, 90)),
        }
        summary[name] = row
        print(
            f"{name:<6} {row['area_normal']:>12.2f} {row['area_pneumonia']:>12.2f} "
            f"{row['no_box']:>7.1%} {row['iou_median']:>8.2f} "
            f"[{row['iou_p10']:.2f}-{row['iou_p90']:.2f}]"
        )
    print(f"(no crop at all: IoU {CROP * CROP:.2f}; a framing-independent crop: 1.00)")
    print(f"{time.perf_counter() - started:.0f}s in all")
    return summary


if __name__ == "__main__":
    main()
