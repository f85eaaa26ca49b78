"""Evaluate a model bundle on a labelled split: metrics, bootstrap confidence intervals, plots.

The training job's report and ``jobs/evaluate.py`` both come from here, so a bundle evaluated
later on the same split gives the same figures as its card.

Confidence intervals are percentile intervals of a *patient-level* bootstrap: each replicate
draws patients with replacement and keeps all of their images, because images of one patient
are not independent (Kermany's test split has several images of many patients).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import ray
import torch
from scipy.stats import rankdata

from pneumo_ray.io import data, stores
from pneumo_ray.io.images import to_model_input
from pneumo_ray.io.labels import BINARY_LABELS, CLASS_LABELS, patients_by_uri
from pneumo_ray.models.bundle import Bundle, load_bundle
from pneumo_ray.models.calibration import expected_calibration_error
from pneumo_ray.models.predict import ActorPlan, plan_actors, run_models
from pneumo_ray.training import report

# The figures that get a confidence interval, per model.
HEADLINE = {
    "binary": ("accuracy", "roc_auc", "sensitivity", "specificity", "ece"),
    "binary_cnn": ("roc_auc", "ece"),
    "multiclass": ("accuracy", "roc_auc"),
    "knn": ("accuracy",),
    "autoencoder": ("roc_auc", "accuracy", "sensitivity", "specificity"),
    "autoencoder_mse": ("roc_auc",),
}
BOOTSTRAP_REPLICATES = 1000
CONFIDENCE = 0.95


def log(message: str) -> None:
    print(f"[pneumo_ray] {message}", flush=True)


@dataclass
class Evaluation:
    metrics: dict  # model name -> classification metrics, "headline" figures and their "ci95"
    predictions: dict[str, np.ndarray]  # the bundle's output columns plus image_uri, label
    bootstrap: dict  # how the intervals were computed


def predict_dataset(
    bundle: Bundle, dataset: ray.data.Dataset, plan: ActorPlan | None = None
) -> dict[str, np.ndarray]:
    """The bundle's outputs for every row of a decoded, labelled dataset (plus image_uri,
    label), from model actors on the cluster: the scoring job's prediction path."""
    plan = plan or plan_actors(None, None)
    out = run_models(dataset, bundle, plan, outputs="bundle")
    out["label"] = np.asarray(CLASS_LABELS)[out.pop("label_index")]
    return out


_CLASS_SORTER = np.argsort(np.asarray(CLASS_LABELS))


def class_index(labels: np.ndarray) -> np.ndarray:
    """Three-class label strings -> their indices in CLASS_LABELS (vectorized)."""
    position = np.searchsorted(np.asarray(CLASS_LABELS), labels, sorter=_CLASS_SORTER)
    return _CLASS_SORTER[position]


def roc_auc(is_positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic on average ranks: the value of sklearn's
    ``roc_auc_score`` (ties count a half), at a fraction of its cost, which the bootstrap pays
    thousands of times. Needs both classes."""
    is_positive = np.asarray(is_positive, dtype=bool)
    ranks = rankdata(score)
    positives = int(is_positive.sum())
    negatives = len(is_positive) - positives
    return float(
        (ranks[is_positive].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def _ovr_auc(truth_index: np.ndarray, probs: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC of a three-class softmax (sklearn's ``multi_class="ovr"``)."""
    return float(np.mean([roc_auc(truth_index == k, probs[:, k]) for k in range(probs.shape[1])]))


def _binary_figures(is_positive: np.ndarray, called: np.ndarray, score: np.ndarray) -> dict:
    figures = {
        "accuracy": float(np.mean(called == is_positive)),
        "sensitivity": float(np.mean(called[is_positive])) if is_positive.any() else np.nan,
        "specificity": float(np.mean(~called[~is_positive])) if (~is_positive).any() else np.nan,
        "roc_auc": np.nan,
    }
    if is_positive.any() and (~is_positive).any():
        figures["roc_auc"] = roc_auc(is_positive, score)
    return figures


def headline_figures(p: dict[str, np.ndarray], rows: np.ndarray | None = None) -> dict:
    """The HEADLINE figures of each model on ``rows`` of the predictions (all rows if None)."""
    if rows is not None:
        p = {key: value[rows] for key, value in p.items()}
    label = p["label"]
    is_pneumonia = label != "normal"
    truth_index = class_index(label)
    probs = np.stack([p["p_normal"], p["p_bacterial"], p["p_viral"]], axis=1)
    multiclass = {"accuracy": float(np.mean(p["pred_class"] == label)), "roc_auc": np.nan}
    if len(np.unique(truth_index)) == len(CLASS_LABELS):
        multiclass["roc_auc"] = _ovr_auc(truth_index, probs)
    mse_auc = cnn_auc = np.nan
    if is_pneumonia.any() and (~is_pneumonia).any():
        mse_auc = roc_auc(is_pneumonia, p["reconstruction_mse"])
        cnn_auc = roc_auc(is_pneumonia, p["p_pneumonia_cnn"])
    binary = _binary_figures(is_pneumonia, p["pred_binary"] == "pneumonia", p["p_pneumonia"])
    binary["ece"] = expected_calibration_error(p["p_pneumonia"], is_pneumonia)
    binary_cnn = {
        "roc_auc": cnn_auc,
        "ece": expected_calibration_error(p["p_pneumonia_cnn"], is_pneumonia),
    }
    return {
        "binary": binary,
        "binary_cnn": binary_cnn,
        "multiclass": multiclass,
        "knn": {"accuracy": float(np.mean(p["knn_label"] == label))},
        "autoencoder": _binary_figures(is_pneumonia, p["is_anomaly"], p["anomaly_score"]),
        "autoencoder_mse": {"roc_auc": mse_auc},
    }


def bootstrap_intervals(
    p: dict[str, np.ndarray],
    groups: np.ndarray,
    replicates: int = BOOTSTRAP_REPLICATES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Percentile intervals of every headline figure over a bootstrap of ``groups`` (patients).

    Each replicate draws as many groups as there are, with replacement, and takes all rows of
    each drawn group. Returns model -> figure -> [low, high].
    """
    rng = np.random.default_rng(seed)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    samples: dict[str, dict[str, list[float]]] = {
        model: {figure: [] for figure in figures} for model, figures in HEADLINE.items()
    }
    for _ in range(replicates):
        drawn = rng.integers(0, len(unique), size=len(unique))
        rows = np.concatenate([members[g] for g in drawn])
        for model, figures in headline_figures(p, rows).items():
            for figure, value in figures.items():
                samples[model][figure].append(value)
    tail = (1.0 - confidence) / 2.0 * 100.0
    return {
        model: {
            figure: [float(v) for v in np.nanpercentile(values, [tail, 100.0 - tail])]
            for figure, values in figures.items()
        }
        for model, figures in samples.items()
    }


def evaluate_predictions(
    bundle: Bundle,
    p: dict[str, np.ndarray],
    patients: Mapping[str, str],
    replicates: int = BOOTSTRAP_REPLICATES,
) -> Evaluation:
    """Full metrics of each model, headline figures, and their bootstrap intervals over the
    ``patients`` (image URI -> patient id) of the images."""
    truth_binary = np.where(p["label"] == "normal", *BINARY_LABELS)
    anomaly_pred = np.where(p["is_anomaly"], *BINARY_LABELS[::-1])
    probs = np.stack([p["p_normal"], p["p_bacterial"], p["p_viral"]], axis=1)
    # The design's pixel MSE at its own threshold (a bundle scored by MSE has only that one).
    mse_score = bundle.card["models"]["autoencoder"].get("scores", {}).get("mse")
    mse_pred = (
        np.where(p["reconstruction_mse"] > mse_score["threshold"], *BINARY_LABELS[::-1])
        if mse_score
        else anomaly_pred
    )
    metrics = {
        "binary": report.classification_metrics(
            truth_binary, p["pred_binary"], BINARY_LABELS, p["p_pneumonia"]
        ),
        "binary_cnn": {"score": "the binary network's calibrated p_pneumonia_cnn alone"},
        "multiclass": report.classification_metrics(
            p["label"], p["pred_class"], CLASS_LABELS, probs
        ),
        "knn": report.classification_metrics(p["label"], p["knn_label"], CLASS_LABELS, None),
        "autoencoder": report.classification_metrics(
            truth_binary, anomaly_pred, BINARY_LABELS, p["anomaly_score"]
        ),
        "autoencoder_mse": report.classification_metrics(
            truth_binary, mse_pred, BINARY_LABELS, p["reconstruction_mse"]
        ),
    }
    metrics["autoencoder"]["score"] = bundle.anomaly_score_kind
    metrics["autoencoder_mse"]["score"] = "mse"
    point = headline_figures(p)
    groups = np.array([patients[uri] for uri in p["image_uri"]])
    intervals = bootstrap_intervals(p, groups, replicates) if replicates else {}
    for model, figures in point.items():
        metrics[model]["headline"] = figures
        if intervals:
            metrics[model]["ci95"] = intervals[model]
    bootstrap = {
        "replicates": replicates,
        "confidence": CONFIDENCE,
        "interval": "percentile",
        "resampled": "patients (all images of each drawn patient)",
        "patients": int(len(np.unique(groups))),
    }
    return Evaluation(metrics, p, bootstrap)


def evaluate_bundle(
    bundle: Bundle,
    dataset: ray.data.Dataset,
    patients: Mapping[str, str],
    replicates: int = BOOTSTRAP_REPLICATES,
    plan: ActorPlan | None = None,
) -> Evaluation:
    """Score a decoded, labelled dataset with all four models and compute their metrics;
    ``patients`` (image URI -> patient id) groups the bootstrap."""
    return evaluate_predictions(
        bundle, predict_dataset(bundle, dataset, plan), patients, replicates
    )


MODEL_TITLES = {
    "binary": "binary call (normal vs pneumonia)",
    "multiclass": "three-class CNN",
    "knn": "KNN",
    "autoencoder": "autoencoder anomaly (pneumonia = anomaly)",
    "autoencoder_mse": "autoencoder, pixel MSE (design's score)",
}


def write_report(
    evaluation: Evaluation,
    bundle: Bundle,
    dataset: ray.data.Dataset,
    directory: str,
    split: str = "test",
    histories: dict[str, list[dict]] | None = None,
    extra: dict | None = None,
) -> None:
    """metrics.json, predictions.parquet and the PNG plots of an evaluation into a folder."""
    import pandas as pd

    os.makedirs(directory, exist_ok=True)
    metrics, p = evaluation.metrics, evaluation.predictions
    scope = scope_summary(bundle, p)
    log(
        f"scope check: {scope['out_of_scope']} of {scope['images']} {split} images out of scope"
        + (f" ({', '.join(f'{k}: {n}' for k, n in scope['reasons'].items())})"
           if scope["reasons"] else "")
        + ("" if scope["available"] else "; no pixel check in this bundle (metadata only)")
        + " (the figures include them, with the calls the networks made)"
    )  # fmt: skip
    report.write_json(
        {split: metrics, "bootstrap": evaluation.bootstrap, "scope": scope, **(extra or {})},
        os.path.join(directory, "metrics.json"),
    )
    table = pd.DataFrame(
        {key: list(value) if value.ndim > 1 else value for key, value in p.items()}
    )
    table.to_parquet(os.path.join(directory, "predictions.parquet"), index=False)
    is_pneumonia = p["label"] != "normal"
    report.plot_reliability(
        {
            f"p_pneumonia ({bundle.binary_score})": (p["p_pneumonia"], is_pneumonia),
            "p_pneumonia_cnn (binary network)": (p["p_pneumonia_cnn"], is_pneumonia),
        },
        f"reliability, normal vs pneumonia ({split})",
        os.path.join(directory, "reliability.png"),
    )
    for name, title in MODEL_TITLES.items():
        if name == "knn":
            title = f"KNN (k={bundle.knn.k}, {bundle.knn.feature_kind})"
        if name == "autoencoder":
            title = f"autoencoder anomaly, {bundle.anomaly_score_kind} score"
        report.plot_confusion(
            metrics[name], title, os.path.join(directory, f"confusion_{name}.png")
        )
    report.plot_roc(
        {
            f"p_pneumonia ({bundle.binary_score})": (is_pneumonia, p["p_pneumonia"]),
            "binary CNN p_pneumonia_cnn": (is_pneumonia, p["p_pneumonia_cnn"]),
            f"autoencoder {bundle.anomaly_score_kind} score": (is_pneumonia, p["anomaly_score"]),
            "autoencoder pixel MSE": (is_pneumonia, p["reconstruction_mse"]),
            "three-class CNN 1 - p_normal": (is_pneumonia, 1.0 - p["p_normal"]),
        },
        f"normal vs pneumonia ({split})",
        os.path.join(directory, "roc.png"),
    )
    if histories:
        report.plot_training_curves(histories, os.path.join(directory, "training_curves.png"))
    _plot_reconstructions(
        bundle, dataset, os.path.join(directory, "autoencoder_reconstructions.png")
    )


def scope_summary(bundle: Bundle, p: dict[str, np.ndarray]) -> dict:
    """How many evaluated images the scope check put out of scope, by the kind of reason."""
    from collections import Counter

    outside = ~np.asarray(p.get("in_scope", np.ones(len(p["image_uri"]))), dtype=bool)
    reasons = Counter(
        str(reason).split(":", 1)[0] for reason in np.asarray(p["scope_reason"])[outside]
    ) if "scope_reason" in p else Counter()  # fmt: skip
    return {
        "available": bundle.scope_reference is not None,
        "images": int(len(outside)),
        "out_of_scope": int(outside.sum()),
        "reasons": dict(reasons.most_common()),
    }


def _plot_reconstructions(bundle: Bundle, dataset: ray.data.Dataset, path: str, per_class: int = 3):
    chosen: dict[str, list[np.ndarray]] = {"normal": [], "pneumonia": []}
    for batch in dataset.iter_batches(batch_size=64, batch_format="numpy"):
        for image, label_index in zip(batch["image"], batch["label_index"], strict=True):
            kind = "normal" if label_index == 0 else "pneumonia"
            if len(chosen[kind]) < per_class:
                chosen[kind].append(image)
        if all(len(v) == per_class for v in chosen.values()):
            break
    images = np.stack(chosen["normal"] + chosen["pneumonia"])
    captions = ["normal"] * len(chosen["normal"]) + ["pneumonia"] * len(chosen["pneumonia"])
    scores = bundle.predict(images)["anomaly_score"]
    with torch.inference_mode():
        x = to_model_input(images).to(bundle.device)
        recon = bundle.autoencoder(x)
    errors = (recon - x).pow(2).mean(dim=(1, 2, 3)).cpu().numpy()
    captions = [
        f"{c}\nmse {e:.4f}\n{bundle.anomaly_score_kind} {s:.3g}"
        for c, e, s in zip(captions, errors, scores, strict=True)
    ]
    report.plot_reconstructions(x[:, 0].cpu().numpy(), recon[:, 0].cpu().numpy(), captions, path)


def results_table(metrics: dict, targets: dict | None = None) -> str:
    """Headline figures with their 95% intervals, one row per model and figure; with
    ``targets`` (model -> figure -> minimum, or ("<=", maximum)), a column saying whether each
    target is met."""
    lines = [
        f"{'model':<16} {'figure':<12} {'value':>6}  {'95% CI':<15}"
        + ("  target" if targets else "")
    ]
    for model in HEADLINE:
        if model not in metrics:
            continue
        for figure, value in metrics[model]["headline"].items():
            low, high = metrics[model].get("ci95", {}).get(figure, (np.nan, np.nan))
            line = f"{model:<16} {figure:<12} {value:6.3f}  [{low:.3f}, {high:.3f}]"
            target = (targets or {}).get(model, {}).get(figure)
            if target is not None:
                sign, bound = target if isinstance(target, tuple) else (">=", target)
                met = value <= bound if sign == "<=" else value >= bound
                line += f"  {sign} {bound:.3f} {'met' if met else 'NOT MET'}"
            lines.append(line)
    return "\n".join(lines)


def split_images(store: str, split: str) -> list:
    """The labelled images of one split of a store; StoreLayoutError when it has none."""
    images = [i for i in data.list_store(store) if i.split == split]
    if not images:
        raise data.StoreLayoutError(f"{store}: no images in the {split!r} split")
    return images


def validation_images(card: dict) -> list:
    """A bundle's validation images, split again from its card's settings (store, limit,
    validation fraction, seed): the images its thresholds and checks were chosen on."""
    return training_split(card)[1]


def training_split(card: dict) -> tuple[list, list]:
    """A bundle's training and validation images, split again from its card's settings."""
    from pneumo_ray.io.labels import limit_per_class, split_by_patient

    config = card["training"]["config"]
    pool = limit_per_class(
        [i for i in data.list_store(config["data"]) if i.split in ("train", "val")],
        config["limit"],
        config["seed"],
    )
    return split_by_patient(pool, config["val_fraction"], config["seed"])


def decode_images(images: list, image_size: int) -> data.DecodedSplit:
    """Decode labelled images with Ray Data for a bundle, saying which could not be read."""
    decoded = data.decode_split(images, image_size, seed=0)
    for uri, why in decoded.failed:
        log(f"skipped unreadable image {uri}: {why}")
    return decoded


def evaluate_store(
    model: str,
    store: str,
    split: str = "test",
    output: str | None = None,
    replicates: int = BOOTSTRAP_REPLICATES,
    print_table: bool = True,
) -> Evaluation:
    """Load a bundle, decode one split of a labelled store, evaluate, write the report to
    ``output`` (default ``<model>/evaluation/<split>``) and print the results table."""
    started = time.perf_counter()
    model, store = stores.normalize(model), stores.normalize(store)
    output = stores.normalize_optional(output)
    bundle = load_bundle(model)
    images = split_images(store, split)
    log(
        f"evaluating bundle {bundle.model_version} on {len(images)} {split} images of {store} "
        f"at {bundle.image_size}x{bundle.image_size}"
    )
    decoded = decode_images(images, bundle.image_size)
    evaluation = evaluate_bundle(bundle, decoded.dataset, patients_by_uri(images), replicates)
    output = output or stores.join(model, "evaluation", split)
    with tempfile.TemporaryDirectory() as directory:
        write_report(
            evaluation,
            bundle,
            decoded.dataset,
            directory,
            split=split,
            extra={
                "model_version": bundle.model_version,
                "store": store,
                "split": split,
                "skipped_images": [{"image_uri": u, "error": e} for u, e in decoded.failed],
            },
        )
        stores.delete_dir(output)
        stores.upload_dir(directory, output)
    if print_table:
        print("\n" + results_table(evaluation.metrics), flush=True)
    log(f"report: {output.rstrip('/')}/ (metrics.json, predictions.parquet, PNG plots)")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return evaluation
