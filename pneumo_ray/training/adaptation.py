"""Adapt a trained bundle to a site: re-choose its operating point on labelled images of that
site, without retraining a network.

    pneumo-adapt --model BUNDLE --data SITE_STORE [--split test] --output ADAPTED_BUNDLE

What is refitted on the site's images, with the rules the bundle was trained with:

- both CNNs' temperatures (the NLL on the site's images), then a logistic map of each binary
  score, ``sigmoid(a logit(p) + b)`` (Platt scaling, the NLL on the site's images): a
  temperature only scales the logits, and cannot lower scores that sit too high as a whole,
  which is how another site's normal images look to the networks (``--no-score-map``: the
  temperatures alone);
- the binary threshold (the training's rule: the highest threshold with sensitivity >= the
  target, or Youden's J);
- the anomaly score's normal reference: the site's normal images join it (``--normals add``:
  a coreset of their patches joins PatchCore's memory bank, or their latent codes the latent
  score's reference), so that a normal image of the site is measured against normal images of
  its own site, not only the training site's; ``--normals keep`` leaves it;
- the anomaly threshold: the same percentile of the site's normal images' scores, each scored
  against a reference that holds the other half of the site's normal patients, not its own
  (a reference holding an image would score it near zero);
- the KNN's reference set: the site's images join the training images (``--knn add``), so a
  site's query finds neighbours from its own site; ``--knn keep`` leaves it;
- the drift reference: the adapted bundle's outputs on the site's images, the baseline its
  nightly scoring is compared with.

Why: a bundle's thresholds and temperatures are chosen on validation images drawn from the
training store. The networks rank another site's images about as well (README Results: ROC AUC
0.968-0.977 on the Kaggle test split), but their scores sit elsewhere there, so the operating
point chosen on validation does not transfer (specificity 0.71-0.83 in three runs, ECE
0.11-0.14). Where the images come from is a property of the site; a few hundred of its
labelled images set it. ``benchmarks/site_adaptation.py`` measures what that gives, on patients
the adaptation did not see.

The networks and their weights are kept as they are. The adapted
bundle is written to a new location, with what was refitted and its previous values in the
card's ``site_adaptations``; the bundle it came from is left unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pneumo_ray.config import ValidationChoices
from pneumo_ray.errors import ConfigError, SiteError
from pneumo_ray.io import data, stores
from pneumo_ray.io.labels import CLASS_LABELS, LabelledImage, patient_folds
from pneumo_ray.models.bundle import (
    DRIFT_REFERENCE_FILE,
    Bundle,
    BundleError,
    load_bundle,
    write_bundle,
)
from pneumo_ray.models.knn import KnnReference, select_features
from pneumo_ray.models.predict import ActorPlan, plan_actors, run_models
from pneumo_ray.monitoring.drift import IMAGE_STATS, reference_table
from pneumo_ray.training import report
from pneumo_ray.training.evaluation import decode_images, log, split_images
from pneumo_ray.training.pipeline import calibrate, choose_binary_threshold

KNN_MODES = ("add", "keep")
NORMALS_MODES = ("add", "keep")
SCOPE_MODES = ("keep", "add")
MIN_SCOPE_IMAGES = 50  # a site's Gaussians need this many of its images
REFERENCED = ("patchcore", "latent")  # the anomaly scores that measure against normal images
FEW_IMAGES = 50  # per binary class: below this, the site's thresholds are rough (a warning)


@dataclass(frozen=True)
class SiteRules:
    """How the operating point is re-chosen: the rules the bundle was trained with, unless
    overridden."""

    binary_threshold: str = "sensitivity"  # or youden
    target_sensitivity: float = 0.95
    anomaly_percentile: float = 95.0
    calibrate: bool = True
    score_map: bool = True  # a logistic map of each binary score after the temperatures
    knn: str = "add"  # or keep
    normals: str = "add"  # or keep: the site's normal images join the anomaly reference
    scope: str = "keep"  # or add: the scope check also takes in images like the site's

    @classmethod
    def from_card(cls, card: dict, **overrides) -> SiteRules:
        """The training rules the card records, with the non-None ``overrides``."""
        config = card.get("training", {}).get("config", {})
        known = {
            "binary_threshold": config.get("binary_threshold"),
            "target_sensitivity": config.get("target_sensitivity"),
            "anomaly_percentile": config.get("anomaly_percentile"),
            "calibrate": config.get("calibrate"),
        }
        given = {k: v for k, v in overrides.items() if v is not None}
        settings = {k: v for k, v in {**known, **given}.items() if v is not None}
        rules = cls(**settings)
        rules.check()
        return rules

    def check(self) -> None:
        # the training's own checks of the rules it shares, with their flags' messages
        ValidationChoices(
            anomaly_percentile=self.anomaly_percentile,
            binary_threshold=self.binary_threshold,
            target_sensitivity=self.target_sensitivity,
        ).check()
        if self.knn not in KNN_MODES:
            raise ConfigError(f"--knn must be one of {KNN_MODES}, got {self.knn!r}")
        if self.normals not in NORMALS_MODES:
            raise ConfigError(f"--normals must be one of {NORMALS_MODES}, got {self.normals!r}")
        if self.scope not in SCOPE_MODES:
            raise ConfigError(f"--scope must be one of {SCOPE_MODES}, got {self.scope!r}")


def with_patch_distances(bundle: Bundle, outputs: dict[str, np.ndarray]) -> dict:
    """``outputs`` with PatchCore's patch distances to the bundle's memory bank, from the
    ``patch_features`` the networks gave with the bank unset (``patch_features_instead``);
    as they are for any other anomaly score."""
    if bundle.anomaly_score_kind != "patchcore":
        return outputs
    return {**outputs, "patch_distances": _patch_distances(bundle, outputs["patch_features"])}


def _patch_distances(bundle: Bundle, features: np.ndarray, memory=None) -> np.ndarray:
    import torch

    from pneumo_ray.models.patchcore import nearest_distances

    memory = memory or bundle.patch_memory
    patches = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    patches = patches.reshape(len(features), memory.grid * memory.grid, -1)
    return nearest_distances(patches, torch.from_numpy(memory.features)).numpy()


def _extended(bundle: Bundle, outputs: dict, rows: np.ndarray):
    """The bundle's normal reference (PatchCore's memory or the latent reference) with the
    images ``rows`` added."""
    if bundle.anomaly_score_kind == "patchcore":
        memory = bundle.patch_memory
        return memory.extended(
            outputs["patch_features"][rows].reshape(len(rows), memory.grid**2, -1)
        )
    return bundle.normal_reference.extended(
        [str(u) for u in outputs["image_uri"][rows]], outputs["ae_code"][rows]
    )


def _scores_against(bundle: Bundle, outputs: dict, rows: np.ndarray, reference) -> np.ndarray:
    """Anomaly scores of the images ``rows`` against ``reference`` (as ``_extended`` gives)."""
    from pneumo_ray.models.patchcore import reduce_patches

    if bundle.anomaly_score_kind == "patchcore":
        distances = _patch_distances(bundle, outputs["patch_features"][rows], reference)
        return reduce_patches(distances, reference.reduction)
    return reference.score(outputs["ae_code"][rows])


def check_site(labels: np.ndarray) -> Counter:
    """Per-class counts of the site's usable images; SiteError without normal or pneumonia
    images, a warning when either binary class has fewer than FEW_IMAGES."""
    counts = Counter(CLASS_LABELS[i] for i in labels)
    pneumonia = counts["bacterial"] + counts["viral"]
    if not counts["normal"] or not pneumonia:
        raise SiteError(
            "a site's operating point needs normal and pneumonia images; got "
            f"{counts['normal']} normal and {pneumonia} pneumonia"
        )
    if min(counts["normal"], pneumonia) < FEW_IMAGES:
        log(
            f"warning: {counts['normal']} normal and {pneumonia} pneumonia images: thresholds "
            f"set on fewer than {FEW_IMAGES} images of a class are rough"
        )
    return counts


def adapt(
    bundle: Bundle,
    outputs: dict[str, np.ndarray],
    images: list[LabelledImage],
    rules: SiteRules,
    source: dict,
) -> dict:
    """Re-choose ``bundle``'s operating point on a site's images, in place; returns the
    card's record of it.

    ``outputs``: the bundle's networks' raw outputs on the site's usable images, with
    image_uri, label_index and the image statistics (``run_models(..., bundle, ...)``), and
    for a PatchCore bundle its patch features, not distances (``patch_features_instead``);
    ``images``: the site's listed images (for file sizes); ``source``: where they came from
    (store, split, skipped images), for the record.
    """
    card, models = bundle.card, bundle.card["models"]
    labels = np.asarray(outputs["label_index"])
    counts = check_site(labels)
    if bundle.anomaly_score_kind == "patchcore" and "patch_features" not in outputs:
        raise ValueError(
            "a PatchCore bundle adapts from its patch features: run the networks with the "
            "memory bank unset (patch_features_instead)"
        )
    previous = {
        "model_version": bundle.model_version,
        "binary": _recorded(models["binary"],
                            ("threshold", "threshold_rule", "temperature", "validation", "site")),
        "multiclass": _recorded(models["multiclass"], ("temperature",)),
        "autoencoder": _recorded(models["autoencoder"], ("threshold", "threshold_rule")),
        "knn": {"reference_images": len(bundle.knn.uris)},
        "anomaly_reference": _reference_size(bundle),
        "calibration": card.get("calibration"),
        "monitoring_reference": card.get("monitoring", {}).get("reference"),
        "metrics": card.pop("metrics", None),  # the networks' test figures at the old point
    }  # fmt: skip
    previous = _recorded(previous, previous)

    calibrated, threshold, rule = set_operating_point(card, outputs, rules)
    is_pneumonia = labels > 0
    site_uris = [str(uri) for uri in outputs["image_uri"]]
    normal_rows = np.flatnonzero(~is_pneumonia)
    image_of = {image.uri: image for image in images}
    normals_note = _add_site_normals(bundle, outputs, normal_rows, image_of, rules)
    outputs = with_patch_distances(bundle, outputs)
    # Out of sample: each site normal scored against the reference without its own half.
    anomaly = bundle.anomaly_scores(outputs)
    added = normals_note.get("scores") is not None
    if added:
        anomaly[normal_rows] = normals_note.pop("scores")
    anomaly_threshold = report.percentile_threshold(
        anomaly[~is_pneumonia], rules.anomaly_percentile
    )

    models["autoencoder"]["threshold"] = anomaly_threshold
    models["autoencoder"]["threshold_rule"] = (
        f"{rules.anomaly_percentile:g}th percentile of the scores of the site's normal images"
        + (" (each scored without its half of the site's normal patients)" if added else "")
    )
    if rules.knn == "add":
        knn = bundle.knn
        kind = knn.feature_kind
        features = select_features(outputs["probs"], outputs["embedding"], kind)
        bundle.knn = KnnReference.fit(
            [*knn.uris.tolist(), *site_uris],
            [*knn.labels.tolist(), *np.asarray(CLASS_LABELS)[labels].tolist()],
            np.concatenate([knn.features, features]),
            knn.k,
            kind,
        )
        models["knn"]["reference_images"] = len(bundle.knn.uris)
        models["knn"]["site_reference_images"] = models["knn"].get(
            "site_reference_images", 0
        ) + len(site_uris)
    scope_rule = _widen_scope(bundle, outputs, rules)
    used = set(site_uris)
    sizes = {image.uri: image.size for image in images}
    finished = bundle.finish(outputs)  # with the new card: the adapted bundle's columns
    finished.update(anomaly_score=anomaly, is_anomaly=anomaly > anomaly_threshold)
    bundle.drift_reference = reference_table(
        outputs["image_uri"],
        finished,
        {name: outputs[name] for name in IMAGE_STATS},
        [sizes.get(uri, -1) for uri in site_uris],
    )
    card.setdefault("monitoring", {})["reference"] = (
        f"{DRIFT_REFERENCE_FILE}: the adapted bundle's outputs and image statistics on the "
        f"{len(site_uris)} images of the site (pneumo-adapt)"
    )
    record = {
        **source,
        "images": len(site_uris),
        "patients": len({image.patient_id for image in images if image.uri in used}),
        "class_counts": {label: counts.get(label, 0) for label in CLASS_LABELS},
        "fingerprint": data.fingerprint([i for i in images if i.uri in used])["sha256"],
        "rules": {
            "binary_threshold": rule["threshold_rule"],
            "calibration": calibrated["method"],
            "anomaly_threshold": models["autoencoder"]["threshold_rule"],
            "knn": "the site's images joined the reference images"
            if rules.knn == "add"
            else "unchanged (--knn keep)",
            "anomaly_reference": normals_note["rule"],
            "scope": scope_rule,
        },
        "adapted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "previous": previous,
    }
    card.setdefault("site_adaptations", []).append(record)
    return record


def set_operating_point(card: dict, outputs: dict[str, np.ndarray], rules: SiteRules):
    """The CNNs' part of ``adapt``, in ``card``: both temperatures (and score maps) fitted on
    the site's labelled ``outputs``, then the binary threshold by the training's rule.
    Returns the calibration, the threshold and its rule."""
    models = card["models"]
    binary_score = models["binary"].get("score", "network")
    calibrated = calibrate(
        outputs, rules.calibrate, binary_score, where="site", score_maps=rules.score_map
    )
    temperatures = calibrated["temperatures"]
    threshold, rule = choose_binary_threshold(
        outputs, temperatures, binary_score, rules.binary_threshold, rules.target_sensitivity,
        where="site", score_maps=calibrated.get("score_maps"),
    )  # fmt: skip
    card["calibration"] = calibrated
    binary = models["binary"]
    binary.pop("validation", None)
    binary.update({"temperature": temperatures["binary"], "threshold": threshold, **rule})
    models["multiclass"]["temperature"] = temperatures["multiclass"]
    return calibrated, threshold, rule


def _widen_scope(bundle: Bundle, outputs: dict, rules: SiteRules) -> str:
    """With ``--scope add``, the scope check also takes in images like the site's labelled
    films (in place); the rule, for the record."""
    if rules.scope == "keep" or bundle.scope_reference is None:
        return "unchanged" + (" (--scope keep)" if bundle.scope_reference is not None else
                              ": the bundle has no scope check")  # fmt: skip
    if "scope_features" not in outputs:
        raise ValueError("--scope add needs the scope features of the site's images")
    n = len(outputs["scope_features"])
    if n < MIN_SCOPE_IMAGES:
        log(f"--scope add: {n} images are too few for the site's Gaussians (needs "
            f"{MIN_SCOPE_IMAGES}); the scope check is unchanged")  # fmt: skip
        return f"unchanged: {n} site images (--scope add needs {MIN_SCOPE_IMAGES})"
    from pneumo_ray.models.scope import scope_features

    bundle.scope_reference = bundle.scope_reference.widened(scope_features(outputs))
    return (
        f"widened: Gaussians of the site's {n} images joined the training images' (in scope: "
        "near either)"
    )


def _recorded(entry: dict, keys) -> dict:
    """The ``keys`` of ``entry`` that hold a value (a card from an older bundle lacks some)."""
    return {key: entry[key] for key in keys if entry.get(key) is not None}


def _add_site_normals(
    bundle: Bundle, outputs: dict, normal_rows: np.ndarray, image_of: dict, rules: SiteRules
) -> dict:
    """Add the site's normal images to the anomaly score's normal reference (in place, with
    the card's counts); returns the rule and, when added, each normal's out-of-sample score:
    against the reference extended with the other half of the site's normal patients."""
    kind = bundle.anomaly_score_kind
    if kind not in REFERENCED:
        return {"rule": f"none: the {kind} score measures against no normal images"}
    if rules.normals == "keep":
        return {"rule": "unchanged (--normals keep)"}
    normals = [image_of[str(uri)] for uri in outputs["image_uri"][normal_rows]]
    halves = np.array(patient_folds(normals, 2, seed=0))
    if len(set(halves)) < 2:
        log("one normal patient at the site: its images cannot join the anomaly reference")
        return {"rule": "unchanged: one normal patient at the site (needs two or more)"}
    scores = np.empty(len(normal_rows), dtype=np.float32)
    for half in (0, 1):
        other = _extended(bundle, outputs, normal_rows[halves != half])
        scores[halves == half] = _scores_against(
            bundle, outputs, normal_rows[halves == half], other
        )
    extended = _extended(bundle, outputs, normal_rows)
    models = bundle.card["models"]
    if kind == "patchcore":
        added = len(extended.features) - len(bundle.patch_memory.features)
        bundle.patch_memory = extended
        # a copy: the extractor (its weights shared) may belong to another bundle too
        bundle.patchcore = copy.copy(bundle.patchcore).set_memory(extended.features)
        entry = models["patchcore"]
        entry["memory_patches"] = len(extended.features)
        entry["source_patches"] = extended.source_patches
        entry["site_memory_patches"] = entry.get("site_memory_patches", 0) + added
        rule = (
            f"a coreset of the patches of the site's {len(normal_rows)} normal images "
            f"({added} patches) joined PatchCore's memory bank"
        )
    else:
        bundle.normal_reference = extended
        reference = models["autoencoder"].get("normal_reference", {})
        reference["images"] = len(extended.uris)
        reference["site_images"] = reference.get("site_images", 0) + len(normal_rows)
        rule = (
            f"the latent codes of the site's {len(normal_rows)} normal images joined the reference"
        )
    return {"rule": rule + "; threshold from each normal scored without its half", "scores": scores}


def adapt_store(
    model: str,
    store: str,
    split: str,
    output: str,
    rules: dict | None = None,
    plan: ActorPlan | None = None,
    fine_tune: bool = False,
) -> dict:
    """Load a bundle, run its networks over one split of a site's labelled store, re-choose
    its operating point there (``adapt``) and write the adapted bundle to ``output``; returns
    the card as written. ``fine_tune``: first refit a three-class site head on the site's
    images (``finetune.fine_tune_site_head``), the operating point then set on its
    out-of-fold logits."""
    started = time.perf_counter()
    model, store, output = (stores.normalize(u) for u in (model, store, output))
    if output.rstrip("/") == model.rstrip("/"):
        raise BundleError(
            f"--output {output} is the bundle being adapted: write the adapted bundle elsewhere "
            "(the one it comes from stays as it was)"
        )
    bundle = load_bundle(model)
    site_rules = SiteRules.from_card(bundle.card, **(rules or {}))
    images = split_images(store, split)
    log(
        f"adapting bundle {bundle.model_version} to {len(images)} {split} images of {store} "
        f"at {bundle.image_size}x{bundle.image_size}"
    )
    decoded = decode_images(images, bundle.image_size)
    with patch_features_instead(bundle):
        outputs = run_models(decoded.dataset, bundle, plan or plan_actors(None, None))
    is_pneumonia = np.asarray(outputs["label_index"]) > 0
    finished = bundle.finish(with_patch_distances(bundle, outputs))
    before = _site_figures(finished, is_pneumonia)
    head = None
    if fine_tune:
        outputs, head = _fine_tune(bundle, outputs, images, decoded.dataset)
    record = adapt(
        bundle,
        outputs,
        images,
        site_rules,
        {
            "store": store,
            "split": split,
            "skipped_images": [{"image_uri": u, "error": e} for u, e in decoded.failed],
        },
    )
    if head is not None:
        bundle.card["models"]["multiclass"]["site_head"] = head
        record["rules"]["three_class_head"] = head["rule"]
    # The drift reference holds the adapted columns, with out-of-sample anomaly scores.
    after = _site_figures(bundle.drift_reference.to_pydict(), is_pneumonia)
    card = write_bundle(bundle, output)
    _print_summary(record, bundle, before, after)
    log(f"adapted bundle {card['model_version']} written to {output} in "
        f"{time.perf_counter() - started:.0f}s")  # fmt: skip
    return card


def _fine_tune(bundle: Bundle, outputs: dict, images: list[LabelledImage], dataset) -> tuple:
    """``finetune.fine_tune_site_head`` on the site's decoded images, in ``outputs``' rows."""
    from pneumo_ray.training.finetune import TRAIN_IMAGES_PER_CLASS, fine_tune_site_head

    started = time.perf_counter()
    uris = [str(uri) for uri in outputs["image_uri"]]
    pixels = {}
    for batch in dataset.select_columns(["image_uri", "image"]).iter_batches(batch_format="numpy"):
        pixels.update(zip((str(u) for u in batch["image_uri"]), batch["image"], strict=True))
    patient = {image.uri: image.patient_id for image in images}
    log(
        f"fine-tuning the three-class head on {len(uris)} site images and up to "
        f"{TRAIN_IMAGES_PER_CLASS} training images of each class"
    )
    outputs, head = fine_tune_site_head(
        bundle, outputs, np.stack([pixels[uri] for uri in uris]), [patient[u] for u in uris]
    )
    log(f"three-class site head fitted in {time.perf_counter() - started:.0f}s")
    return outputs, head


def _site_figures(columns: dict, is_pneumonia: np.ndarray) -> dict:
    """Sensitivity, specificity, ECE and the normals' anomaly flags of a bundle's columns."""
    from pneumo_ray.models.calibration import expected_calibration_error

    p = np.asarray(columns["p_pneumonia"], dtype=np.float64)
    called = np.asarray(columns["pred_binary"]) == "pneumonia"
    flagged = np.asarray(columns["is_anomaly"], dtype=bool)
    return {
        "sensitivity": float(np.mean(called[is_pneumonia])),
        "specificity": float(np.mean(~called[~is_pneumonia])),
        "ece": expected_calibration_error(p, is_pneumonia),
        "anomaly_specificity": float(np.mean(~flagged[~is_pneumonia])),
    }


@contextlib.contextmanager
def patch_features_instead(bundle: Bundle):
    """While inside, the bundle's PatchCore extractor gives patch features, not distances to
    its memory bank: adaptation measures them against banks it builds."""
    memory = bundle.patchcore.memory if bundle.patchcore is not None else None
    if bundle.patchcore is not None:
        bundle.patchcore.set_memory(None)
    try:
        yield bundle
    finally:
        if bundle.patchcore is not None and bundle.patchcore.memory is None:
            bundle.patchcore.set_memory(memory)


def _reference_size(bundle: Bundle) -> dict | None:
    """How many normal images or patches the anomaly score measures against."""
    if bundle.anomaly_score_kind == "patchcore":
        return {"memory_patches": len(bundle.patch_memory.features)}
    if bundle.anomaly_score_kind == "latent":
        return {"images": len(bundle.normal_reference.uris)}
    return None


def _print_summary(record: dict, bundle: Bundle, before: dict, after: dict) -> None:
    previous, models = record["previous"], bundle.card["models"]
    reference = _reference_size(bundle) or {}
    rows = [
        ("binary threshold", previous["binary"].get("threshold"), models["binary"]["threshold"]),
        ("binary temperature", previous["binary"].get("temperature"),
         models["binary"]["temperature"]),
        ("three-class temperature", previous["multiclass"].get("temperature"),
         models["multiclass"]["temperature"]),
        ("anomaly threshold", previous["autoencoder"].get("threshold"),
         models["autoencoder"]["threshold"]),
        ("KNN reference images", previous["knn"]["reference_images"],
         models["knn"]["reference_images"]),
        *[(f"anomaly reference {name.replace('_', ' ')}", size, reference.get(name))
          for name, size in previous.get("anomaly_reference", {}).items()],
        ("site sensitivity", before["sensitivity"], after["sensitivity"]),
        ("site specificity", before["specificity"], after["specificity"]),
        ("site ECE of p_pneumonia", before["ece"], after["ece"]),
        ("site normals not flagged anomalous", before["anomaly_specificity"],
         after["anomaly_specificity"]),
    ]  # fmt: skip
    counts = record["class_counts"]
    lines = [
        f"\nSite: {record['images']} images of {record['patients']} patients "
        f"({', '.join(f'{n} {label}' for label, n in counts.items())}). The site figures are "
        "on the images the operating point was set on (in-sample, but each normal's anomaly "
        "flag from a reference without its half of the normal patients):",
        f"{'':36s}{'before':>12s}{'adapted':>12s}",
    ]
    for name, old, new in rows:
        lines.append(f"{name:36s}{_fmt(old):>12s}{_fmt(new):>12s}")
    print("\n".join(lines), flush=True)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | np.integer):
        return str(value)
    return f"{value:.4f}"
