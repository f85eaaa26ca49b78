"""What the scoring job's model actor costs outside its networks (issue 22, benchmark a).

One ``BundlePredictor`` is called directly, in this process, on pre-decoded batches (decode
tasks' output: images, their statistics, read errors), as Ray Data calls it. Twice: with null
networks (trivial compute with the real outputs' shapes), which leaves what the actor itself
costs (input conversion, calibration, thresholds, the KNN query, the anomaly score, the Arrow
rows), and with the real networks, whose share is the rest.

    python benchmarks/benchmark_actor.py [--images 2048] [--batch-size 64] [--image-size 224]
        [--threads 2] [--repeats 3]

The target on the 2-core development machine: at least 3,000 images/s per actor with null
networks (under 0.33 ms per image outside the networks).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.benchmark_score import untrained_bundle  # noqa: E402
from pneumo_ray.io.data import decode_batch  # noqa: E402
from pneumo_ray.scoring.score import BundlePredictor  # noqa: E402

DEFAULT_SOURCE = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray" / "test"
TARGET_NULL_IMAGES_PER_S = 3000


class NullCNN(nn.Module):
    """A CNN's interface (forward, embedding, head) at almost no compute: one pixel per image."""

    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.outputs = outputs
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # the bundle's device

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :1].expand(-1, 128)  # (B, 128)

    def head(self, e: torch.Tensor) -> torch.Tensor:
        logits = e[:, : max(1, self.outputs)]
        return logits[:, 0] if self.outputs == 1 else logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embedding(x))


class Corner(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :1, :1]


class NullAutoencoder(nn.Module):
    """``autoencoder_outputs``' interface: an encoder of one trivial block, an identity decoder
    (the pixel MSE is then one pass over the pixels, as any MSE is)."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.ModuleList([Corner()])
        self.decoder = nn.Identity()


def null_networks(actor: BundlePredictor) -> None:
    bundle = actor.bundle
    bundle.binary, bundle.multiclass = NullCNN(1), NullCNN(3)
    bundle.autoencoder = NullAutoencoder()


def decoded_batches(source: Path, images: int, batch_size: int, size: int) -> list[dict]:
    """``images`` rows, cycling through the source's JPEGs, decoded once as the decode tasks
    decode them, in batches of ``batch_size``."""
    files = sorted(source.rglob("*.jpeg"))
    uris = np.array([str(files[i % len(files)]) for i in range(images)], dtype=object)
    batches = []
    for start in range(0, images, batch_size):
        part = uris[start : start + batch_size]
        batch = {
            "image_uri": part,
            "image_bytes": np.full(len(part), 1000, dtype=np.int64),
            "image_mtime_ns": np.full(len(part), 1, dtype=np.int64),
        }
        batches.append(decode_batch(batch, size))
    return batches


def images_per_s(actor: BundlePredictor, batches: list[dict], repeats: int) -> list[float]:
    actor(batches[0])  # warm up (first-call allocations, lazy imports)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        rows = sum(actor(batch).num_rows for batch in batches)
        rates.append(rows / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--real-images", type=int, default=256, help="images for the real nets")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    batches = decoded_batches(Path(args.source), args.images, args.batch_size, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        uri = untrained_bundle(args.image_size, f"{tmp}/bundle", tta="flip")
        actor = BundlePredictor(uri, use_gpu=False, threads=args.threads, gpu_decode=False)
        real = images_per_s(actor, batches[: max(1, args.real_images // args.batch_size)], 1)[0]
        null_networks(actor)
        null = images_per_s(actor, batches, args.repeats)
    best = max(null)
    print(
        f"one model actor, {args.threads} torch threads, batches of {args.batch_size} "
        f"pre-decoded {args.image_size}x{args.image_size} images, flip TTA"
    )
    print(
        "null networks: "
        + ", ".join(f"{r:.0f}" for r in null)
        + f" images/s ({1000 / best:.3f} ms per image; target >= {TARGET_NULL_IMAGES_PER_S})"
    )
    print(f"real networks (seed CNNs, autoencoder): {real:.1f} images/s")
    print(f"share of the actor's time outside the networks: {real / best:.3f}")


if __name__ == "__main__":
    main()
