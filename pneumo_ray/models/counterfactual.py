"""The counterfactual robustness check (issue 31): does a bundle read the lungs or the framing?

    validation images -> each label-preserving edit of ``io.edits.CHECK_EDITS`` -> the two CNNs
        -> per edit and class: median shift of p_pneumonia, share of binary and three-class
           calls that change
    validation images -> Grad-CAM of both CNNs -> share of each map's mass in the outer band

An edit changes how a film is framed or annotated, never what the lungs show, so a call that
moves with it is a call the lungs did not make. No label takes part in the shifts (the class
only groups the rows), and only validation images are used: this is the measure training is
chosen on, not the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from pneumo_ray.io.edits import CHECK_EDITS, Edit
from pneumo_ray.io.images import to_model_input
from pneumo_ray.io.labels import CLASS_LABELS

BAND = 0.1  # the outer band of the Grad-CAM statistic, as a share of the side
CHUNK = 64  # images per pass through the networks (bounds the memory of a check)


def select_validation(label_index: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Indices of up to ``per_class`` images of each class, drawn with ``seed``, sorted."""
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(label_index == k))[:per_class]
        for k in range(len(CLASS_LABELS))
    ]
    return np.sort(np.concatenate(chosen)).astype(int)


def cnn_calls(bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """The bundle's p_pneumonia, binary call and three-class call for uint8 ``(B, S, S)``
    images, through its two CNNs with its TTA and temperatures (what scoring computes)."""
    import torch

    from pneumo_ray.models.outputs import network_outputs

    networks = {name: bundle.networks[name] for name in ("binary", "multiclass")}
    parts = []
    for start in range(0, len(images), CHUNK):
        x = to_model_input(images[start : start + CHUNK]).to(bundle.device)
        if bundle.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        parts.append(network_outputs(networks, x, bundle.tta, inpaint=False))
    raw = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
    calibrated = bundle.calibrated(raw)
    p = calibrated["p_pneumonia"]
    return {
        "p_pneumonia": p,
        "pneumonia": p >= bundle.binary_threshold,
        "class": calibrated["probs"].argmax(axis=1),
    }


def counterfactual_rows(
    bundle,
    images: np.ndarray,
    label_index: np.ndarray,
    edits: Sequence[Edit] = CHECK_EDITS,
    seed: int = 0,
    prepare: Callable[[np.ndarray], np.ndarray] | None = None,
    base: dict[str, np.ndarray] | None = None,
) -> list[dict]:
    """One row per edit and class present: how the bundle's calls on ``images`` move under
    the edit (``label_index`` only groups the rows). ``prepare``, if given, is applied to the
    films (edited or not) before the networks: an input step under test, such as a
    re-framing (``benchmarks/reframing_check.py``). ``base``: the calls on the unedited
    films (``cnn_calls`` of the prepared films), when the caller has them already."""
    prepare = prepare or (lambda films: films)
    if base is None:
        base = cnn_calls(bundle, prepare(images))
    rows = []
    for edit in edits:
        edited = cnn_calls(bundle, prepare(edit.apply(images, seed)))
        shift = edited["p_pneumonia"] - base["p_pneumonia"]
        for k, label in enumerate(CLASS_LABELS):
            keep = label_index == k
            if not keep.any():
                continue
            binary_flip = edited["pneumonia"][keep] != base["pneumonia"][keep]
            rows.append(
                {
                    "edit": edit.name,
                    "family": edit.family,
                    "label": label,
                    "images": int(keep.sum()),
                    "median_shift": float(np.median(shift[keep])),
                    "median_abs_shift": float(np.median(np.abs(shift[keep]))),
                    "binary_flips": float(binary_flip.mean()),
                    "to_pneumonia": float(
                        (edited["pneumonia"][keep] & ~base["pneumonia"][keep]).mean()
                    ),
                    "multiclass_flips": float(
                        (edited["class"][keep] != base["class"][keep]).mean()
                    ),
                }
            )
    return rows


def border_share(cams: np.ndarray, band: float = BAND) -> np.ndarray:
    """The share of each map's mass ``(B, S, S)`` in the outer ``band`` of the image (a map
    spread evenly gives 1 - (1 - 2 band)^2: 0.36 for a 10% band)."""
    side = cams.shape[-1]
    width = max(1, round(band * side))
    inner = cams[:, width:-width, width:-width].sum(axis=(1, 2))
    total = cams.sum(axis=(1, 2))
    return np.where(total > 0, 1.0 - inner / np.maximum(total, 1e-12), np.nan)


def cam_border_rows(bundle, images: np.ndarray, label_index: np.ndarray) -> list[dict]:
    """Per network and class: the mean and median share of Grad-CAM mass in the outer band
    (the binary network's pneumonia logit; the three-class network's predicted class)."""
    import torch

    from pneumo_ray.models.gradcam import grad_cam

    maps: dict[str, list[np.ndarray]] = {"binary": [], "multiclass": []}
    for start in range(0, len(images), CHUNK):
        x = to_model_input(images[start : start + CHUNK]).to(bundle.device)
        with torch.no_grad():  # not inference_mode: the target joins Grad-CAM's graph
            predicted = bundle.multiclass(x).argmax(dim=1)
        maps["binary"].append(grad_cam(bundle.binary, x))
        maps["multiclass"].append(grad_cam(bundle.multiclass, x, predicted))
    rows = []
    for network, parts in maps.items():
        shares = border_share(np.concatenate(parts))
        groups = [("all", np.ones(len(shares), dtype=bool))] + [
            (label, label_index == k) for k, label in enumerate(CLASS_LABELS)
        ]
        for label, keep in groups:
            if keep.any():
                rows.append(
                    {
                        "network": network,
                        "label": label,
                        "images": int(keep.sum()),
                        "mean_border_share": float(np.nanmean(shares[keep])),
                        "median_border_share": float(np.nanmedian(shares[keep])),
                    }
                )
    return rows


def summarize(rows: list[dict], cam_rows: list[dict]) -> dict:
    """The check's headline figures (issue 31's targets): the largest share of binary and of
    three-class calls any edit moves in any class, and which; the largest median |shift| of
    p_pneumonia under a framing edit; the Grad-CAM border shares over all images."""
    worst_binary = max(rows, key=lambda r: r["binary_flips"])
    worst_multiclass = max(rows, key=lambda r: r["multiclass_flips"])
    framing = [r for r in rows if r["family"] == "framing"]
    worst_shift = max(framing, key=lambda r: r["median_abs_shift"]) if framing else None
    return {
        "images": sum({r["label"]: r["images"] for r in rows}.values()),
        "max_binary_flips": worst_binary["binary_flips"],
        "max_binary_flips_at": f"{worst_binary['edit']} ({worst_binary['label']})",
        "max_multiclass_flips": worst_multiclass["multiclass_flips"],
        "max_multiclass_flips_at": f"{worst_multiclass['edit']} ({worst_multiclass['label']})",
        "framing_max_median_abs_shift": worst_shift["median_abs_shift"] if worst_shift else None,
        "framing_max_median_abs_shift_at": (
            f"{worst_shift['edit']} ({worst_shift['label']})" if worst_shift else None
        ),
        "cam_border_share": {
            r["network"]: r["mean_border_share"] for r in cam_rows if r["label"] == "all"
        },
        "band": BAND,
    }


def robustness_check(bundle, images: np.ndarray, label_index: np.ndarray, seed: int = 0) -> dict:
    """The whole check on validation images: {"edits": rows, "grad_cam": rows, "summary"}."""
    rows = counterfactual_rows(bundle, images, label_index, seed=seed)
    cam_rows = cam_border_rows(bundle, images, label_index)
    return {"edits": rows, "grad_cam": cam_rows, "summary": summarize(rows, cam_rows)}


def format_check(check: dict) -> str:
    """The check as text tables: one row per edit and class, then the Grad-CAM rows."""
    lines = [
        f"{'edit':<18} {'class':<10} {'images':>6} {'median shift':>13} "
        f"{'median |shift|':>15} {'binary flips':>13} {'to pneumonia':>13} "
        f"{'3-class flips':>14}"
    ]
    for r in check["edits"]:
        lines.append(
            f"{r['edit']:<18} {r['label']:<10} {r['images']:>6} {r['median_shift']:>+13.4f} "
            f"{r['median_abs_shift']:>15.4f} {r['binary_flips']:>13.1%} "
            f"{r['to_pneumonia']:>13.1%} {r['multiclass_flips']:>14.1%}"
        )
    lines.append("")
    lines.append(
        f"{'Grad-CAM':<18} {'class':<10} {'images':>6} "
        f"{'mass in the outer ' + format(BAND, '.0%') + ' band: mean':>36} {'median':>8}"
    )
    for r in check["grad_cam"]:
        lines.append(
            f"{r['network']:<18} {r['label']:<10} {r['images']:>6} "
            f"{r['mean_border_share']:>36.3f} {r['median_border_share']:>8.3f}"
        )
    s = check["summary"]
    lines.append("")
    lines.append(
        f"largest share of calls moved by an edit: binary {s['max_binary_flips']:.1%} "
        f"({s['max_binary_flips_at']}), three-class {s['max_multiclass_flips']:.1%} "
        f"({s['max_multiclass_flips_at']})"
    )
    if s["framing_max_median_abs_shift"] is not None:
        lines.append(
            f"largest median |shift| of p_pneumonia under framing: "
            f"{s['framing_max_median_abs_shift']:.4f} ({s['framing_max_median_abs_shift_at']})"
        )
    return "\n".join(lines)
