"""What a DICOM radiograph costs to decode, per image on one core.

The full-resolution X-rays, resized to ``--side`` px high (a detector's size), are saved as
16-bit DICOM, uncompressed and as JPEG Lossless (the usual PACS transfer syntax for
radiographs, decoded through GDCM). Each is decoded to the model's input size by
``decode_image`` twice, side by side: with the display mapping (modality LUT, window,
stretch) through a lookup table of the stored values (the decoder's path for integer
pixels), and per pixel (its path before, kept for the rest). The two give the same pixels.

    python benchmarks/benchmark_dicom.py [--images 12] [--side 2400] [--image-size 224]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pneumo_ray.io import images  # noqa: E402

DEFAULT_FULLRES = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray_fullres"


def make_dicoms(sources: list[Path], folder: Path, side: int) -> dict[str, list[bytes]]:
    """The sources as 16-bit DICOM files' bytes: uncompressed and JPEG Lossless."""
    from dicom import transcode, write_dicom  # tests/dicom.py

    files: dict[str, list[bytes]] = {"uncompressed": [], "JPEG Lossless": []}
    for i, source in enumerate(sources):
        gray = Image.open(source).convert("L")
        gray = np.asarray(gray.resize((round(side * gray.width / gray.height), side)))
        plain, packed = folder / f"{i}.dcm", folder / f"{i}-jll.dcm"
        write_dicom(plain, gray, bits=16, slope=1.0, intercept=-1024.0)
        transcode(plain, packed, "JPEGLosslessProcess14_1")
        files["uncompressed"].append(plain.read_bytes())
        files["JPEG Lossless"].append(packed.read_bytes())
    return files


def ms_per_image(blobs: list[bytes], image_size: int, table: bool, repeats: int) -> float:
    """Best of ``repeats`` passes of decode_image over ``blobs``, in ms per image."""
    levels = images.DICOM_TABLE_LEVELS
    images.DICOM_TABLE_LEVELS = levels if table else 0  # 0: every frame per pixel
    try:
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            for blob in blobs:
                images.decode_image(blob, image_size)
            best = min(best, time.perf_counter() - started)
    finally:
        images.DICOM_TABLE_LEVELS = levels
    return 1000 * best / len(blobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fullres", type=Path, default=DEFAULT_FULLRES)
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--side", type=int, default=2400)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    sources = sorted(args.fullres.rglob("*.jpeg"))[: args.images]
    if not sources:
        sys.exit(f"no .jpeg files under {args.fullres}")
    with tempfile.TemporaryDirectory(prefix="pneumo_ray_dicom_") as scratch:
        files = make_dicoms(sources, Path(scratch), args.side)
        print(
            f"{len(sources)} 16-bit DICOMs {args.side} px high -> {args.image_size} px; ms per "
            f"image on one core, best of {args.repeats}"
        )
        print(f"{'file':<14} {'MB':>5} {'per pixel':>10} {'table':>7} {'per pixel / table':>18}")
        for kind, blobs in files.items():
            direct = ms_per_image(blobs, args.image_size, False, args.repeats)
            table = ms_per_image(blobs, args.image_size, True, args.repeats)
            same = all(
                np.array_equal(
                    images.decode_image(b, args.image_size),
                    _per_pixel(b, args.image_size),
                )
                for b in blobs[:2]
            )
            megabytes = np.mean([len(b) for b in blobs]) / 1e6
            print(
                f"{kind:<14} {megabytes:>5.1f} {direct:>10.1f} {table:>7.1f} "
                f"{direct / table:>18.2f}{'' if same else '  PIXELS DIFFER'}",
                flush=True,
            )


def _per_pixel(blob: bytes, image_size: int) -> np.ndarray:
    levels, images.DICOM_TABLE_LEVELS = images.DICOM_TABLE_LEVELS, 0
    try:
        return images.decode_image(blob, image_size)
    finally:
        images.DICOM_TABLE_LEVELS = levels


if __name__ == "__main__":
    main()
