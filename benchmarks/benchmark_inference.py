"""What test-time augmentation, the inpainting anomaly score and Grad-CAM heatmaps cost: the
bundle's models on decoded images, in this process, side by side in one run.

    python benchmarks/benchmark_inference.py [--image-size 128 224] [--images 512] [--rounds 3]
        [--threads 2]

Five settings of one untrained bundle (throughput does not depend on the weights): the
design's inference (no TTA, pixel-MSE anomaly score), flip TTA, the inpainting score, both,
and the design's inference plus a Grad-CAM overlay PNG of both CNNs for every image (what
``--heatmaps all`` adds to each image; ``flagged`` adds it to the flagged share only). The
rounds interleave the settings so that machine noise falls on all of them alike; each figure
is the median of the rounds, with the ratio to the design's in the same run. Decoding is left
out: it is the same for every setting (see benchmark_score.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from benchmark_score import untrained_bundle  # noqa: E402  (benchmarks/, beside this file)

from pneumo_ray.models.bundle import load_bundle  # noqa: E402
from pneumo_ray.scoring.heatmaps import explain  # noqa: E402

SETTINGS = {
    "design": {"tta": "none", "score": "mse"},
    "flip TTA": {"tta": "flip", "score": "mse"},
    "inpaint score": {"tta": "none", "score": "inpaint"},
    "flip TTA + inpaint": {"tta": "flip", "score": "inpaint"},
    "design + heatmaps": {"tta": "none", "score": "mse", "heatmaps": True},
}


def images_per_s(bundle, images: np.ndarray, batch_size: int, heatmaps: bool = False) -> float:
    started = time.perf_counter()
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        predictions = bundle.predict(batch)
        if heatmaps:
            explain(bundle, batch, predictions)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {args.threads}, {args.images} images, batch {args.batch_size}")
    for size in args.image_size:
        with tempfile.TemporaryDirectory() as scratch:
            bundle = load_bundle(untrained_bundle(size, f"{scratch}/bundle"))
        images = np.random.default_rng(0).integers(0, 256, (args.images, size, size), np.uint8)
        rates: dict[str, list[float]] = {name: [] for name in SETTINGS}
        images_per_s(bundle, images[: args.batch_size], args.batch_size)  # warm-up
        for _ in range(args.rounds):
            for name, setting in SETTINGS.items():
                bundle.card.setdefault("inference", {})["tta"] = setting["tta"]
                bundle.card["models"]["autoencoder"]["score"] = setting["score"]
                rates[name].append(
                    images_per_s(bundle, images, args.batch_size, setting.get("heatmaps", False))
                )
        design = statistics.median(rates["design"])
        print(f"\n{size}x{size}: images/s (median of {args.rounds} rounds; each round)")
        for name, values in rates.items():
            median = statistics.median(values)
            shown = ", ".join(f"{v:.0f}" for v in values)
            print(f"  {name:<20} {median:7.1f}  x{median / design:.2f} of design  [{shown}]")


if __name__ == "__main__":
    main()
