"""Scoring throughput and memory: the Ray Data job vs a plain single-process loop.

Both score the same images with the same bundle (all four models), the same decoder and the
same cores, in one run; the plain loop reads, decodes and predicts batch by batch in this
process. Then the Ray job alone scores a larger set while a sampler sums the proportional set
size (PSS: shared object-store pages counted once) of every Ray process.

    python benchmarks/benchmark_score.py [--source ../shared/data/chest_xray_fullres]
        [--images 5000] [--memory-images 20000] [--image-size 224] [--model BUNDLE]

The images are the full-resolution X-rays replicated by symbolic links. Without --model an
untrained bundle of the right shapes is used: throughput does not depend on the weights.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import contextlib

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.memory import MemorySampler  # noqa: E402
from pneumo_ray.io.data import load_image  # noqa: E402
from pneumo_ray.io.images import ImageDecodeError  # noqa: E402
from pneumo_ray.io.labels import CLASS_LABELS  # noqa: E402
from pneumo_ray.io.stores import StoreError  # noqa: E402
from pneumo_ray.models.autoencoder import ConvAutoencoder  # noqa: E402
from pneumo_ray.models.bundle import Bundle, load_bundle, write_bundle  # noqa: E402
from pneumo_ray.models.knn import KnnReference  # noqa: E402
from pneumo_ray.models.networks import build_network  # noqa: E402
from pneumo_ray.models.patchcore import CORESET_MAX, PatchFeatures, PatchMemory  # noqa: E402
from pneumo_ray.models.predict import plan_actors  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402
from pneumo_ray.scoring.score import ScoreConfig, run_scoring  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_fullres"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument(
        "--images", type=int, default=5000, help="images for the ratio (0 skips it)"
    )
    parser.add_argument(
        "--memory-images", type=int, default=20000, help="images for the memory run (0 skips it)"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default=None, help="bundle (default: an untrained one)")
    return parser.parse_args()


def replicate(source: Path, count: int, target: Path) -> Path:
    """``count`` images under ``target``, as symbolic links cycling through ``source``."""
    originals = sorted(source.rglob("*.jpeg"))
    target.mkdir(parents=True)
    for i in range(count):
        original = originals[i % len(originals)]
        (target / f"{i:06d}_{original.name}").symlink_to(original.resolve())
    return target


def untrained_bundle(
    image_size: int,
    uri: str,
    binary: torch.nn.Module | None = None,
    architecture: str = "seed",
    patchcore: bool = False,
    tta: str = "none",
) -> str:
    """A bundle of the right shapes (untrained networks, a KNN over random features) at
    ``uri``: throughput does not depend on the weights. ``binary``: a trained binary network
    to use instead of an untrained one; ``architecture``: the two CNNs'; ``patchcore``: the
    PatchCore anomaly score (ImageNet Lite0 patch features, a full-size memory bank of random
    patches) instead of the autoencoder's pixel MSE; ``tta``: the CNNs' test-time
    augmentation."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    references = 4000  # about the size of a real training set
    knn = KnnReference.fit(
        [f"/reference/{i}.jpeg" for i in range(references)],
        list(rng.choice(CLASS_LABELS, references)),
        rng.random((references, 3)).astype(np.float32),
        k=5,
        feature_kind="softmax",
    )
    spec = {"architecture": architecture}
    card = {
        "image_size": image_size,
        "inference": {"tta": tta},
        "models": {
            "binary": {"threshold": 0.5, "network": spec},
            "multiclass": {"network": spec},
            # The design's pixel MSE: the latent score would need a normal reference set.
            "autoencoder": {"threshold": 0.01, "score": "patchcore" if patchcore else "mse"},
        },
    }
    extractor = memory = None
    if patchcore:
        extractor = PatchFeatures("efficientnet_lite0", pretrained=False)
        card["models"]["patchcore"] = {"architecture": "efficientnet_lite0"}
        with torch.inference_mode():
            dim = extractor.features(torch.zeros(1, 1, image_size, image_size)).shape[-1]
        memory = PatchMemory(
            rng.random((CORESET_MAX, dim), np.float32), PatchFeatures.grid(image_size)
        )
        extractor.set_memory(memory.features)
    bundle = Bundle(
        card,
        (binary or build_network("binary", image_size, spec)).eval(),
        build_network("multiclass", image_size, spec).eval(),
        ConvAutoencoder(image_size).eval(),
        knn,
        patchcore=extractor,
        patch_memory=memory,
    )
    write_bundle(bundle, uri)
    return uri


def plain_loop(bundle_uri: str, folder: Path, batch_size: int, threads: int) -> float:
    """Read, decode and score every image in this process; returns images/s."""
    torch.set_num_threads(threads)
    bundle = load_bundle(bundle_uri)
    paths = sorted(str(p) for p in folder.iterdir())
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start : start + batch_size]:
            with contextlib.suppress(ImageDecodeError, StoreError, OSError):
                images.append(load_image(path, bundle.image_size))
        bundle.predict(np.stack(images))
    return len(paths) / (time.perf_counter() - started)


def main(args: argparse.Namespace) -> None:
    init_ray()
    with tempfile.TemporaryDirectory(
        dir=os.path.abspath("out") if os.path.isdir("out") else None
    ) as scratch:
        root = Path(scratch)
        model = args.model or untrained_bundle(args.image_size, str(root / "bundle"))
        print(
            f"model input {load_bundle(model).image_size}px, batch {args.batch_size}, "
            f"{os.cpu_count()} cores",
            flush=True,
        )
        if args.images:
            folder = replicate(Path(args.source), args.images, root / "images")
            config = ScoreConfig(
                model=model,
                inputs=[str(folder)],
                output=str(root / "scores"),
                batch_size=args.batch_size,
                heatmaps="none",  # the scoring path as before; heatmaps: benchmark_inference
            )
            plan = plan_actors(config.num_workers, config.use_gpu, config.threads_per_actor)
            plain = plain_loop(model, folder, args.batch_size, threads=plan.threads)
            print(
                f"{args.images} full-resolution images; plain loop ({plan.threads} torch "
                f"threads): {plain:.1f} images/s",
                flush=True,
            )
            summary = run_scoring(config)
            ray_rate = summary.images_per_s
            print(
                f"Ray Data job ({plan.max_actors} actor(s), decode in CPU tasks): "
                f"{ray_rate:.1f} images/s",
                flush=True,
            )
            print(f"ratio Ray / plain: {ray_rate / plain:.2f} (target >= 0.80)", flush=True)

        if args.memory_images:
            big = replicate(Path(args.source), args.memory_images, root / "many")
            sampler = MemorySampler(interval=0.5)
            sampler.start()
            summary = run_scoring(
                ScoreConfig(
                    model=model,
                    inputs=[str(big)],
                    output=str(root / "scores_many"),
                    batch_size=args.batch_size,
                    heatmaps="none",  # the scoring path as before; heatmaps: benchmark_inference
                )
            )
            peak = sampler.stop().total_pss
            print(
                f"memory run: {summary.scored + summary.failed} images at "
                f"{summary.images_per_s:.1f} images/s; peak PSS of all Ray processes "
                f"(driver included): {peak / 2**30:.2f} GiB (target < 4 GiB)",
                flush=True,
            )


if __name__ == "__main__":
    main(parse_args())
