"""What the pretrained backbone costs at scoring time: the scoring job's images/s with the
seed CNNs against EfficientNet-Lite0 CNNs (with the autoencoder's score, then with PatchCore's),
at the same input size, side by side in one run.

    python benchmarks/benchmark_backbones.py [--source ../shared/data/chest_xray/test]
        [--images 600] [--image-size 224] [--repeats 1]

Each bundle scores the same images (replicated by symbolic links) with ``jobs/score.py``'s
``run_scoring`` on an embedded Ray: decode in Ray Data tasks, CPU model actors, the flip TTA of
the quality profiles. Untrained bundles of the right shapes (throughput does not depend on the
weights) and a full-size PatchCore memory bank (10,000 random patches). Before the jobs, a
forward pass of each network alone in this process (batches of 16, channels-last), for where
the time goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import torch  # noqa: E402

from benchmarks.benchmark_score import replicate, untrained_bundle  # noqa: E402
from pneumo_ray.models.bundle import load_bundle  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402
from pneumo_ray.scoring.score import ScoreConfig, run_scoring  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "test"
BUNDLES = {  # name -> (architecture, PatchCore anomaly score)
    "seed": ("seed", False),
    "efficientnet_lite0": ("efficientnet_lite0", False),
    "efficientnet_lite0+patchcore": ("efficientnet_lite0", True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="scoring runs per bundle")
    return parser.parse_args(argv)


def forward_rate(bundle_uri: str, image_size: int, seconds: float = 4.0) -> dict[str, float]:
    """Images/s of each network of the bundle alone (no TTA), batches of 16 on this process."""
    bundle = load_bundle(bundle_uri)
    x = torch.rand(16, 1, image_size, image_size).contiguous(memory_format=torch.channels_last)
    rates = {}
    with torch.inference_mode():
        for name, network in bundle.networks.items():
            network(x)
            started, images = time.perf_counter(), 0
            while time.perf_counter() - started < seconds:
                network(x)
                images += len(x)
            rates[name] = round(images / (time.perf_counter() - started), 1)
    return rates


def main(args: argparse.Namespace) -> dict:
    init_ray()
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = replicate(Path(args.source), args.images, root / "images")
        bundles = {}
        for name, (architecture, patchcore) in BUNDLES.items():
            uri = str(root / f"bundle-{name}")
            untrained_bundle(
                args.image_size, uri, architecture=architecture, patchcore=patchcore, tta="flip"
            )  # the quality profiles' TTA
            bundles[name] = uri
            results[name] = {"forward_images_per_s": forward_rate(uri, args.image_size)}
            print(f"{name}: forward alone {results[name]['forward_images_per_s']}", flush=True)
        for repeat in range(args.repeats):
            for name, uri in bundles.items():
                summary = run_scoring(
                    ScoreConfig(
                        model=uri,
                        inputs=[str(folder)],
                        output=str(root / f"scores-{name}-{repeat}"),
                        batch_size=args.batch_size,
                        heatmaps="none",
                    )
                )
                rate = round(summary.images_per_s, 1)
                results[name].setdefault("scoring_images_per_s", []).append(rate)
                print(f"{name}: scoring job {rate} images/s ({summary.scored} images)", flush=True)
    seed = results["seed"]["scoring_images_per_s"]
    print(f"\n{args.images} images at {args.image_size} px, flip TTA; scoring job images/s:")
    for name, figures in results.items():
        rates = figures["scoring_images_per_s"]
        ratios = [round(rate / base, 2) for rate, base in zip(rates, seed, strict=True)]
        figures["ratio_to_seed"] = ratios
        print(f"  {name:30s} {rates}  ratio to seed {ratios}")
    print(json.dumps(results), flush=True)
    return results


if __name__ == "__main__":
    main(parse_args())
