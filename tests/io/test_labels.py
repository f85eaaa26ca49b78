from __future__ import annotations

from collections import Counter

import pytest

from pneumo_ray.io.labels import (
    LabelError,
    LabelledImage,
    class_label,
    label_from_path,
    limit_per_class,
    patient_folds,
    patient_id,
    split_by_patient,
)
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("folder", "filename", "label", "patient"),
    [
        ("PNEUMONIA", "person12_bacteria_47.jpeg", "bacterial", "person12"),
        ("PNEUMONIA", "person3_virus_16.jpeg", "viral", "person3"),
        ("NORMAL", "IM-0115-0001.jpeg", "normal", "IM-0115"),
        ("NORMAL", "IM-0437-0001-0002.jpeg", "normal", "IM-0437"),
        ("NORMAL", "NORMAL2-IM-0381-0001.jpeg", "normal", "NORMAL2-IM-0381"),
        ("pneumonia", "PERSON7_BACTERIA_1.JPEG", "bacterial", "PERSON7"),
    ],
)
def test_label_and_patient_from_kermany_names(folder, filename, label, patient):
    assert class_label(folder, filename) == label
    assert patient_id(filename) == patient


def test_pneumonia_file_without_kind_is_an_error_naming_the_file():
    with pytest.raises(LabelError, match="person5_unknown_3.jpeg"):
        class_label("PNEUMONIA", "person5_unknown_3.jpeg")
    with pytest.raises(LabelError, match="bacteria.*virus"):
        class_label("PNEUMONIA", "person5_bacteria_virus_3.jpeg")


def test_unknown_patient_pattern_is_an_error():
    with pytest.raises(LabelError, match="scan_001.jpeg"):
        patient_id("scan_001.jpeg")


def test_label_from_path_uses_the_last_two_parts():
    image = label_from_path("s3://bucket/x/train/PNEUMONIA/person1_virus_2.jpeg", "train", 10)
    assert (image.label, image.patient_id, image.size) == ("viral", "person1", 10)
    assert image.is_pneumonia


def _images(patients: int, per_patient: int) -> list[LabelledImage]:
    out = []
    for p in range(patients):
        label = ("normal", "bacterial", "viral")[p % 3]
        for i in range(per_patient):
            out.append(LabelledImage(f"/d/train/X/{p}_{i}", "train", label, f"person{p}", 1))
    return out


def test_patient_split_keeps_each_patient_on_one_side_and_is_seeded():
    images = _images(patients=90, per_patient=3)
    train, val = split_by_patient(images, val_fraction=0.2, seed=7)
    assert not {i.patient_id for i in train} & {i.patient_id for i in val}
    assert len(train) + len(val) == len(images)
    assert abs(len({i.patient_id for i in val}) - 18) <= 3
    assert {i.label for i in val} == {"normal", "bacterial", "viral"}  # stratified
    again_train, again_val = split_by_patient(list(reversed(images)), 0.2, seed=7)
    assert sorted(i.uri for i in again_val) == sorted(i.uri for i in val)
    _, other_val = split_by_patient(images, 0.2, seed=8)
    assert sorted(i.uri for i in other_val) != sorted(i.uri for i in val)


def test_patient_split_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_patient(_images(3, 1), val_fraction=1.0, seed=0)


def test_limit_per_class():
    images = _images(patients=30, per_patient=2)
    kept = limit_per_class(images, 5, seed=0)
    assert len(kept) == 15
    assert all(sum(i.label == label for i in kept) == 5 for label in ("normal", "viral"))
    assert limit_per_class(images, None, seed=0) == images


def test_patient_split_does_not_depend_on_string_hashing():
    # A patient with one bacterial and one viral image ties on the majority label; the
    # tie-break must not follow set order, which changes with PYTHONHASHSEED.
    import subprocess
    import sys

    code = (
        "from pneumo_ray.io.labels import LabelledImage, split_by_patient\n"
        "images = [LabelledImage(f'/s/train/PNEUMONIA/person{p}_{k}_{i}.jpeg', 'train',"
        " 'bacterial' if k == 'bacteria' else 'viral', f'person{p}', 1)"
        " for p in range(60) for i, k in enumerate(('bacteria', 'virus')[p % 3 : p % 3 + 2])]\n"
        "print(sorted({i.patient_id for i in split_by_patient(images, 0.3, 0)[1]}))\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={"PYTHONHASHSEED": str(seed), "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in range(6)
    }
    assert len(outputs) == 1, outputs


def patients_of_each_label(patients_per_label: int = 30) -> list[LabelledImage]:
    """Patients of each label with one to three images each."""
    out = []
    for label, prefix in (("normal", "IM-"), ("bacterial", "person"), ("viral", "person")):
        for p in range(patients_per_label):
            pid = f"{prefix}{label}{p}"
            out += [LabelledImage(f"/s/{pid}_{i}", "test", label, pid, 1) for i in range(p % 3 + 1)]
    return out


@pytest.mark.parametrize("folds", [2, 5])
def test_patient_folds_keep_patients_together_and_the_class_mix(folds):
    listed = patients_of_each_label()
    fold = patient_folds(listed, folds, seed=0)
    by_patient: dict[str, set[int]] = {}
    for image, f in zip(listed, fold, strict=True):
        by_patient.setdefault(image.patient_id, set()).add(int(f))
    assert all(len(fs) == 1 for fs in by_patient.values())  # a patient in one fold
    for label in ("normal", "bacterial", "viral"):
        patients = Counter(
            next(iter(by_patient[i.patient_id])) for i in {x.patient_id: x for x in listed}.values()
            if i.label == label
        )  # fmt: skip
        assert set(patients) == set(range(folds))
        assert max(patients.values()) - min(patients.values()) <= 1
    assert patient_folds(listed, folds, seed=0) == fold
    assert patient_folds(listed, folds, seed=1) != fold
