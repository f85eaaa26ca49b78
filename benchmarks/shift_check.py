"""A bundle's binary call on its own validation images, clean and under simulated acquisition
shift: does a threshold or temperature chosen on shifted validation differ from the card's?

    python benchmarks/shift_check.py --model BUNDLE [--draws 2] [--manifest manifest.csv]

The validation split is rebuilt from the card (store, limit, validation fraction, seed), so the
clean row reproduces the card's validation operating point. Each shifted row passes every
validation image through ``AcquisitionShift`` (blur or sharpening, gamma, noise, JPEG, resampling;
seeded), then scores it as the bundle does. Per row: sensitivity and specificity at the card's
threshold, the ECE of p_pneumonia, the normal images' p_pneumonia quartiles, and what the card's
own rules (threshold rule, temperature fit) would choose on that row. With ``--manifest`` (the
shared set's manifest.csv) each row is also split by the images' source kind.

Only validation images are read: nothing here looks at the test split.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.cli import user_errors  # noqa: E402
from pneumo_ray.io.data import load_image  # noqa: E402
from pneumo_ray.training.evaluation import validation_images  # noqa: E402


def shifted(pixels: np.ndarray, seed: int) -> np.ndarray:
    """``AcquisitionShift`` of each uint8 image ``(B, S, S)``, seeded."""
    import torch

    from pneumo_ray.io.images import AcquisitionShift

    torch.manual_seed(seed)
    shift = AcquisitionShift()
    x = torch.from_numpy(pixels).float().div(255)[:, None]
    return np.stack([shift(image).mul(255).round().byte().numpy()[0] for image in x])


def cnn_outputs(bundle, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The two CNNs' raw outputs (with the card's TTA), as the bundle computes them."""
    import torch

    from pneumo_ray.io.images import to_model_input
    from pneumo_ray.models.outputs import network_outputs

    x = to_model_input(pixels).contiguous(memory_format=torch.channels_last)
    networks = {name: bundle.networks[name] for name in ("binary", "multiclass")}
    return network_outputs(networks, x, bundle.tta)


def condition_row(bundle, raw: dict, is_pneumonia: np.ndarray) -> dict:
    """The card's operating point on these outputs, and what its rules would choose on them."""
    from pneumo_ray.models import calibration
    from pneumo_ray.training import report

    p = bundle.calibrated(raw)["p_pneumonia"]
    binary = bundle.card["models"]["binary"]
    rule = bundle.card["training"]["config"]
    target = rule["target_sensitivity"]
    chosen = (
        report.sensitivity_threshold(is_pneumonia, p, target)
        if rule["binary_threshold"] == "sensitivity"
        else report.youden_threshold(is_pneumonia, p)
    )
    normal = p[~is_pneumonia]
    return {
        **report.operating_point(is_pneumonia, p, binary["threshold"]),
        "ece": calibration.expected_calibration_error(p, is_pneumonia),
        "normal_p50": float(np.percentile(normal, 50)) if len(normal) else float("nan"),
        "normal_p75": float(np.percentile(normal, 75)) if len(normal) else float("nan"),
        "threshold_here": chosen,
        "temperature_here": calibration.fit_temperature(raw["binary_logit"], is_pneumonia),
    }


def source_kinds(manifest: str | None, uris: list[str]) -> np.ndarray | None:
    if manifest is None:
        return None
    with open(manifest, newline="") as f:
        kinds = {row["filename"]: row["source_kind"] for row in csv.DictReader(f)}
    return np.array([kinds.get(uri.rsplit("/", 1)[-1], "unknown") for uri in uris])


def main(argv: list[str] | None = None) -> None:
    from pneumo_ray.models.bundle import load_bundle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundle folder or URI")
    parser.add_argument("--draws", type=int, default=2, help="seeded shifted copies of validation")
    parser.add_argument("--manifest", help="manifest.csv with a source_kind per filename")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.model)
    images = validation_images(bundle.card)
    pixels = np.stack([load_image(image.uri, bundle.image_size) for image in images])
    is_pneumonia = np.array([image.is_pneumonia for image in images])
    kinds = source_kinds(args.manifest, [image.uri for image in images])
    print(
        f"bundle {bundle.model_version}: {len(images)} validation images "
        f"({int(is_pneumonia.sum())} pneumonia); card threshold "
        f"{bundle.binary_threshold:.4f}, temperature {bundle.temperature('binary'):.3f}",
        flush=True,
    )
    columns = ("sensitivity", "specificity", "ece", "normal_p50", "normal_p75")
    chosen = ("threshold_here", "temperature_here")
    print(f"{'condition':<10} {'images':<28} " + " ".join(f"{c:>16}" for c in columns + chosen))
    conditions = [("clean", pixels)] + [
        (f"shift{seed}", shifted(pixels, seed)) for seed in range(1, args.draws + 1)
    ]
    for name, batch in conditions:
        raw = cnn_outputs(bundle, batch)
        groups = [("all", np.ones(len(images), dtype=bool))]
        if kinds is not None:
            groups += [(kind, kinds == kind) for kind in sorted(set(kinds))]
        for group, keep in groups:
            if not (is_pneumonia[keep].any() and (~is_pneumonia[keep]).any()):
                continue
            row = condition_row(
                bundle, {key: value[keep] for key, value in raw.items()}, is_pneumonia[keep]
            )
            print(
                f"{name:<10} {group:<28} "
                + " ".join(f"{row[c]:16.3f}" for c in columns)
                + " ".join(f"{row[c]:17.4f}" for c in chosen),
                flush=True,
            )


if __name__ == "__main__":
    try:
        main()
    except user_errors() as exc:
        sys.exit(f"shift_check.py: error: {exc}")
