"""Per split and class of a labelled store: exposure and sharpness of the decoded images.

    python benchmarks/data_stats.py --data STORE [--image-size 128]

Prints, for each (split, class), the mean over images of the pixel mean, the pixel standard
deviation and the high-frequency energy (standard deviation of the 4-neighbour Laplacian), all
on [0, 1] pixels at the model input size. On the Kermany images this shows why the design's
pixel-MSE anomaly score ranks the classes backwards (pneumonia images carry less fine detail, so
they reconstruct better) and one measurable part of the train -> test shift.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.cli import user_errors  # noqa: E402
from pneumo_ray.io.data import list_store, load_image  # noqa: E402
from pneumo_ray.io.images import (
    ImageDecodeError,  # noqa: E402
    image_stats,  # noqa: E402
)
from pneumo_ray.io.stores import StoreError  # noqa: E402
from pneumo_ray.monitoring.drift import IMAGE_STATS  # noqa: E402


def image_row(pixels: np.ndarray) -> tuple[float, float, float]:
    """(mean, std, Laplacian std) of one uint8 image: the scoring job's drift statistics."""
    stats = image_stats(pixels[None])
    return tuple(float(stats[name][0]) for name in IMAGE_STATS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args(argv)
    groups: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for image in list_store(args.data):
        try:
            pixels = load_image(image.uri, args.image_size)
        except (ImageDecodeError, StoreError, OSError) as exc:
            print(f"skipped unreadable image {image.uri}: {exc}", file=sys.stderr)
            continue
        groups[(image.split, image.label)].append(image_row(pixels))
    print(f"{'split':<6} {'class':<10} {'images':>6} {'mean':>6} {'std':>6} {'laplacian':>10}")
    for (split, label), rows in sorted(groups.items()):
        mean, std, laplacian = np.mean(rows, axis=0)
        print(f"{split:<6} {label:<10} {len(rows):>6} {mean:6.3f} {std:6.3f} {laplacian:10.4f}")


if __name__ == "__main__":
    try:
        main()
    except user_errors() as exc:
        sys.exit(f"data_stats.py: error: {exc}")
