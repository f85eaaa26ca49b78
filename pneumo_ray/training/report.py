"""Metrics, operating thresholds and plots of a trained model set."""

from __future__ import annotations

import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # jobs run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import (  # noqa: E402
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from pneumo_ray.io import stores  # noqa: E402


def classification_metrics(
    y_true: Sequence[str], y_pred: Sequence[str], labels: Sequence[str], scores: np.ndarray | None
) -> dict:
    """Accuracy, per-class precision/recall/F1/support, confusion matrix, and ROC AUC.

    ``scores`` is the positive-class score (binary) or an (N, K) probability matrix; AUC is
    left out where a class is missing from ``y_true``.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=list(labels), zero_division=0
    )
    metrics: dict = {
        "n": int(len(y_true)),
        "accuracy": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "labels": list(labels),
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=list(labels)).tolist(),
    }
    present = [label for label in labels if np.any(y_true == label)]
    if scores is not None and len(present) == len(labels):
        if np.ndim(scores) == 1:
            metrics["roc_auc"] = float(roc_auc_score(y_true == labels[1], scores))
        else:
            # sklearn wants sorted labels: score with class indices in ``labels`` order.
            index = np.array([list(labels).index(y) for y in y_true])
            metrics["roc_auc"] = float(
                roc_auc_score(index, scores, multi_class="ovr", labels=np.arange(len(labels)))
            )
    return metrics


def youden_threshold(is_positive: np.ndarray, scores: np.ndarray) -> float:
    """The threshold that maximizes sensitivity + specificity (Youden's J) on these scores."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if is_positive.all() or not is_positive.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(is_positive, scores)
    best = int(np.argmax(tpr - fpr))
    return float(min(1.0, thresholds[best]))


def sensitivity_threshold(is_positive: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (``score >= threshold``) on these scores is at
    least ``target``: as specific as the target allows."""
    is_positive = np.asarray(is_positive, dtype=bool)
    if not is_positive.any():
        raise ValueError("no positive validation images to set a sensitivity threshold from")
    positives = np.sort(np.asarray(scores, dtype=np.float64)[is_positive])[::-1]
    # The ceil(target * n)-th highest positive score keeps that many positives at or above it.
    needed = max(1, int(np.ceil(target * len(positives) - 1e-9)))
    return float(positives[needed - 1])


def operating_point(is_positive: np.ndarray, scores: np.ndarray, threshold: float) -> dict:
    """Sensitivity and specificity of ``score >= threshold``."""
    is_positive = np.asarray(is_positive, dtype=bool)
    called = np.asarray(scores) >= threshold
    return {
        "sensitivity": float(np.mean(called[is_positive])) if is_positive.any() else float("nan"),
        "specificity": float(np.mean(~called[~is_positive]))
        if (~is_positive).any()
        else float("nan"),
    }


def percentile_threshold(normal_scores: np.ndarray, percentile: float) -> float:
    """The ``percentile``-th percentile of normal images' anomaly scores."""
    if len(normal_scores) == 0:
        raise ValueError("no normal validation images to set the anomaly threshold from")
    return float(np.percentile(normal_scores, percentile))


# --- plots -----------------------------------------------------------------------------------


def plot_confusion(metrics: dict, title: str, path: str) -> None:
    matrix = np.asarray(metrics["confusion_matrix"])
    labels = metrics["labels"]
    fig, ax = plt.subplots(figsize=(1.6 * len(labels) + 2, 1.4 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        colour = "white" if value > matrix.max() / 2 else "black"
        ax.text(j, i, str(value), ha="center", va="center", color=colour)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: str) -> None:
    """``curves``: name -> (is_positive, score)."""
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (is_positive, scores) in curves.items():
        if is_positive.all() or not is_positive.any():
            continue
        fpr, tpr, _ = roc_curve(is_positive, scores)
        auc = roc_auc_score(is_positive, scores)
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reliability(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str, path: str
) -> None:
    """Reliability diagram: observed pneumonia rate against mean predicted probability in
    equal-width bins, with each curve's expected calibration error."""
    from pneumo_ray.models.calibration import expected_calibration_error, reliability

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfectly calibrated")
    for name, (probability, is_positive) in curves.items():
        table = reliability(probability, is_positive)
        used = table["count"] > 0
        ece = expected_calibration_error(probability, is_positive)
        ax.plot(
            table["predicted"][used], table["observed"][used], "o-", label=f"{name} (ECE {ece:.3f})"
        )
    ax.set(xlabel="mean predicted probability", ylabel="observed rate", title=title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training_curves(histories: dict[str, list[dict]], path: str) -> None:
    fig, axes = plt.subplots(1, len(histories), figsize=(4.5 * len(histories), 3.6), squeeze=False)
    for ax, (name, history) in zip(axes[0], histories.items(), strict=True):
        epochs = [row["epoch"] for row in history]
        ax.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train loss")
        ax.plot(epochs, [row["val_loss"] for row in history], marker="o", label="val loss")
        if history and "val_accuracy" in history[0]:
            twin = ax.twinx()
            twin.plot(epochs, [row["val_accuracy"] for row in history], "g--", label="val acc")
            twin.set_ylim(0, 1)
            twin.set_ylabel("val accuracy")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_reconstructions(
    images: np.ndarray, reconstructions: np.ndarray, captions: Sequence[str], path: str
) -> None:
    """Autoencoder inputs (top row) beside their reconstructions (bottom row)."""
    n = len(images)
    fig, axes = plt.subplots(2, n, figsize=(1.8 * n, 4), squeeze=False)
    for i in range(n):
        axes[0][i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        axes[0][i].set_title(captions[i], fontsize=7)
        axes[1][i].imshow(reconstructions[i], cmap="gray", vmin=0, vmax=1)
        for row in (0, 1):
            axes[row][i].axis("off")
    axes[0][0].text(
        -0.1, 0.5, "input", transform=axes[0][0].transAxes, rotation=90, ha="right", va="center"
    )
    axes[1][0].text(
        -0.1,
        0.5,
        "reconstruction",
        transform=axes[1][0].transAxes,
        rotation=90,
        ha="right",
        va="center",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_json(payload: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "wb") as handle:
        handle.write(stores.json_bytes(payload))
