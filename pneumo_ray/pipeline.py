"""The training job end to end: store -> three trained networks + KNN -> bundle + report."""

from __future__ import annotations

import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
import torch

from pneumo_ray import data, report
from pneumo_ray.bundle import Bundle, write_bundle
from pneumo_ray.config import TrainConfig
from pneumo_ray.images import PREPROCESSING, to_model_input
from pneumo_ray.labels import BINARY_LABELS, CLASS_LABELS, limit_per_class, split_by_patient
from pneumo_ray.models import KnnReference
from pneumo_ray.models.knn import FEATURE_KINDS, select_features
from pneumo_ray.train import class_weights, collect_outputs, decide_scaling, fit_network


def log(message: str) -> None:
    print(f"[pneumo_ray] {message}", flush=True)


@dataclass
class Evaluation:
    metrics: dict  # model name -> classification metrics
    predictions: dict[str, np.ndarray]  # the bundle's output columns plus image_uri, label


def evaluate_bundle(bundle: Bundle, dataset: ray.data.Dataset, batch_size: int = 128) -> Evaluation:
    """Score a decoded, labelled dataset with all four models and compute their metrics."""
    columns: dict[str, list] = {}
    for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
        out = bundle.predict(batch["image"])
        out["image_uri"] = batch["image_uri"]
        out["label"] = np.asarray(CLASS_LABELS)[batch["label_index"]]
        for key, value in out.items():
            columns.setdefault(key, []).append(value)
    p = {key: np.concatenate(parts) for key, parts in columns.items()}
    truth_binary = np.where(p["label"] == "normal", *BINARY_LABELS)
    anomaly_pred = np.where(p["is_anomaly"], *BINARY_LABELS[::-1])
    probs = np.stack([p["p_normal"], p["p_bacterial"], p["p_viral"]], axis=1)
    metrics = {
        "binary": report.classification_metrics(
            truth_binary, p["pred_binary"], BINARY_LABELS, p["p_pneumonia"]
        ),
        "multiclass": report.classification_metrics(
            p["label"], p["pred_class"], CLASS_LABELS, probs
        ),
        "knn": report.classification_metrics(p["label"], p["knn_label"], CLASS_LABELS, None),
        "autoencoder": report.classification_metrics(
            truth_binary, anomaly_pred, BINARY_LABELS, p["anomaly_score"]
        ),
    }
    return Evaluation(metrics, p)


def write_report(
    evaluation: Evaluation,
    bundle: Bundle,
    dataset: ray.data.Dataset,
    directory: str,
    histories: dict[str, list[dict]] | None = None,
    extra: dict | None = None,
) -> None:
    """metrics.json and the PNG plots of an evaluation into a local folder."""
    os.makedirs(directory, exist_ok=True)
    metrics, p = evaluation.metrics, evaluation.predictions
    report.write_json({"test": metrics, **(extra or {})}, os.path.join(directory, "metrics.json"))
    titles = {
        "binary": "binary CNN (normal vs pneumonia)",
        "multiclass": "three-class CNN",
        "knn": f"KNN (k={bundle.knn.k}, {bundle.knn.feature_kind})",
        "autoencoder": "autoencoder anomaly (pneumonia = anomaly)",
    }
    for name, title in titles.items():
        report.plot_confusion(
            metrics[name], title, os.path.join(directory, f"confusion_{name}.png")
        )
    is_pneumonia = p["label"] != "normal"
    report.plot_roc(
        {
            "binary CNN p_pneumonia": (is_pneumonia, p["p_pneumonia"]),
            "autoencoder anomaly score": (is_pneumonia, p["anomaly_score"]),
            "three-class CNN 1 - p_normal": (is_pneumonia, 1.0 - p["p_normal"]),
        },
        "normal vs pneumonia",
        os.path.join(directory, "roc.png"),
    )
    if histories:
        report.plot_training_curves(histories, os.path.join(directory, "training_curves.png"))
    _plot_reconstructions(
        bundle, dataset, os.path.join(directory, "autoencoder_reconstructions.png")
    )


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
    with torch.inference_mode():
        x = to_model_input(images).to(bundle.device)
        recon = bundle.autoencoder(x)
    errors = (recon - x).pow(2).mean(dim=(1, 2, 3)).cpu().numpy()
    captions = [f"{c}\nmse {e:.4f}" for c, e in zip(captions, errors, strict=True)]
    report.plot_reconstructions(x[:, 0].cpu().numpy(), recon[:, 0].cpu().numpy(), captions, path)


def _choose_knn(
    config: TrainConfig, train_out: dict, val_out: dict
) -> tuple[KnnReference, dict[str, float]]:
    """Fit the KNN on each feature kind, score each on validation, keep the asked-for one."""
    train_labels = np.asarray(CLASS_LABELS)[train_out["label_index"]]
    val_labels = np.asarray(CLASS_LABELS)[val_out["label_index"]]
    fitted, val_accuracy = {}, {}
    for kind in FEATURE_KINDS:
        fitted[kind] = KnnReference.fit(
            list(train_out["image_uri"]),
            list(train_labels),
            select_features(train_out["probs"], train_out["embedding"], kind),
            k=config.knn_k,
            feature_kind=kind,
        )
        predicted = fitted[kind].predict(
            select_features(val_out["probs"], val_out["embedding"], kind)
        )
        val_accuracy[kind] = float(np.mean(predicted == val_labels))
    if config.knn_features == "auto":
        # Ties go to the design's softmax features.
        chosen = max(FEATURE_KINDS, key=lambda kind: (val_accuracy[kind], kind == "softmax"))
    else:
        chosen = config.knn_features
    return fitted[chosen], val_accuracy


def run_training(config: TrainConfig) -> dict:
    """Train the four models on ``config.data`` and write the bundle to ``config.output``.

    Returns the card as written.
    """
    started = time.perf_counter()
    log(f"listing {config.data}")
    images = data.list_store(config.data)
    pool = limit_per_class(
        [i for i in images if i.split in ("train", "val")], config.limit, config.seed
    )
    test_images = [i for i in images if i.split == "test"]
    train_images, val_images = split_by_patient(pool, config.val_fraction, config.seed)
    log(
        f"{len(train_images)} training, {len(val_images)} validation images "
        f"({len({i.patient_id for i in val_images})} patients held out), {len(test_images)} test"
    )

    log(f"decoding at {config.image_size}x{config.image_size} with Ray Data")
    train = data.decode_split(train_images, config.image_size, config.seed)
    val = data.decode_split(val_images, config.image_size, config.seed + 1)
    test = data.decode_split(test_images, config.image_size, config.seed + 2)
    skipped = train.failed + val.failed + test.failed
    for uri, why in skipped:
        log(f"skipped unreadable image {uri}: {why}")
    if not train.count or not val.count:
        raise ValueError(f"{config.data}: no usable training or validation images")

    counts = Counter(
        CLASS_LABELS[i]
        for batch in train.dataset.select_columns(["label_index"]).iter_batches(
            batch_format="numpy"
        )
        for i in batch["label_index"]
    )
    binary_counts = {"normal": counts["normal"], "pneumonia": counts["bacterial"] + counts["viral"]}
    weights = {
        "binary": class_weights(binary_counts, BINARY_LABELS),
        "multiclass": class_weights(dict(counts), CLASS_LABELS),
    }
    log(f"training class counts {dict(counts)}; class weights {weights}")

    scaling = decide_scaling(config)
    log(
        f"Ray Train: {scaling.num_workers} worker(s), {scaling.cpus_per_worker} CPU each"
        f"{', 1 GPU each' if scaling.use_gpu else ''}"
    )
    trained = {}
    for name in ("binary", "multiclass"):
        trained[name] = fit_network(
            name, config, scaling, train.dataset, val.dataset, weights[name]
        )
    trained["autoencoder"] = fit_network(
        "autoencoder", config, scaling, data.normal_only(train), data.normal_only(val), None
    )
    models = {name: network.model(config.image_size) for name, network in trained.items()}
    for model in models.values():
        model.to(memory_format=torch.channels_last)

    log("choosing thresholds and KNN features on validation")
    val_out = collect_outputs(models, val.dataset)
    train_out = collect_outputs({"multiclass": models["multiclass"]}, train.dataset)
    val_is_pneumonia = val_out["label_index"] > 0
    binary_threshold = report.youden_threshold(val_is_pneumonia, val_out["p_pneumonia"])
    anomaly_threshold = report.percentile_threshold(
        val_out["ae_mse"][~val_is_pneumonia], config.anomaly_percentile
    )
    knn, knn_val_accuracy = _choose_knn(config, train_out, val_out)

    card = {
        "image_size": config.image_size,
        "preprocessing": PREPROCESSING,
        "models": {
            "binary": {
                "file": "binary.pt",
                "architecture": "binary_cnn",
                "labels": list(BINARY_LABELS),
                "output": "sigmoid: p_pneumonia",
                "threshold": binary_threshold,
                "threshold_rule": "Youden's J (max sensitivity + specificity) on validation",
                "best_epoch": trained["binary"].best_epoch,
            },
            "multiclass": {
                "file": "multiclass.pt",
                "architecture": "multiclass_cnn",
                "labels": list(CLASS_LABELS),
                "output": "softmax",
                "best_epoch": trained["multiclass"].best_epoch,
            },
            "knn": {
                "file": "knn_reference.parquet",
                "labels": list(CLASS_LABELS),
                "k": knn.k,
                "feature_kind": knn.feature_kind,
                "metric": "euclidean",
                "validation_accuracy": knn_val_accuracy,
                "feature_rule": (
                    f"--knn-features {config.knn_features}"
                    + (": better validation accuracy" if config.knn_features == "auto" else "")
                ),
                "reference_images": len(knn.uris),
            },
            "autoencoder": {
                "file": "autoencoder.pt",
                "architecture": "conv_autoencoder",
                "score": "mse",
                "score_description": "mean squared reconstruction error",
                "threshold": anomaly_threshold,
                "threshold_rule": (
                    f"{config.anomaly_percentile:g}th percentile of the scores of "
                    "normal validation images"
                ),
                "best_epoch": trained["autoencoder"].best_epoch,
            },
        },
        "training": {
            "config": config.to_dict(),
            "class_counts": dict(counts),
            "class_weights": weights,
            "imbalance": "inverse-frequency class weights in the binary and three-class losses",
            "scaling": vars(scaling),
            "worker_nodes": {name: network.worker_nodes for name, network in trained.items()},
            "history": {name: network.history for name, network in trained.items()},
            "skipped_images": [{"image_uri": u, "error": e} for u, e in skipped],
        },
        "data_fingerprint": {
            "store": config.data,
            "train": data.fingerprint(train_images),
            "val": data.fingerprint(val_images),
            "test": data.fingerprint(test_images),
        },
    }
    bundle = Bundle(card, knn=knn, **models)

    log("evaluating on the test split")
    evaluation = evaluate_bundle(bundle, test.dataset)
    card["metrics"] = {"test": evaluation.metrics}
    with tempfile.TemporaryDirectory() as report_dir:
        write_report(
            evaluation,
            bundle,
            test.dataset,
            report_dir,
            histories={name: network.history for name, network in trained.items()},
            extra={
                "skipped_images": card["training"]["skipped_images"],
                "thresholds": {"binary": binary_threshold, "anomaly": anomaly_threshold},
            },
        )
        card = write_bundle(bundle, config.output, report_dir)

    print("\n" + report.metrics_table(evaluation.metrics), flush=True)
    log(f"bundle {card['model_version']} written to {config.output}")
    log(f"report: {config.output.rstrip('/')}/report/ (metrics.json and PNG plots)")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return card
