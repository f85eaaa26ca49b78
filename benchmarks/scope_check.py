"""The scope check of a bundle (issue 33): how many in-scope films it marks, and how many
pictures of other kinds it catches, from pixels alone (no metadata).

    python benchmarks/scope_check.py --model BUNDLE [--data STORE] [--json out.json]

In scope: the bundle's validation images (rebuilt from the card) and the test split of
``--data`` (default: the card's store). Out of scope, pictures this script makes or finds in
installed packages (none of them chose a threshold: the bundle's thresholds come from its
training and validation images alone):

- ``ct_mr``: pydicom's sample CT and MR slices and matplotlib's sample MR slice;
- ``ct_phantom``: drawn axial CT-like slices (body, lungs, spine, table);
- ``photo``: matplotlib's sample photographs and graphics;
- ``document``: drawn pages of text and tables;
- ``film_edits``: validation films turned 90 degrees, upside down, or inverted.

A bundle from before the scope check gets one fitted here, as training fits it (its Gaussians
on the training images, thresholds on validation), so that older bundles can be measured.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.cli import user_errors  # noqa: E402
from pneumo_ray.io.data import list_store, load_image  # noqa: E402

PYDICOM_SLICES = ("CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm")  # shipped in the wheel
MATPLOTLIB_PICTURES = ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png")


def _resized(pixels: np.ndarray, size: int) -> np.ndarray:
    image = Image.fromarray(np.asarray(pixels, dtype=np.uint8))
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def ct_mr_slices(size: int) -> list[np.ndarray]:
    """pydicom's sample CT and MR slices (decoded as the scoring job would, tags ignored) and
    matplotlib's sample MR slice (raw 16-bit)."""
    import matplotlib
    import pydicom.data

    from pneumo_ray.io.images import decode_image

    slices = []
    for name in PYDICOM_SLICES:
        try:
            path = pydicom.data.get_testdata_file(name)
        except Exception:  # noqa: BLE001 - a sample this pydicom lacks
            path = None
        if path:
            slices.append(decode_image(Path(path).read_bytes(), size))
    raw = Path(matplotlib.get_data_path()) / "sample_data" / "s1045.ima.gz"
    if raw.exists():
        values = np.frombuffer(gzip.decompress(raw.read_bytes()), "<u2").reshape(256, 256)
        slices.append(_resized(values.astype(np.float64) / max(1, values.max()) * 255, size))
    return slices


def ct_phantoms(size: int, count: int = 6) -> list[np.ndarray]:
    """Axial CT-like slices: an elliptic body, two dark lungs, a bright spine and ring of
    bone, the table below, on black; seeded variations."""
    rng = np.random.default_rng(7)
    slices = []
    for _ in range(count):
        image = Image.new("L", (256, 256), 0)
        draw = ImageDraw.Draw(image)
        w, h = rng.integers(150, 200), rng.integers(110, 150)
        box = (128 - w // 2, 120 - h // 2, 128 + w // 2, 120 + h // 2)
        draw.ellipse(box, fill=int(rng.integers(90, 130)), outline=220, width=4)
        for side in (-1, 1):
            cx = 128 + side * w // 4
            draw.ellipse((cx - w // 6, 120 - h // 3, cx + w // 6, 120 + h // 3), fill=15)
        draw.ellipse((118, 120 + h // 3 - 10, 138, 120 + h // 3 + 10), fill=240)
        draw.rectangle((40, 120 + h // 2 + 12, 216, 120 + h // 2 + 20), fill=160)
        noisy = np.asarray(image, np.float64) + rng.normal(0, 6, (256, 256))
        slices.append(_resized(np.clip(noisy, 0, 255), size))
    return slices


def photos(size: int) -> list[np.ndarray]:
    """matplotlib's sample photographs and graphics, as grey (the decoder's conversion)."""
    import matplotlib

    from pneumo_ray.io.images import decode_image

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [
        decode_image((folder / name).read_bytes(), size)
        for name in MATPLOTLIB_PICTURES
        if (folder / name).exists()
    ]


def documents(size: int, count: int = 4) -> list[np.ndarray]:
    """Scanned-document-like pages: lines of text, a table, on white or grey paper."""
    rng = np.random.default_rng(11)
    pages = []
    for i in range(count):
        page = Image.new("L", (400, 520), int(rng.integers(200, 255)))
        draw = ImageDraw.Draw(page)
        y = 30
        while y < 480:
            words = " ".join("x" * int(rng.integers(2, 9)) for _ in range(int(rng.integers(4, 9))))
            draw.text((30, y), f"Report line {y}: {words}", fill=int(rng.integers(0, 60)))
            y += int(rng.integers(14, 22))
        if i % 2:
            for x in range(30, 371, 85):
                draw.line((x, 300, x, 460), fill=40)
            for yy in range(300, 461, 32):
                draw.line((30, yy, 370, yy), fill=40)
        pages.append(_resized(np.asarray(page), size))
    return pages


def film_edits(films: np.ndarray) -> list[np.ndarray]:
    """Films turned 90 degrees, upside down, or inverted (negatives)."""
    return [
        *(np.rot90(film).copy() for film in films[0::3]),
        *(np.flipud(film).copy() for film in films[1::3]),
        *((255 - film) for film in films[2::3]),
    ]


def out_of_scope_pictures(size: int, films: np.ndarray) -> dict[str, list[np.ndarray]]:
    """Every group of out-of-scope pictures, uint8 ``(size, size)`` each."""
    return {
        "ct_mr": ct_mr_slices(size),
        "ct_phantom": ct_phantoms(size),
        "photo": photos(size),
        "document": documents(size),
        "film_edits": film_edits(films),
    }


def scope_inputs(bundle, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The features the scope Gaussians read (the bundle's own extractor, or a fresh one)."""
    import torch

    from pneumo_ray.io.images import to_model_input
    from pneumo_ray.models.outputs import network_outputs
    from pneumo_ray.models.scope import ScopeFeatures, scope_features

    extractor = bundle.scope or ScopeFeatures(pretrained=True).eval()
    parts = []
    for start in range(0, len(pixels), 64):
        x = to_model_input(pixels[start : start + 64]).contiguous(memory_format=torch.channels_last)
        models = {"multiclass": bundle.multiclass, "scope": extractor}
        parts.append(network_outputs(models, x, bundle.tta, inpaint=False))
    raw = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    return scope_features(raw)


def with_shifted(bundle, images, pixels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Scope features of the images as they are and acquisition-shifted (as training fits)."""
    from pneumo_ray.io.images import acquisition_shifted

    uris = np.array([image.uri for image in images], dtype=object)
    batches = [{"image_uri": uris[i : i + 64], "image": pixels[i : i + 64]}
               for i in range(0, len(pixels), 64)]  # fmt: skip
    shifted = np.concatenate([acquisition_shifted(batch, seed)["image"] for batch in batches])
    clean, moved = scope_inputs(bundle, pixels), scope_inputs(bundle, shifted)
    return {kind: np.concatenate([clean[kind], moved[kind]]) for kind in clean}


def load_pixels(images, size: int) -> np.ndarray:
    return np.stack([load_image(image.uri, size) for image in images])


def main(argv: list[str] | None = None) -> dict:
    from pneumo_ray.models.bundle import load_bundle
    from pneumo_ray.models.scope import ScopeReference
    from pneumo_ray.training.evaluation import validation_images

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundle folder or URI")
    parser.add_argument("--data", help="the store whose test split is scored (default: card's)")
    parser.add_argument(
        "--fit-images",
        type=int,
        default=0,
        help="a bundle without a scope reference: fit it on a seeded draw of this many training "
        "images (0: all, as training does)",
    )
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    bundle = load_bundle(args.model)
    size, card = bundle.image_size, bundle.card
    store = args.data or card["training"]["config"]["data"]
    val = validation_images(card)
    val_pixels = load_pixels(val, size)
    val_features = scope_inputs(bundle, val_pixels)
    reference, how = bundle.scope_reference, "the bundle's own"
    if reference is None:
        val_uris = {image.uri for image in val}
        train = [i for i in list_store(card["training"]["config"]["data"])
                 if i.split in ("train", "val") and i.uri not in val_uris]  # fmt: skip
        seed = card["training"]["config"]["seed"]
        if args.fit_images and len(train) > args.fit_images:
            keep = np.random.default_rng(seed).choice(len(train), args.fit_images, replace=False)
            train = [train[i] for i in sorted(keep)]
        reference = ScopeReference.fit(
            with_shifted(bundle, train, load_pixels(train, size), seed),
            with_shifted(bundle, val, val_pixels, seed + 1),
        )
        how = (f"fitted here on {len(train)} training images, clean and acquisition-shifted, "
               "as training fits it")  # fmt: skip
    test = [image for image in list_store(store) if image.split == "test"]
    groups = {
        "validation (in scope)": val_features,
        "test split (in scope)": scope_inputs(bundle, load_pixels(test, size)),
    }
    for name, pictures in out_of_scope_pictures(size, val_pixels[:30]).items():
        if pictures:
            groups[f"{name} (out of scope)"] = scope_inputs(bundle, np.stack(pictures))
    print(
        f"bundle {bundle.model_version}: scope reference {how}; thresholds at the "
        f"{reference.percentile:g}th percentile of validation",
        flush=True,
    )
    print(f"{'images':<28} {'n':>5} {'marked out of scope':>20} {'median score':>13}")
    results = {}
    for name, features in groups.items():
        score = reference.score(features)
        marked = float(np.mean(score > 1.0))
        results[name] = {"images": len(score), "marked": marked, "median": float(np.median(score))}
        print(f"{name:<28} {len(score):>5} {marked:>20.1%} {np.median(score):>13.2f}")
    print(f"{time.perf_counter() - started:.0f} s in all", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    try:
        main()
    except user_errors() as exc:
        sys.exit(f"scope_check.py: error: {exc}")
