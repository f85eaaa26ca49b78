"""The training job end to end: store -> three trained networks + KNN -> bundle + report."""

from __future__ import annotations

import tempfile
import time
from collections import Counter

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from pneumo_ray import data, report
from pneumo_ray.bundle import NORMAL_REFERENCE_FILE, Bundle, write_bundle
from pneumo_ray.config import TrainConfig
from pneumo_ray.evaluation import evaluate_bundle, log, results_table, write_report
from pneumo_ray.images import PREPROCESSING
from pneumo_ray.labels import BINARY_LABELS, CLASS_LABELS, limit_per_class, split_by_patient
from pneumo_ray.models import KnnReference
from pneumo_ray.models.anomaly import ANOMALY_SCORES, SCORE_DESCRIPTIONS, NormalReference
from pneumo_ray.models.knn import FEATURE_KINDS, KNN_K_CANDIDATES, select_features
from pneumo_ray.train import class_weights, collect_outputs, decide_scaling, fit_network


def _choose_knn(
    config: TrainConfig, train_out: dict, val_out: dict
) -> tuple[KnnReference, dict[str, dict[str, float]]]:
    """Fit the KNN for each feature kind and each candidate k, score each on validation, keep
    the asked-for kind with the asked-for k (or, for auto, the best on validation)."""
    train_labels = np.asarray(CLASS_LABELS)[train_out["label_index"]]
    val_labels = np.asarray(CLASS_LABELS)[val_out["label_index"]]
    if config.knn_k is not None:
        ks = [config.knn_k]
    else:  # candidates the reference set can serve; the smallest always
        ks = [k for k in KNN_K_CANDIDATES if k <= len(train_labels)] or [KNN_K_CANDIDATES[0]]
    fitted, val_accuracy = {}, {}
    for kind in FEATURE_KINDS:
        features = select_features(train_out["probs"], train_out["embedding"], kind)
        val_features = select_features(val_out["probs"], val_out["embedding"], kind)
        val_accuracy[kind] = {}
        for k in ks:
            knn = KnnReference.fit(
                list(train_out["image_uri"]), list(train_labels), features, k, kind
            )
            fitted[kind, k] = knn
            val_accuracy[kind][str(k)] = float(np.mean(knn.predict(val_features) == val_labels))
    kinds = FEATURE_KINDS if config.knn_features == "auto" else (config.knn_features,)
    # Ties go to the design's softmax features, then to the smaller k.
    chosen = max(
        ((kind, k) for kind in kinds for k in ks),
        key=lambda pair: (val_accuracy[pair[0]][str(pair[1])], pair[0] == "softmax", -pair[1]),
    )
    return fitted[chosen], val_accuracy


def _binary_threshold(config: TrainConfig, val_out: dict) -> tuple[float, dict]:
    """The binary threshold from validation outputs, and the card entry that says how."""
    is_pneumonia = val_out["label_index"] > 0
    scores = val_out["p_pneumonia"]
    if config.binary_threshold == "sensitivity":
        threshold = report.sensitivity_threshold(is_pneumonia, scores, config.target_sensitivity)
        rule = (
            f"highest threshold with validation sensitivity >= {config.target_sensitivity:g} "
            "(--binary-threshold sensitivity)"
        )
    else:
        threshold = report.youden_threshold(is_pneumonia, scores)
        rule = (
            "Youden's J (max sensitivity + specificity) on validation (--binary-threshold youden)"
        )
    validation = report.operating_point(is_pneumonia, scores, threshold)
    return threshold, {"threshold_rule": rule, "validation": validation}


def _choose_anomaly_score(
    config: TrainConfig, normal_train_out: dict, val_out: dict
) -> tuple[NormalReference, str, dict]:
    """Fit the latent reference on normal training images; threshold both anomaly scores on
    normal validation images; keep the asked-for score (auto: higher validation AUC)."""
    reference = NormalReference.fit(
        list(normal_train_out["image_uri"]), normal_train_out["ae_code"], k=config.anomaly_k
    )
    val_scores = {"latent": reference.score(val_out["ae_code"]), "mse": val_out["ae_mse"]}
    val_is_pneumonia = val_out["label_index"] > 0
    scores = {}
    for kind in ANOMALY_SCORES:
        values = val_scores[kind]
        scores[kind] = {
            "description": SCORE_DESCRIPTIONS[kind],
            "threshold": report.percentile_threshold(
                values[~val_is_pneumonia], config.anomaly_percentile
            ),
            "validation_auc": float(roc_auc_score(val_is_pneumonia, values))
            if val_is_pneumonia.any() and (~val_is_pneumonia).any()
            else float("nan"),
        }
    if config.anomaly_score == "auto":
        # NaN AUCs (a one-class validation set) compare False: the latent score is kept.
        chosen = max(
            ANOMALY_SCORES, key=lambda kind: (scores[kind]["validation_auc"], kind == "latent")
        )
    else:
        chosen = config.anomaly_score
    return reference, chosen, scores


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
    normal_train = data.normal_only(train)
    trained["autoencoder"] = fit_network(
        "autoencoder", config, scaling, normal_train, data.normal_only(val), None
    )
    models = {name: network.model(config.image_size) for name, network in trained.items()}
    for model in models.values():
        model.to(memory_format=torch.channels_last)

    log("choosing thresholds and KNN features on validation")
    val_out = collect_outputs(models, val.dataset)
    train_out = collect_outputs({"multiclass": models["multiclass"]}, train.dataset)
    normal_train_out = collect_outputs({"autoencoder": models["autoencoder"]}, normal_train)
    binary_threshold, binary_rule = _binary_threshold(config, val_out)
    knn, knn_val_accuracy = _choose_knn(config, train_out, val_out)
    normal_reference, anomaly_kind, anomaly_scores = _choose_anomaly_score(
        config, normal_train_out, val_out
    )
    anomaly_threshold = anomaly_scores[anomaly_kind]["threshold"]
    log(
        f"binary threshold {binary_threshold:.4f} (validation {binary_rule['validation']}); "
        f"anomaly score {anomaly_kind} (validation AUC "
        + ", ".join(f"{k} {v['validation_auc']:.3f}" for k, v in anomaly_scores.items())
        + f"); KNN on {knn.feature_kind} with k={knn.k} (validation accuracy "
        + f"{knn_val_accuracy[knn.feature_kind][str(knn.k)]:.3f})"
    )

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
                **binary_rule,
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
                "k_rule": (
                    f"--knn-k {config.knn_k}"
                    if config.knn_k is not None
                    else f"--knn-k auto: best validation accuracy of k in {list(KNN_K_CANDIDATES)}"
                ),
                "reference_images": len(knn.uris),
            },
            "autoencoder": {
                "file": "autoencoder.pt",
                "architecture": "conv_autoencoder",
                "score": anomaly_kind,
                "score_description": SCORE_DESCRIPTIONS[anomaly_kind],
                "score_rule": (
                    f"--anomaly-score {config.anomaly_score}"
                    + (": higher validation ROC AUC" if config.anomaly_score == "auto" else "")
                ),
                "threshold": anomaly_threshold,
                "threshold_rule": (
                    f"{config.anomaly_percentile:g}th percentile of the scores of "
                    "normal validation images"
                ),
                "scores": anomaly_scores,
                "normal_reference": {
                    "file": NORMAL_REFERENCE_FILE,
                    "k": normal_reference.k,
                    "images": len(normal_reference.uris),
                },
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
    bundle = Bundle(card, knn=knn, normal_reference=normal_reference, **models)

    log("evaluating on the test split")
    evaluation = evaluate_bundle(bundle, test.dataset)
    card["metrics"] = {"test": evaluation.metrics, "bootstrap": evaluation.bootstrap}
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
                "anomaly_score": anomaly_kind,
            },
        )
        card = write_bundle(bundle, config.output, report_dir)

    print("\n" + results_table(evaluation.metrics), flush=True)
    log(f"bundle {card['model_version']} written to {config.output}")
    log(f"report: {config.output.rstrip('/')}/report/ (metrics.json and PNG plots)")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return card
