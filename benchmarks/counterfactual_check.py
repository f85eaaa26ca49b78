"""The counterfactual robustness check of a bundle on its own validation images: how far its
calls move when a film is framed, annotated or exposed differently, and where its Grad-CAM
maps look (issue 31).

    python benchmarks/counterfactual_check.py --model BUNDLE [--per-class N] [--json out.json]

The validation split is rebuilt from the card (store, limit, validation fraction, seed). Per
edit of ``pneumo_ray.io.edits.CHECK_EDITS`` and per class: the median shift and median |shift|
of p_pneumonia, the share of binary calls that change (and of those, normal -> pneumonia), and
the share of three-class calls that change; then the share of each Grad-CAM map's mass in the
outer 10% band of the image. The training report holds the same check on a sample of
validation (``--counterfactual-images``); this script runs it on all of validation by default.

Only validation images are read: nothing here looks at the test split.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.cli import user_errors  # noqa: E402
from pneumo_ray.io.data import load_image  # noqa: E402
from pneumo_ray.io.labels import CLASS_LABELS  # noqa: E402
from pneumo_ray.models.counterfactual import (  # noqa: E402
    format_check,
    robustness_check,
    select_validation,
)
from pneumo_ray.training.evaluation import validation_images  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    import torch

    from pneumo_ray.models.bundle import load_bundle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundle folder or URI")
    parser.add_argument(
        "--per-class", type=int, default=0, help="validation images per class (0: all)"
    )
    parser.add_argument("--seed", type=int, default=0, help="the sample and the edits' seed")
    parser.add_argument("--json", help="also write the check's rows to this JSON file")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle = load_bundle(args.model, device)
    images = validation_images(bundle.card)
    labels = np.array([CLASS_LABELS.index(image.label) for image in images])
    if args.per_class:
        keep = select_validation(labels, args.per_class, args.seed)
        images, labels = [images[i] for i in keep], labels[keep]
    pixels = np.stack([load_image(image.uri, bundle.image_size) for image in images])
    counts = {label: int((labels == k).sum()) for k, label in enumerate(CLASS_LABELS)}
    print(
        f"bundle {bundle.model_version}: {len(images)} validation images {counts}, "
        f"threshold {bundle.binary_threshold:.4f}, TTA {bundle.tta}, on {device}",
        flush=True,
    )
    check = robustness_check(bundle, pixels, labels, args.seed)
    print(format_check(check), flush=True)
    print(f"{time.perf_counter() - started:.0f} s in all", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(check, indent=2))
    return check


if __name__ == "__main__":
    try:
        main()
    except user_errors() as exc:
        sys.exit(f"counterfactual_check.py: error: {exc}")
