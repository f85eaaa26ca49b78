"""Score image stores with a trained bundle and write Parquet, incrementally.

    python jobs/score.py --model BUNDLE --input URI [--input URI ...] --output OUT_URI
        [--batch-size N] [--num-workers N|MIN-MAX] [--use-gpu/--no-use-gpu]
        [--commit-every N] [--only-new | --rescore]

Inputs are folders, s3:// prefixes (walked recursively) or manifests (.txt/.csv/.parquet) of
image URIs. Rows are committed in parts of --commit-every images, so a killed job keeps its
committed parts. Rerunning with the same output scores only what this model has not scored
(and images whose last read failed transiently). One job at a time per output: a second is
refused. Runs the same under ``ray job submit --working-dir . -- python jobs/score.py ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.errors import USER_ERRORS  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402
from pneumo_ray.score import ScoreConfig, run_scoring  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model bundle (folder or s3:// URI)")
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        dest="inputs",
        help="folder, s3:// prefix or manifest; repeatable",
    )
    parser.add_argument("--output", required=True, help="Parquet output folder or s3:// prefix")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--num-workers",
        default=None,
        metavar="N|MIN-MAX",
        help="model actors: N, or MIN-MAX for a pool that grows as the autoscaler adds nodes "
        "(default: one per GPU up now, else one per node)",
    )
    parser.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score on GPUs, asking the autoscaler for GPU nodes when none is up "
        "(default: GPUs when the cluster has them now)",
    )
    parser.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "cpu", "gpu"],
        help="JPEG decode: cpu (Ray Data tasks) or gpu (nvJPEG in the model actors, CPU "
        "fallback for PNG, DICOM and refused files); auto: gpu when scoring on GPUs",
    )
    parser.add_argument(
        "--commit-every",
        type=int,
        default=10_000,
        metavar="N",
        help="commit a part every N images; a killed run keeps its committed parts "
        "(default: 10000)",
    )
    again = parser.add_mutually_exclusive_group()
    again.add_argument(
        "--rescore", action="store_true", help="score every image again, not only new ones"
    )
    again.add_argument(
        "--only-new",
        action="store_true",
        help="skip images scored by any model before (default: a new model_version rescores)",
    )
    parser.add_argument(
        "--lock-ttl",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="S3 outputs: take over the lock of a job that has not renewed it for this long "
        "(it died); a local output's lock ends with its job (default: 600)",
    )
    parser.add_argument("--threads-per-actor", type=int, default=None)
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else embedded Ray)",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    config = ScoreConfig(
        model=args.model,
        inputs=args.inputs,
        output=args.output,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        decode=args.decode,
        rescore=args.rescore,
        only_new=args.only_new,
        commit_every=args.commit_every,
        lock_ttl_s=args.lock_ttl,
        threads_per_actor=args.threads_per_actor,
    )
    init_ray(args.address)
    summary = run_scoring(config)
    for uri, why in summary.errors[:20]:
        print(f"  failed: {uri}: {why}")
    if len(summary.errors) > 20:
        print(f"  ... and {len(summary.errors) - 20} more (see the error column)")
    print(f"\n{summary}", flush=True)


if __name__ == "__main__":
    try:
        main(parse_args())
    except USER_ERRORS as exc:
        sys.exit(f"score.py: error: {exc}")
