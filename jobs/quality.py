"""Train the four models on a labelled store with a named profile, evaluate them on its test
split, and print the results against the quality targets.

    python jobs/quality.py --data ../shared/data/chest_xray --output out/quality \\
        [--profile lite] [extra jobs/train.py flags ...]

The ``lite`` profile (the default) fine-tunes ImageNet EfficientNet-Lite0 at 224 px within 90
minutes on a 2-core machine; ``cpu-hour`` is the seed CNNs' at 128 px (issue 11's), the ``gpu``
profile what a GPU cluster affords (EfficientNet-Lite2 at 256 px); extra
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
#
# Framing augmentation (issue 31), fixed before the runs that test it, from what the
# counterfactual check on validation images measures and not from test figures: a tighter
# crop of a normal film turned 14.5% of unseen training-site normals into pneumonia calls, so
# framing (zoom 0.75-1.4, aspect), border bands and burned-in markers and text are drawn for
# every class alike; the training report's counterfactual check says what is left.
#
# The framing drawn relative to each film's typical frame (--framing-reference learned), fixed
# before the run that tests it (run 11, not yet run to its end): runs 8-10's checks still
# moved 10-28% of validation normals under a crop to 70%, and benchmarks/reframing_check.py
# measured, on training films alone, that the store frames pneumonia 2-4% tighter per side
# than normal; a zoom drawn relative to the film's edges keeps that difference, one drawn
# relative to its predicted frame does not.
ROBUSTNESS = [
    "--acquisition-shift", "--normalization", "standardize", "--tta", "flip",
    "--autoencoder-masking", "0.5", "--framing-augmentation", "--framing-reference", "learned",
]  # fmt: skip

# Fine-tuning an ImageNet EfficientNet-Lite0 (issue 21) on 2 CPU cores, rules fixed in a commit
# before the run that tests them (no profile was chosen on test figures): 224 px (the test
# images' own size); the stem and the first 5 blocks (through the stride-8 stage) frozen with
# their ImageNet BatchNorm statistics, which makes a training step about 2.7x faster here
# (33-39 against 12.5-14 images/s at batch 32, benchmarks/benchmark_finetune.py); the backbone at a
# tenth of the head's learning rate; 5 epochs per CNN with cosine decay (the best validation
# epoch is kept); the KNN on softmax or the fine-tuned embedding, whichever validation
# prefers; PatchCore among the anomaly scores (auto: the highest validation AUC).
PRETRAINED = [
    "--architecture", "efficientnet_lite0", "--pretrained", "imagenet",
    "--freeze-blocks", "5", "--backbone-lr-scale", "0.1", "--knn-features", "auto",
]  # fmt: skip

PROFILES = {
    # The default: the pretrained backbone, within 90 minutes on 2 CPU cores for the four
    # models, the references and the evaluation.
    "lite": [
        "--image-size", "224", "--lr-schedule", "cosine", "--weight-decay", "1e-4",
        "--binary-epochs", "5", "--lr-binary", "1e-3",
        "--multiclass-epochs", "5", "--lr-multiclass", "1e-3", "--multiclass-patience", "0",
        "--autoencoder-epochs", "10", "--lr-autoencoder", "1e-3",
        *PRETRAINED, *ROBUSTNESS,
    ],
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
    # What a GPU cluster affords: EfficientNet-Lite2 from its ImageNet weights at 256 px (its
    # native 260, on the 16-pixel grid), every block trained (backbone at a tenth of the
    # head's rate), longer schedules.
    "gpu": [
        "--image-size", "256", "--use-gpu", "--batch-size", "64",
        "--architecture", "efficientnet_lite2", "--pretrained", "imagenet",
        "--backbone-lr-scale", "0.1", "--knn-features", "auto",
        "--lr-schedule", "cosine", "--weight-decay", "1e-4",
        "--binary-epochs", "12", "--lr-binary", "1e-3",
        "--multiclass-epochs", "15", "--lr-multiclass", "1e-3", "--multiclass-patience", "0",
        "--autoencoder-epochs", "40", "--lr-autoencoder", "1e-3",
        *ROBUSTNESS,
    ],
    # Minutes, for checking the script itself.
    "smoke": ["--image-size", "32", "--epochs", "1", "--limit", "20", *ROBUSTNESS],
}  # fmt: skip

# Test-split targets (issue 21): minimums, or ("<=", maximum); the KNN is held to the
# three-class argmax's accuracy less 0.01.
TARGETS = {
    "binary": {
        "roc_auc": 0.965,
        "accuracy": 0.90,
        "sensitivity": 0.93,
        "specificity": 0.85,
        "ece": ("<=", 0.05),
    },
    "multiclass": {"accuracy": 0.82},
    "autoencoder": {"roc_auc": 0.85},
}
KNN_MARGIN = 0.01


def targets_for(metrics: dict) -> dict:
    argmax = metrics["multiclass"]["headline"]["accuracy"]
    return {**TARGETS, "knn": {"accuracy": round(argmax - KNN_MARGIN, 6)}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--output", required=True, help="where the bundle goes")
    parser.add_argument("--profile", default="lite", choices=sorted(PROFILES))
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
