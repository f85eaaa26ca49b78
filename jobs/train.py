"""Train the four chest X-ray models on a labelled image store and write a model bundle.

    python jobs/train.py --data STORE --output BUNDLE [--image-size N] [--epochs N] [--limit N]
        [--num-workers N] [--use-gpu/--no-use-gpu]

STORE and BUNDLE are local paths or s3:// URIs. Runs the same under
``ray job submit --working-dir . -- python jobs/train.py ...``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.config import (  # noqa: E402
    ANOMALY_SCORES,
    ARCHITECTURES,
    BINARY_SCORES,
    NORMALIZATIONS,
    TTA_MODES,
    TrainConfig,
)
from pneumo_ray.errors import USER_ERRORS  # noqa: E402
from pneumo_ray.models.knn import KNN_K_CANDIDATES  # noqa: E402
from pneumo_ray.pipeline import run_training  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402


def _int_or_auto(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--output", required=True, help="where the bundle goes")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs for every network (default: the design's 10/10/30)",
    )
    parser.add_argument("--binary-epochs", type=int, default=None)
    parser.add_argument("--multiclass-epochs", type=int, default=None)
    parser.add_argument("--autoencoder-epochs", type=int, default=None)
    parser.add_argument("--lr-binary", type=float, default=None, help="default 3e-5")
    parser.add_argument("--lr-multiclass", type=float, default=None, help="default 1e-3")
    parser.add_argument("--lr-autoencoder", type=float, default=None, help="default 1e-3")
    parser.add_argument(
        "--multiclass-patience",
        type=int,
        default=None,
        help="three-class early stopping: epochs without val-loss gain (default 3; 0 = off)",
    )
    parser.add_argument(
        "--lr-schedule",
        default=None,
        choices=["constant", "cosine"],
        help="per-epoch learning rate of every network (default constant: the design's)",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW weight decay of the two CNNs (default 0: the design's Adam)",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="at most N training images per class (smoke runs)"
    )
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--num-workers",
        default=None,
        metavar="N|MIN-MAX",
        help="Ray Train workers: N, or MIN-MAX for elastic training that grows as the "
        "autoscaler adds nodes (default: one per GPU up now, else 1)",
    )
    parser.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train on GPUs, asking the autoscaler for GPU nodes when none is up "
        "(default: GPUs when the cluster has them now)",
    )
    parser.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast precision (auto: bf16 on GPUs that support it, fp32 on CPU)",
    )
    parser.add_argument("--cpus-per-worker", type=int, default=None)
    parser.add_argument(
        "--storage-path", default=None, help="checkpoint storage (default: <output>/checkpoints)"
    )
    parser.add_argument("--max-failures", type=int, default=2)
    parser.add_argument(
        "--knn-k",
        type=_int_or_auto,
        default=None,
        metavar="{auto,K}",
        help=f"KNN neighbours; auto (default): best validation accuracy of {KNN_K_CANDIDATES}",
    )
    parser.add_argument(
        "--knn-features", default="softmax", choices=["auto", "softmax", "embedding"]
    )
    parser.add_argument("--anomaly-percentile", type=float, default=95.0)
    parser.add_argument(
        "--anomaly-score",
        default="auto",
        choices=["auto", *ANOMALY_SCORES],
        help="autoencoder anomaly score (auto: the highest validation AUC)",
    )
    parser.add_argument(
        "--autoencoder-masking",
        type=float,
        default=0.0,
        help="share of the autoencoder's training images shown with patches hidden, so it "
        "learns to inpaint them (the inpaint score); 0 = the design's plain autoencoder",
    )
    parser.add_argument(
        "--architecture",
        default="seed",
        choices=ARCHITECTURES,
        help="the two CNNs: the design's (seed) or a torchvision backbone, one-channel stem",
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        metavar="imagenet|FILE",
        help="initial weights of a torchvision --architecture: imagenet (torchvision's "
        "weights API; downloads once to $TORCH_HOME) or a state dict file",
    )
    parser.add_argument(
        "--normalization",
        default="none",
        choices=NORMALIZATIONS,
        help="the CNNs' input normalization, inside the networks (standardize: per image)",
    )
    parser.add_argument(
        "--acquisition-shift",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="augment CNN training with site differences: blur/sharpening, gamma, noise, "
        "JPEG recompression, resampling",
    )
    parser.add_argument(
        "--tta",
        default="none",
        choices=TTA_MODES,
        help="test-time augmentation of the CNNs (flip: mean over the image and its mirror)",
    )
    parser.add_argument(
        "--binary-score",
        default="combined",
        choices=BINARY_SCORES,
        help="p_pneumonia: combined (mean of the binary network's and the three-class "
        "network's 1 - p_normal) or network (the binary network's)",
    )
    parser.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="temperature-scale both CNNs on validation",
    )
    parser.add_argument("--anomaly-k", type=int, default=5)
    parser.add_argument(
        "--binary-threshold",
        default="sensitivity",
        choices=["sensitivity", "youden"],
        help="how the binary threshold is chosen on validation",
    )
    parser.add_argument("--target-sensitivity", type=float, default=0.95)
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else embedded Ray)",
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    config = TrainConfig(
        data=args.data,
        output=args.output,
        image_size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        limit=args.limit,
        val_fraction=args.val_fraction,
        seed=args.seed,
        num_workers=args.num_workers,
        use_gpu=args.use_gpu,
        precision=args.precision,
        cpus_per_worker=args.cpus_per_worker,
        storage_path=args.storage_path,
        max_failures=args.max_failures,
        knn_k=args.knn_k,
        knn_features=args.knn_features,
        anomaly_percentile=args.anomaly_percentile,
        anomaly_score=args.anomaly_score,
        anomaly_k=args.anomaly_k,
        binary_threshold=args.binary_threshold,
        target_sensitivity=args.target_sensitivity,
        architecture=args.architecture,
        pretrained=args.pretrained,
        normalization=args.normalization,
        acquisition_shift=args.acquisition_shift,
        tta=args.tta,
        binary_score=args.binary_score,
        calibrate=args.calibrate,
        autoencoder_masking=args.autoencoder_masking,
    )
    for name in ("binary", "multiclass", "autoencoder"):
        network = config.network(name)
        if name == "multiclass" and args.multiclass_patience is not None:
            network.early_stopping_patience = args.multiclass_patience or None
        if args.lr_schedule is not None:
            network.lr_schedule = args.lr_schedule
        if args.weight_decay is not None and name != "autoencoder":
            network.weight_decay = args.weight_decay
        if getattr(args, f"{name}_epochs") is not None:
            network.epochs = getattr(args, f"{name}_epochs")
        if getattr(args, f"lr_{name}") is not None:
            network.lr = getattr(args, f"lr_{name}")
    return config


def main(args: argparse.Namespace) -> None:
    config = config_from_args(args)
    init_ray(args.address)
    run_training(config)


if __name__ == "__main__":
    try:
        main(parse_args())
    except USER_ERRORS as exc:
        sys.exit(f"train.py: error: {exc}")
