"""Kermany chest X-ray filenames -> label and patient id; patient-level splits.

The Kaggle layout is ``{train,val,test}/{NORMAL,PNEUMONIA}/<file>``. The class folder says
normal vs pneumonia; for pneumonia the filename says bacterial vs viral
(``person12_bacteria_47.jpeg``, ``person3_virus_16.jpeg``). The patient id is the filename's
prefix: ``personN``, ``IM-NNNN`` or ``NORMAL2-IM-NNNN``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Label vocabularies, in the order of the models' outputs.
BINARY_LABELS: tuple[str, ...] = ("normal", "pneumonia")
CLASS_LABELS: tuple[str, ...] = ("normal", "bacterial", "viral")

SPLITS = ("train", "val", "test")
CLASS_DIRS = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

_PATIENT_PATTERNS = (
    re.compile(r"^(person\d+)_", re.IGNORECASE),
    re.compile(r"^(NORMAL2-IM-\d+)", re.IGNORECASE),
    re.compile(r"^(IM-\d+)", re.IGNORECASE),
)


class LabelError(ValueError):
    """A file in a labelled store whose name or place does not give a label."""


@dataclass(frozen=True)
class LabelledImage:
    """One image of a labelled store: where it is and what it shows."""

    uri: str
    split: str  # train | val | test, as laid out in the store
    label: str  # one of CLASS_LABELS
    patient_id: str
    size: int  # bytes, from the listing; part of the training-data fingerprint
    mtime_ns: int | None = None  # modification time, from the listing; in the fingerprint too

    @property
    def is_pneumonia(self) -> bool:
        return self.label != "normal"


def class_label(class_dir: str, filename: str) -> str:
    """Three-class label of a file from its class folder and name."""
    folder = class_dir.upper()
    if folder == "NORMAL":
        return "normal"
    if folder != "PNEUMONIA":
        raise LabelError(f"{filename}: class folder {class_dir!r} is neither NORMAL nor PNEUMONIA")
    name = filename.lower()
    has_bacteria, has_virus = "bacteria" in name, "virus" in name
    if has_bacteria == has_virus:
        raise LabelError(
            f"{filename}: a PNEUMONIA file must name exactly one of 'bacteria' or 'virus' "
            "(like person12_bacteria_47.jpeg or person3_virus_16.jpeg)"
        )
    return "bacterial" if has_bacteria else "viral"


def patient_id(filename: str) -> str:
    """Patient id from a Kermany filename: ``personN``, ``IM-NNNN`` or ``NORMAL2-IM-NNNN``."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(filename)
        if match:
            return match.group(1)
    raise LabelError(
        f"{filename}: no patient id in the name (expected personN_..., IM-NNNN-... "
        "or NORMAL2-IM-NNNN-...)"
    )


def binary_label(label: str) -> str:
    """Collapse a three-class label to normal / pneumonia."""
    return "normal" if label == "normal" else "pneumonia"


def label_from_path(uri: str, split: str, size: int, mtime_ns: int | None = None) -> LabelledImage:
    """Label one image from its URI, whose last two parts are ``<CLASS>/<file>``."""
    parts = uri.rstrip("/").split("/")
    if len(parts) < 2:
        raise LabelError(f"{uri}: expected <split>/<NORMAL|PNEUMONIA>/<file>")
    class_dir, filename = parts[-2], parts[-1]
    return LabelledImage(
        uri=uri,
        split=split,
        label=class_label(class_dir, filename),
        patient_id=patient_id(filename),
        size=size,
        mtime_ns=mtime_ns,
    )


def patients_by_uri(images: Iterable[LabelledImage]) -> dict[str, str]:
    """Image URI -> patient id: what groups a patient-level bootstrap."""
    return {image.uri: image.patient_id for image in images}


def _patients_by_label(images: Sequence[LabelledImage]) -> dict[str, list[str]]:
    """Patient ids by each patient's majority label, in sorted order: what a seeded shuffle
    starts from, so a split depends on the seed and the data only, not on listing order."""
    by_patient: dict[str, list[str]] = {}
    for image in images:
        by_patient.setdefault(image.patient_id, []).append(image.label)
    by_label: dict[str, list[str]] = {}
    for pid in sorted(by_patient):
        labels = by_patient[pid]
        # sorted(): ties (one bacterial, one viral image) must not depend on str hashing.
        majority = max(sorted(set(labels)), key=labels.count)
        by_label.setdefault(majority, []).append(pid)
    return by_label


def split_by_patient(
    images: Sequence[LabelledImage], val_fraction: float, seed: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Split images into (train, val) so that no patient is on both sides.

    Patients are shuffled with ``seed`` within each label so that validation keeps roughly the
    class mix of train; a patient's images all follow the patient.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_label = _patients_by_label(images)
    rng = random.Random(seed)
    val_patients: set[str] = set()
    for label in sorted(by_label):
        pids = by_label[label]
        rng.shuffle(pids)
        val_patients.update(pids[: round(len(pids) * val_fraction)])
    train = [image for image in images if image.patient_id not in val_patients]
    val = [image for image in images if image.patient_id in val_patients]
    return train, val


def patient_folds(images: Sequence[LabelledImage], folds: int, seed: int) -> list[int]:
    """A fold index per image: patients shuffled within their majority label (seeded) and dealt
    round-robin, so each fold keeps the class mix and a patient's images stay together."""
    rng, fold_of, turn = random.Random(seed), {}, 0
    by_label = _patients_by_label(images)
    for label in sorted(by_label):
        pids = by_label[label]
        rng.shuffle(pids)
        for pid in pids:
            fold_of[pid], turn = turn % folds, turn + 1
    return [fold_of[image.patient_id] for image in images]


def limit_per_class(
    images: Iterable[LabelledImage], limit: int | None, seed: int
) -> list[LabelledImage]:
    """Keep at most ``limit`` images of each class, drawn with ``seed`` (for smoke runs)."""
    images = list(images)
    if limit is None:
        return images
    rng = random.Random(seed)
    kept: list[LabelledImage] = []
    for label in CLASS_LABELS:
        of_label = sorted((i for i in images if i.label == label), key=lambda i: i.uri)
        rng.shuffle(of_label)
        kept.extend(of_label[:limit])
    return sorted(kept, key=lambda i: i.uri)
