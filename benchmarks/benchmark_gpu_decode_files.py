"""Where GPU-decode scoring decodes the files nvJPEG cannot take: DICOM, 16-bit PNG.

With ``--decode gpu`` (the default on GPU nodes) the decode tasks used to pass every file's
bytes to the model actor, which decoded what nvJPEG cannot take on its own CPU thread, one
file after another, its GPU idle the while. Now the decode tasks (every CPU of the node, in
parallel) decode those files and pass on their pixels. This script measures both sides, one
kind of file at a time, in one run:

- the actor's seconds per image to turn a batch of rows into images: the raw bytes (before)
  against the pixels a decode task made (now); on a GPU node this is time its GPU waits;
- the decode task's seconds per image (read, header check, decode), which a node spreads
  over all of its CPUs;
- the bytes a block of 256 rows carries through the object store, either way.

    python benchmarks/benchmark_gpu_decode_files.py [--images 24] [--image-size 224]
        [--side 2400] [--fullres ../shared/data/chest_xray_fullres]

Files are made from the full-resolution X-rays, resized to ``--side`` px high (a detector's
size; 2,000-3,000 px is usual for chest radiographs) and saved as 16-bit DICOM and 16-bit
PNG; the JPEG row takes the originals as they are.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pneumo_ray.io.data import read_batch  # noqa: E402
from pneumo_ray.models.predict import ImageDecoder  # noqa: E402

DEFAULT_FULLRES = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_fullres"
BLOCK_ROWS = 256  # rows per decode block on a large store (scoring.score.DECODE_BLOCK_MAX)


def make_files(sources: list[Path], folder: Path, kind: str, side: int) -> list[str]:
    """``kind`` files (dicom, png16 or jpeg) made from ``sources``; their paths."""
    from dicom import write_dicom  # tests/dicom.py

    paths = []
    for i, source in enumerate(sources):
        if kind == "jpeg":
            paths.append(str(source))
            continue
        gray = Image.open(source).convert("L")
        gray = np.asarray(gray.resize((round(side * gray.width / gray.height), side)))
        path = folder / f"{kind}-{i}.{'dcm' if kind == 'dicom' else 'png'}"
        if kind == "dicom":
            write_dicom(path, gray, bits=16)
        else:
            buffer = io.BytesIO()
            Image.fromarray(gray.astype(np.uint16) * 257).save(buffer, "PNG")
            path.write_bytes(buffer.getvalue())
        paths.append(str(path))
    return paths


def seconds_per_image(fn, n: int, repeats: int) -> float:
    """The fastest of ``repeats`` calls of ``fn``, per image."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best / n


def measure(paths: list[str], image_size: int, repeats: int) -> dict[str, float]:
    n = len(paths)
    blobs = [Path(p).read_bytes() for p in paths]
    batch = {"image_uri": np.array(paths, dtype=object)}
    # the actor's decoder as on a GPU node: nvJPEG for the JPEGs it can take, the CPU
    # decoder for the rest (this machine has no CUDA: the JPEG row's actor side is the CPU's)
    decoder = ImageDecoder(image_size, torch.device("cpu"), gpu=False)
    read = read_batch(dict(batch), image_size)
    decoded = list(read["image_decoded"])
    before = seconds_per_image(lambda: decoder(blobs, [""] * n), n, repeats)
    now = seconds_per_image(
        lambda: decoder(list(read["image_data"]), [""] * n, decoded), n, repeats
    )
    task = seconds_per_image(lambda: read_batch(dict(batch), image_size), n, repeats)
    return {
        "decoded_in_task": float(np.mean(decoded)),
        "actor_before_ms": 1000 * before,
        "actor_now_ms": 1000 * now,
        "task_now_ms": 1000 * task,
        "block_before_mb": BLOCK_ROWS * np.mean([len(b) for b in blobs]) / 1e6,
        "block_now_mb": BLOCK_ROWS * np.mean([len(b) for b in read["image_data"]]) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fullres", type=Path, default=DEFAULT_FULLRES)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--side", type=int, default=2400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one actor's CPU thread; one decode task's core

    sources = sorted(args.fullres.rglob("*.jpeg"))[: args.images]
    if not sources:
        sys.exit(f"no .jpeg files under {args.fullres}")
    print(
        f"{len(sources)} images per kind, {args.side} px high (DICOM, PNG), model input "
        f"{args.image_size} px; seconds per image on one core, best of {args.repeats}",
        flush=True,
    )
    header = (
        f"{'kind':<6} {'in task':>8} {'actor ms before':>16} {'now':>6} {'task ms now':>12} "
        f"{'actor images/s before':>22} {'block MB before':>16} {'now':>6}"
    )
    print(header)
    with tempfile.TemporaryDirectory(prefix="pneumo_ray_gpu_decode_") as scratch:
        for kind in ("dicom", "png16", "jpeg"):
            paths = make_files(sources, Path(scratch), kind, args.side)
            m = measure(paths, args.image_size, args.repeats)
            print(
                f"{kind:<6} {m['decoded_in_task']:>8.0%} {m['actor_before_ms']:>16.2f} "
                f"{m['actor_now_ms']:>6.2f} {m['task_now_ms']:>12.2f} "
                f"{1000 / m['actor_before_ms']:>22.1f} "
                f"{m['block_before_mb']:>16.1f} {m['block_now_mb']:>6.1f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
