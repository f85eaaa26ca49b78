"""Evaluate a trained model bundle on one split of a labelled image store.

    python jobs/evaluate.py --model BUNDLE --data STORE [--split test] [--output DIR]
        [--bootstrap N]

Scores every image of the split with all four models and writes the same report as training
(metrics.json, predictions.parquet, confusion matrices, ROC curves, reconstructions) to DIR
(default BUNDLE/evaluation/SPLIT), with patient-level bootstrap 95% confidence intervals on
every headline figure. Prints the results table. BUNDLE, STORE and DIR may be s3:// URIs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.errors import USER_ERRORS  # noqa: E402
from pneumo_ray.evaluation import BOOTSTRAP_REPLICATES, evaluate_store  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model bundle (folder or s3:// URI)")
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument(
        "--output", default=None, help="report folder (default: MODEL/evaluation/SPLIT)"
    )
    parser.add_argument(
        "--bootstrap",
        type=int,
        default=BOOTSTRAP_REPLICATES,
        help=f"bootstrap replicates for the 95%% intervals (default {BOOTSTRAP_REPLICATES}; "
        "0 = none)",
    )
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else embedded Ray)",
    )
    args = parser.parse_args(argv)
    if args.bootstrap < 0:
        parser.error(f"--bootstrap must be 0 or more, got {args.bootstrap}")
    return args


def main(args: argparse.Namespace) -> None:
    init_ray(args.address)
    evaluate_store(args.model, args.data, args.split, args.output, args.bootstrap)


if __name__ == "__main__":
    try:
        main(parse_args())
    except USER_ERRORS as exc:
        sys.exit(f"evaluate.py: error: {exc}")
