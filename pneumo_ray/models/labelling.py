"""Which of a site's images to ask a radiologist to label (issue 32): the labelling list.

A site without labels gets its operating point from its unlabelled images
(``pneumo-adapt --unlabelled``); a few labels then set it far better, if they are the right
ones. The list is a labels manifest with empty label and patient_id columns: filled in, it goes
back to ``pneumo-adapt --data`` as it is. The adaptation job and a nightly scoring run that
finds its store drifting both write one.
"""

from __future__ import annotations

import numpy as np

LABELLING_RULES = ("random", "spread")
# The default, chosen on issue 32's learning curve (run 8's bundle, Kaggle test split as the
# site, 5 patient draws): a random draw gave the higher specificity at the sensitivity rule at
# 20, 50, 100 and 200 labels (0.900 against 0.797 at 50). ``spread`` spends half its labels
# near the threshold, which leaves the threshold and score map too few films far from it.
DEFAULT_LABELLING_RULE = "random"
LABELLING_COLUMNS = ("image_uri", "label", "patient_id", "p_pneumonia", "why")


def select_for_labelling(
    p: np.ndarray, threshold: float, n: int, rule: str = DEFAULT_LABELLING_RULE, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """Which ``n`` images to ask labels for, and why each.

    ``random`` (the default): a seeded random draw. ``spread``: half the images whose
    p_pneumonia is nearest the threshold (in logits: the calls a label would settle, and what
    sets the threshold), the other half at evenly spaced ranks of p_pneumonia over the rest
    (both classes and the whole score range, what a score map and a temperature are fitted
    on)."""
    from pneumo_ray.models.calibration import logit

    if rule not in LABELLING_RULES:
        raise ValueError(f"labelling rule must be one of {LABELLING_RULES}, got {rule!r}")
    p = np.asarray(p, dtype=np.float64)
    n = min(n, len(p))
    if rule == "random":
        chosen = np.sort(np.random.default_rng(seed).choice(len(p), n, replace=False))
        return chosen, ["random draw"] * n
    near = np.argsort(np.abs(logit(p) - logit(np.array([threshold]))[0]), kind="stable")
    near = near[: n // 2]
    rest = np.setdiff1d(np.arange(len(p)), near)
    ranked = rest[np.argsort(p[rest], kind="stable")]
    spread = ranked[np.unique(np.linspace(0, len(ranked) - 1, n - len(near)).round().astype(int))]
    chosen = np.concatenate([near, spread])
    why = ["near the threshold"] * len(near) + ["spread over the score range"] * len(spread)
    return chosen, why


def write_labelling_list(
    uri: str, uris: list[str], p: np.ndarray, threshold: float, n: int, rule: str, seed: int = 0
) -> int:
    """A labels manifest of the images to label, its label and patient_id columns empty: once
    filled in, ``pneumo-adapt --data`` takes it as it is. Returns its rows."""
    import csv
    import io

    from pneumo_ray.io import stores

    chosen, why = select_for_labelling(p, threshold, n, rule, seed)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(LABELLING_COLUMNS)
    for i, reason in zip(chosen, why, strict=True):
        writer.writerow([uris[i], "", "", f"{p[i]:.4f}", reason])
    stores.write_bytes(uri, text.getvalue().encode())
    return len(chosen)
