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

With ``--curve`` it draws the learning curve of issue 32 instead: for each of ``--draws``
patient splits (seeds 0, 1, ...) into two halves, each half's images are predicted by the
bundle adapted on the other half: first from its *unlabelled* images (``pneumo-adapt
--unlabelled``: BatchNorm statistics when the images drift, the class balance by EM), then
with the labels of N of its images (``--labels``, 0 for none, ``all`` for the whole half),
chosen by each ``--rules`` (``random``, the labelling list's default; ``spread``). The pooled
predictions of the two halves give each draw's figures; the table shows their median and
range over the draws. ``--validation`` uses the bundle's own validation images (the training
site) as the site: what adapting costs where nothing needed adapting.

    python benchmarks/site_adaptation.py --model BUNDLE --data STORE --curve \
        [--labels 0,20,50,100,200,all] [--draws 5] [--rules spread,random] [--validation] \
        [--fine-tune [--fine-tune-min 100]]

``--fine-tune`` adds, where a half gives at least ``--fine-tune-min`` labels, the rows
``<rule>+ft``: both CNNs' heads refitted on those labelled images and 200 training images of
each class (``pneumo_ray.training.finetune``), cross-fitted by patient within the labelled
images, before the operating point is set on their out-of-fold outputs. The KNN keeps the
trained network's outputs (its references were built from them).
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
from pneumo_ray.training.finetune import TRAIN_IMAGES_PER_CLASS  # noqa: E402

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


# --- the learning curve (--curve) -----------------------------------------------------------

CURVE_FIGURES = (
    ("binary", "sensitivity"),
    ("binary", "specificity"),
    ("binary", "ece"),
    ("binary", "roc_auc"),
    ("multiclass", "accuracy"),
    ("knn", "accuracy"),
    ("autoencoder", "roc_auc"),
)


def copied(bundle):
    """A copy of a bundle whose card and CNNs can change without touching ``bundle``."""
    twin = copy.copy(bundle)
    twin.card = copy.deepcopy(bundle.card)
    twin.binary, twin.multiclass = copy.deepcopy(bundle.binary), copy.deepcopy(bundle.multiclass)
    return twin


def adapted_unlabelled(base, pixels, uris, sizes, fit_rows, base_raw):
    """``base`` adapted on the unlabelled images ``fit_rows`` (in-process), and its networks'
    outputs on every image. ``base_raw``: the base bundle's outputs on every image, which
    stand for the adapted bundle's where its BatchNorm statistics were kept (the networks
    then run only after a re-estimation)."""
    from pneumo_ray.training.adaptation import with_patch_distances
    from pneumo_ray.training.unlabelled import adapt_unlabelled

    def outputs(bundle, rows):  # bundle None: the base networks' outputs, already computed
        raw = take(base_raw, rows) if bundle is None else network_outputs_of(bundle, pixels[rows])
        raw["image_uri"] = uris[rows]
        return raw

    calls = 0

    def run_networks(bundle):  # the first call sees the base networks; a second, re-estimated
        nonlocal calls
        calls += 1
        return with_patch_distances(bundle, outputs(bundle if calls > 1 else None, fit_rows))

    bundle = copied(base)
    record = adapt_unlabelled(
        bundle, pixels[fit_rows], [str(u) for u in uris[fit_rows]], [sizes[i] for i in fit_rows],
        run_networks, {"inputs": ["benchmark"]},
    )  # fmt: skip
    every = np.arange(len(uris))
    kept = not record["batchnorm"]["adapted"]
    return bundle, outputs(None if kept else bundle, every), record


def labelled_on(bundle, raw, images, rows, rules):
    """A copy of ``bundle`` adapted (pneumo-adapt --data) on the labelled images ``rows``."""
    from pneumo_ray.training.adaptation import adapt

    twin = copy.copy(bundle)
    twin.card = copy.deepcopy(bundle.card)
    adapt(twin, take(raw, rows), [images[i] for i in rows], rules, {"store": "benchmark"})
    return twin


def choose_labelled(bundle, raw, fit_rows, n, rule, seed):
    """``n`` of the half's images to label, by ``rule`` (the labelling list's)."""
    from pneumo_ray.models.labelling import select_for_labelling
    from pneumo_ray.training.adaptation import with_patch_distances

    if n is None or n >= len(fit_rows):
        return fit_rows
    p = bundle.finish(with_patch_distances(bundle, take(raw, fit_rows)))["p_pneumonia"]
    chosen, _ = select_for_labelling(p, bundle.binary_threshold, n, rule, seed)
    return fit_rows[chosen]


FINE_TUNE_MIN_LABELS = 100  # issue 32, point 4: "where labels allow, for example >= 100"


def training_head_inputs(base, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The backbone features (``head_inputs``) of a seeded draw of the bundle's training
    images, TRAIN_IMAGES_PER_CLASS of each class (``finetune.training_examples``, the draw
    ``pneumo-adapt --fine-tune`` uses), for each CNN; and their class indices."""
    from pneumo_ray.training.finetune import head_inputs, training_examples

    pixels, targets = training_examples(base, TRAIN_IMAGES_PER_CLASS, seed)
    features = {name: head_inputs(getattr(base, name), pixels, base.tta) for name in NETS}
    return features, targets


NETS = ("binary", "multiclass")


def fine_tuned(bundle, raw, site_features, train, rows, label_index, groups, seed):
    """``raw`` with both CNNs' logits from heads fine-tuned on the labelled ``rows`` and the
    training images (``finetune.cross_fitted_logits``: out-of-fold on ``rows``); the KNN
    keeps the trained three-class network's outputs, which its references were built from."""
    from pneumo_ray.models.calibration import sigmoid
    from pneumo_ray.training.finetune import FineTuneSettings, cross_fitted_logits

    train_features, train_targets = train
    settings = FineTuneSettings(seed=seed)
    out = dict(raw)
    for name in NETS:
        to_binary = (lambda t: (t > 0).astype(np.int64)) if name == "binary" else (lambda t: t)
        out[name + ("_logit" if name == "binary" else "_logits")] = cross_fitted_logits(
            getattr(bundle, name), site_features[name], rows, to_binary(label_index[rows]),
            groups, train_features[name], to_binary(train_targets), settings,
        )  # fmt: skip
    out["p_pneumonia"] = sigmoid(out["binary_logit"]).astype(np.float32)
    return out


def pool(pooled: dict, key: tuple, out: dict[str, np.ndarray], labels: np.ndarray) -> None:
    """Add a half's predicted columns (and their labels) to the draw's pooled ones."""
    for column, value in {**out, "label": labels}.items():
        pooled.setdefault(key, {}).setdefault(column, []).append(value)


def curve(
    base,
    images,
    pixels,
    labels_to_try,
    draws,
    rule_names,
    fine_tune_train=None,
    fine_tune_min_labels=FINE_TUNE_MIN_LABELS,
    base_raw=None,
) -> dict:
    """Per draw, label count and rule: the figures of the two halves' pooled predictions.
    With ``fine_tune_train`` (``training_head_inputs``), label counts of at least
    ``fine_tune_min_labels`` also get the rule ``<rule>+ft``: the heads fine-tuned as well."""
    from pneumo_ray.errors import SiteError
    from pneumo_ray.training.adaptation import (
        SiteRules,
        set_operating_point,
        with_patch_distances,
    )
    from pneumo_ray.training.evaluation import headline_figures

    uris = np.array([image.uri for image in images])
    sizes = [image.size for image in images]
    labels = np.array([image.label for image in images])
    label_index = np.array([CLASS_LABELS.index(label) for label in labels])
    groups = np.array([image.patient_id for image in images])
    rules = SiteRules.from_card(base.card)
    results: dict[tuple, list[dict]] = {}
    base_raw = network_outputs_of(base, pixels) if base_raw is None else base_raw
    base_features = None
    if fine_tune_train is not None:
        from pneumo_ray.training.finetune import head_inputs

        base_features = {net: head_inputs(getattr(base, net), pixels, base.tta) for net in NETS}
    for draw in range(draws):
        fold = np.array(patient_folds(images, 2, draw))
        pooled: dict[tuple, dict[str, list]] = {}
        for half in (0, 1):
            fit_rows, predict_rows = np.flatnonzero(fold != half), np.flatnonzero(fold == half)
            bundle, raw, record = adapted_unlabelled(base, pixels, uris, sizes, fit_rows, base_raw)
            raw["label_index"] = label_index
            print(f"  draw {draw} half {half}: BatchNorm "
                  f"{'re-estimated' if record['batchnorm']['adapted'] else 'kept'}, pneumonia "
                  f"share {record['class_prior']['binary']['site']:.3f} (applied: "
                  f"{record['class_prior']['binary']['applied']})", flush=True)  # fmt: skip
            site_features = base_features  # the base networks' where BatchNorm was kept
            if base_features is not None and record["batchnorm"]["adapted"]:
                site_features = {
                    net: head_inputs(getattr(bundle, net), pixels, bundle.tta) for net in NETS
                }
            for n in labels_to_try:
                for rule in rule_names if n not in (0, None) else ["-"]:
                    key, rows = (n, rule), fit_rows
                    if key in pooled and pooled[key] is None:
                        continue
                    predictor = bundle
                    if n != 0:
                        rows = choose_labelled(bundle, raw, fit_rows, n, rule, draw)
                        try:
                            predictor = labelled_on(bundle, raw, images, rows, rules)
                        except SiteError:  # one class among the chosen images
                            pooled[key] = None
                            continue
                    out = predictor.finish(with_patch_distances(predictor, take(raw, predict_rows)))
                    pool(pooled, key, out, labels[predict_rows])
                    if site_features is None or n == 0 or len(rows) < fine_tune_min_labels:
                        continue
                    # The heads fine-tuned too: the operating point set again on their
                    # out-of-fold logits; the KNN and anomaly columns are the same as above.
                    tuned = fine_tuned(bundle, raw, site_features, fine_tune_train, rows,
                                       label_index, groups, draw)  # fmt: skip
                    twin = copy.copy(predictor)
                    twin.card = copy.deepcopy(predictor.card)
                    set_operating_point(twin.card, take(tuned, rows), rules)
                    pool(
                        pooled,
                        (n, (rule if rule != "-" else "") + "+ft"),
                        {**out, **twin.call_columns(take(tuned, predict_rows))},
                        labels[predict_rows],
                    )
        for key, columns in pooled.items():
            if columns is None:
                continue
            p = {column: np.concatenate(parts) for column, parts in columns.items()}
            results.setdefault(key, []).append(headline_figures(p))
    return results


def print_curve(results: dict, as_trained: dict, draws: int) -> dict:
    """The curve's table: median [min-max] over the draws; returns it as a dict."""
    header = f"{'labels':>7} {'rule':<9}" + "".join(
        f" {m[:5]}.{f[:11]:<11}" for m, f in CURVE_FIGURES
    )
    print("\n" + header)
    table = {}
    print(f"{'trained':>7} {'-':<9}" + "".join(
        f" {as_trained[m][f]:>17.3f}" for m, f in CURVE_FIGURES))  # fmt: skip
    order = sorted(
        results.items(), key=lambda kv: (10**9 if kv[0][0] is None else kv[0][0], kv[0][1])
    )
    for (n, rule), runs in order:
        cells, row = [], {}
        for model, figure in CURVE_FIGURES:
            values = np.array([run[model][figure] for run in runs], dtype=np.float64)
            row[f"{model}.{figure}"] = {
                "median": float(np.nanmedian(values)),
                "min": float(np.nanmin(values)),
                "max": float(np.nanmax(values)),
                "values": values.tolist(),
            }
            cells.append(
                f"{np.nanmedian(values):.3f} [{np.nanmin(values):.3f}-{np.nanmax(values):.3f}]"
            )
        label = "all" if n is None else str(n)
        print(f"{label:>7} {rule:<9} " + " ".join(f"{c:>17}" for c in cells)
              + (f"  ({len(runs)} of {draws} draws)" if len(runs) < draws else ""))  # fmt: skip
        table[f"{label}/{rule}"] = row
    return table


def curve_main(args, base, images, pixels) -> dict:
    from pneumo_ray.training.adaptation import with_patch_distances
    from pneumo_ray.training.evaluation import headline_figures

    labels_to_try = [None if v == "all" else int(v) for v in args.labels.split(",")]
    rule_names = args.rules.split(",")
    raw = network_outputs_of(base, pixels)
    as_trained = base.finish(with_patch_distances(base, raw))
    as_trained["label"] = np.array([image.label for image in images])
    trained_figures = headline_figures(as_trained)
    train = training_head_inputs(base) if args.fine_tune else None
    results = curve(
        base, images, pixels, labels_to_try, args.draws, rule_names, train, args.fine_tune_min, raw
    )
    print(
        "\nLearning curve: each half of the site's patients predicted by the bundle adapted on "
        "the other half (unlabelled images, then N labelled ones); median [min-max] over "
        f"{args.draws} patient draws; 'trained': the bundle as trained, on the same images."
    )
    table = print_curve(results, trained_figures, args.draws)
    return {"as_trained": trained_figures, "curve": table}


def main(argv: list[str] | None = None) -> dict:
    from pneumo_ray.models.bundle import load_bundle
    from pneumo_ray.training.adaptation import SiteRules, adapt, with_patch_distances
    from pneumo_ray.training.evaluation import evaluate_predictions

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="bundle folder or URI")
    parser.add_argument("--data", help="labelled store (Kaggle layout); not with --validation")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--folds", type=int, default=2, help="patient folds (at least 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient folds")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--curve", action="store_true", help="the learning curve instead")
    parser.add_argument("--labels", default="0,20,50,100,200,all", help="--curve: label counts")
    parser.add_argument("--draws", type=int, default=5, help="--curve: patient draws")
    parser.add_argument("--rules", default="spread,random", help="--curve: labelling rules")
    parser.add_argument(
        "--fine-tune",
        action="store_true",
        help="--curve: also fine-tune the CNNs' heads where a half gives at least "
        "--fine-tune-min labels (rules '<rule>+ft')",
    )
    parser.add_argument(
        "--fine-tune-min",
        type=int,
        default=FINE_TUNE_MIN_LABELS,
        help=f"--fine-tune: the fewest labels to fine-tune on (default {FINE_TUNE_MIN_LABELS})",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help="the bundle's own validation images as the site (the training site)",
    )
    args = parser.parse_args(argv)
    if (args.data is None) == (not args.validation):
        parser.error("give --data STORE, or --validation for the bundle's own validation images")
    if args.folds < 2:
        parser.error(f"--folds must be at least 2, got {args.folds}")

    started = time.perf_counter()
    base = load_bundle(args.model)
    if args.validation:
        from pneumo_ray.training.evaluation import validation_images

        images = validation_images(base.card)
    else:
        images = [image for image in list_store(args.data) if image.split == args.split]
    if not images:
        parser.error(f"{args.data}: no images in the {args.split!r} split")
    print(
        f"bundle {base.model_version}: {len(images)} "
        f"{'validation' if args.validation else args.split} images of "
        f"{len({i.patient_id for i in images})} patients, {args.folds} patient folds "
        f"(seed {args.seed})",
        flush=True,
    )
    pixels = np.stack([load_image(image.uri, base.image_size) for image in images])
    if args.curve:
        summary = curve_main(args, base, images, pixels)
        print(f"\n{time.perf_counter() - started:.0f}s in all", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1, default=float))
        return summary
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
