"""Train the four models on a labelled store with a named profile, evaluate them on its test
split, and print the results against the quality targets.

    python jobs/quality.py --data ../shared/data/chest_xray --output out/quality \\
        [--profile cpu-hour] [extra jobs/train.py flags ...]

The ``cpu-hour`` profile finishes in about an hour on a 2-core machine (128x128 input); extra
flags after the known ones go to jobs/train.py and override the profile's. The bundle goes to
OUTPUT, the evaluation report to OUTPUT/evaluation/test. Rerunning resumes from checkpoints.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import train  # noqa: E402  (jobs/train.py, beside this file)

from pneumo_ray.errors import USER_ERRORS  # noqa: E402
from pneumo_ray.evaluation import evaluate_store, results_table  # noqa: E402
from pneumo_ray.pipeline import run_training  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402

PROFILES = {
    # About an hour on 2 CPU cores for all four models and the evaluation.
    "cpu-hour": [
        "--image-size", "128", "--lr-schedule", "cosine", "--weight-decay", "1e-4",
        "--binary-epochs", "10", "--lr-binary", "1e-3",
        "--multiclass-epochs", "24", "--lr-multiclass", "1e-3", "--multiclass-patience", "0",
        "--autoencoder-epochs", "20", "--lr-autoencoder", "1e-3",
    ],
    # Minutes, for checking the script itself.
    "smoke": ["--image-size", "32", "--epochs", "1", "--limit", "20"],
}  # fmt: skip

# Minimum test-split figures (issue 5); knn is held to the multiclass accuracy minus 0.01.
TARGETS = {
    "binary": {"roc_auc": 0.95, "accuracy": 0.88},
    "multiclass": {"accuracy": 0.80},
    "autoencoder": {"roc_auc": 0.80},
}


def targets_for(metrics: dict) -> dict:
    knn_floor = metrics["multiclass"]["headline"]["accuracy"] - 0.01
    return {**TARGETS, "knn": {"accuracy": knn_floor}}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--output", required=True, help="where the bundle goes")
    parser.add_argument("--profile", default="cpu-hour", choices=sorted(PROFILES))
    parser.add_argument("--address", default=None, help="Ray cluster (default: embedded)")
    args, extra = parser.parse_known_args(argv)
    train_argv = ["--data", args.data, "--output", args.output, *PROFILES[args.profile], *extra]
    print(f"[pneumo_ray] profile {args.profile}: jobs/train.py {shlex.join(train_argv)}")
    config = train.config_from_args(train.parse_args(train_argv))
    init_ray(args.address)
    run_training(config)
    evaluation = evaluate_store(args.output, args.data, "test", print_table=False)
    print(
        "\nResults on the test split against the targets "
        "(95% CIs: patient-level bootstrap):\n"
        + results_table(evaluation.metrics, targets_for(evaluation.metrics)),
        flush=True,
    )
    return evaluation.metrics


if __name__ == "__main__":
    try:
        main()
    except USER_ERRORS as exc:
        sys.exit(f"quality.py: error: {exc}")
