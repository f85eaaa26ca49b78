"""Train the four models on a labelled store with a named profile, evaluate them on its test
split, and print the results against the quality targets.

    python jobs/quality.py --data ../shared/data/chest_xray --output out/quality \\
        [--profile cpu-hour] [extra jobs/train.py flags ...]

The ``cpu-hour`` profile finishes in about an hour on a 2-core machine (128x128 input), the
``gpu`` profile is what a GPU cluster affords (224 px, ResNet-18); extra
flags after the known ones go to jobs/train.py and override the profile's. The bundle goes to
OUTPUT with its test-split report in OUTPUT/report. Rerunning resumes from checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time

from pneumo_ray import cli
from pneumo_ray.cli import user_errors
from pneumo_ray.training.evaluation import results_table
from pneumo_ray.training.pipeline import run_training

# Robustness to another site's images (issue 11), fixed before the run that tests them (the
# validation split comes from the training source, so it cannot judge them): acquisition-shift
# augmentation, per-image standardization, flip TTA, the combined binary score (the default),
# temperature scaling (the default), and an autoencoder that also learns to inpaint; the
# anomaly score among latent / inpaint / mse is the one with the highest validation AUC.
ROBUSTNESS = [
    "--acquisition-shift", "--normalization", "standardize", "--tta", "flip",
    "--autoencoder-masking", "0.5",
]  # fmt: skip

PROFILES = {
    # Within 90 minutes on 2 CPU cores for all four models and the evaluation, with margin
    # for a slow day (this machine trains the seed CNN at 28-37 images/s in a Ray Train
    # worker). Three-class 10 epochs (was 16): run 3's best validation loss came at epoch 5.
    "cpu-hour": [
        "--image-size", "128", "--lr-schedule", "cosine", "--weight-decay", "1e-4",
        "--binary-epochs", "8", "--lr-binary", "1e-3",
        "--multiclass-epochs", "10", "--lr-multiclass", "1e-3", "--multiclass-patience", "0",
        "--autoencoder-epochs", "20", "--lr-autoencoder", "1e-3",
        *ROBUSTNESS,
    ],
    # What a GPU cluster affords: 224 px, a ResNet-18 (from scratch, so it runs where nothing
    # can be downloaded; add --pretrained imagenet where the cluster can), longer schedules.
    "gpu": [
        "--image-size", "224", "--use-gpu", "--architecture", "resnet18", "--batch-size", "64",
        "--lr-schedule", "cosine", "--weight-decay", "1e-4",
        "--binary-epochs", "20", "--lr-binary", "1e-3",
        "--multiclass-epochs", "30", "--lr-multiclass", "1e-3", "--multiclass-patience", "0",
        "--autoencoder-epochs", "40", "--lr-autoencoder", "1e-3",
        *ROBUSTNESS,
    ],
    # Minutes, for checking the script itself.
    "smoke": ["--image-size", "32", "--epochs", "1", "--limit", "20", *ROBUSTNESS],
}  # fmt: skip

# Test-split targets (issue 11): minimums, or ("<=", maximum); the KNN is held to the
# three-class argmax's accuracy.
TARGETS = {
    "binary": {
        "roc_auc": 0.96,
        "accuracy": 0.88,
        "sensitivity": 0.93,
        "specificity": 0.80,
        "ece": ("<=", 0.05),
    },
    "multiclass": {"accuracy": 0.82},
    "autoencoder": {"roc_auc": 0.80},
}


def targets_for(metrics: dict) -> dict:
    return {**TARGETS, "knn": {"accuracy": metrics["multiclass"]["headline"]["accuracy"]}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--output", required=True, help="where the bundle goes")
    parser.add_argument("--profile", default="cpu-hour", choices=sorted(PROFILES))
    parser.add_argument("--address", default=None, help="Ray cluster (default: embedded)")
    args, extra = parser.parse_known_args(argv)
    train_argv = ["--data", args.data, "--output", args.output, *PROFILES[args.profile], *extra]
    print(f"[pneumo_ray] profile {args.profile}: jobs/train.py {shlex.join(train_argv)}")
    train_args = cli.train_parser("quality.py").parse_args(train_argv)
    config = cli.train_config(train_args)
    train_args.address = args.address
    cli.connect(train_args, "quality")
    started = time.perf_counter()
    # run_training evaluates the bundle on the test split itself (its report is in
    # OUTPUT/report); the table against the targets reads those figures, not a second pass.
    metrics = run_training(config)["metrics"]["test"]
    print(
        "\nResults on the test split against the targets "
        "(95% CIs: patient-level bootstrap):\n"
        + results_table(metrics, targets_for(metrics))
        + f"\nprofile {args.profile}: {_minutes(time.perf_counter() - started)} in all",
        flush=True,
    )
    return metrics


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"


if __name__ == "__main__":
    try:
        main()
    except user_errors() as exc:
        sys.exit(f"quality.py: error: {exc}")
