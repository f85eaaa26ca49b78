"""What adapting a bundle to a site gives, on that site's patients the adaptation did not see.

    python benchmarks/site_adaptation.py --model BUNDLE --data STORE [--split test]
        [--folds 2] [--seed 0] [--bootstrap 1000] [--json PATH]

The split's patients are divided into ``--folds`` folds (stratified by each patient's majority
label, seeded). For each fold, a fresh copy of the bundle is adapted (``pneumo-adapt``'s own
``adapt``: temperatures and score maps, binary and anomaly thresholds, the KNN's references
and the anomaly score's normal reference) on the images of the other folds and then predicts
the fold's images: every image gets one prediction from a bundle
that never saw its patient. The pooled predictions are evaluated as ``pneumo-evaluate`` does
(patient-level bootstrap 95% intervals), beside the bundle as trained on the same images.

The networks run once, in this process; adapting and predicting then work on their outputs
(``Bundle.finish``), as the bundle does. This uses the split's labels to set the operating
point, as a site would with its own labelled images; it is not a figure of the bundle as
trained, and says so in its output.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.cli import user_errors  # noqa: E402
from pneumo_ray.io.data import list_store, load_image  # noqa: E402
from pneumo_ray.io.labels import CLASS_LABELS, patient_folds, patients_by_uri  # noqa: E402

FIGURES = (
    ("binary", "roc_auc"),
    ("binary", "accuracy"),
    ("binary", "sensitivity"),
    ("binary", "specificity"),
    ("binary", "ece"),
    ("binary_cnn", "ece"),
    ("multiclass", "accuracy"),
    ("knn", "accuracy"),
    ("autoencoder", "roc_auc"),
    ("autoencoder", "sensitivity"),
    ("autoencoder", "specificity"),
)


def network_outputs_of(bundle, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle's networks' raw outputs and image statistics, as pneumo-adapt's model actors
    give them (PatchCore's patch features, not distances)."""
    import torch

    from pneumo_ray.io.images import image_stats, to_model_input
    from pneumo_ray.models.outputs import network_outputs
    from pneumo_ray.training.adaptation import patch_features_instead

    x = to_model_input(pixels).contiguous(memory_format=torch.channels_last)
    with patch_features_instead(bundle):
        raw = network_outputs(bundle.networks, x, bundle.tta, bundle.inpaint)
    return {**raw, **image_stats(pixels)}


def take(columns: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {key: value[rows] for key, value in columns.items()}


def main(argv: list[str] | None = None) -> dict:
    from pneumo_ray.models.bundle import load_bundle
    from pneumo_ray.training.adaptation import SiteRules, adapt, with_patch_distances
    from pneumo_ray.training.evaluation import evaluate_predictions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundle folder or URI")
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--folds", type=int, default=2, help="patient folds (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient folds")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")

    started = time.perf_counter()
    base = load_bundle(args.model)
    images = [image for image in list_store(args.data) if image.split == args.split]
    if not images:
        parser.error(f"{args.data}: no images in the {args.split!r} split")
    print(
        f"bundle {base.model_version}: {len(images)} {args.split} images of "
        f"{len({i.patient_id for i in images})} patients, {args.folds} patient folds "
        f"(seed {args.seed})",
        flush=True,
    )
    pixels = np.stack([load_image(image.uri, base.image_size) for image in images])
    raw = network_outputs_of(base, pixels)
    raw["image_uri"] = np.array([image.uri for image in images])
    raw["label_index"] = np.array([CLASS_LABELS.index(image.label) for image in images])
    labels = np.array([image.label for image in images])
    print(f"networks run on {len(images)} images in {time.perf_counter() - started:.0f}s")

    fold = np.array(patient_folds(images, args.folds, args.seed))
    rules = SiteRules.from_card(base.card)
    adapted_columns: dict[str, list] = {}
    order, per_fold = [], []
    for f in range(args.folds):
        fit_rows, predict_rows = np.flatnonzero(fold != f), np.flatnonzero(fold == f)
        bundle = copy.copy(base)  # adapt replaces what it changes; the card it edits: copied
        bundle.card = copy.deepcopy(base.card)
        record = adapt(
            bundle,
            take(raw, fit_rows),
            [images[i] for i in fit_rows],
            rules,
            {"store": args.data, "split": args.split, "folds": f"all but fold {f}"},
        )
        models = bundle.card["models"]
        per_fold.append(
            {
                "fold": f,
                "adapted_on": record["images"],
                "predicted": len(predict_rows),
                "binary_threshold": models["binary"]["threshold"],
                "binary_temperature": models["binary"]["temperature"],
                "multiclass_temperature": models["multiclass"]["temperature"],
                "anomaly_threshold": models["autoencoder"]["threshold"],
            }
        )
        predicted = bundle.finish(with_patch_distances(bundle, take(raw, predict_rows)))
        for key, value in predicted.items():
            adapted_columns.setdefault(key, []).append(value)
        order.append(predict_rows)
    order = np.concatenate(order)
    adapted = {key: np.concatenate(value) for key, value in adapted_columns.items()}
    adapted.update(image_uri=raw["image_uri"][order], label=labels[order])
    as_trained = {
        **base.finish(with_patch_distances(base, raw)),
        "image_uri": raw["image_uri"],
        "label": labels,
    }

    patients = patients_by_uri(images)
    results = {
        name: evaluate_predictions(base, p, patients, args.bootstrap).metrics
        for name, p in (("as_trained", as_trained), ("adapted", adapted))
    }
    print(
        f"\nBundle as trained (validation-chosen operating point) against the bundle adapted on "
        f"the other {args.folds - 1} fold(s) of this split's patients (cross-fitted: no image "
        "predicted by a bundle adapted on its patient). 95% CIs: patient-level bootstrap.\n"
    )
    print(f"{'model':<12} {'figure':<12} {'as trained':>24} {'adapted':>24}")
    for model, figure in FIGURES:
        cells = []
        for name in ("as_trained", "adapted"):
            metrics = results[name][model]
            value = metrics["headline"][figure]
            low, high = metrics.get("ci95", {}).get(figure, (np.nan, np.nan))
            cells.append(f"{value:.3f} ({low:.3f}-{high:.3f})")
        print(f"{model:<12} {figure:<12} {cells[0]:>24} {cells[1]:>24}")
    print("\nper fold (chosen on the other folds):")
    for row in per_fold:
        print("  " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in row.items()))  # fmt: skip
    print(f"\n{time.perf_counter() - started:.0f}s in all", flush=True)
    summary = {
        "model_version": base.model_version,
        "split": args.split,
        "folds": args.folds,
        "seed": args.seed,
        "per_fold": per_fold,
        **{
            name: {
                model: {"headline": m["headline"], "ci95": m.get("ci95", {})}
                for model, m in metrics.items()
            }
            for name, metrics in results.items()
        },
    }
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=float))
    return summary


if __name__ == "__main__":
    try:
        main()
    except user_errors() as exc:
        sys.exit(f"site_adaptation.py: error: {exc}")
