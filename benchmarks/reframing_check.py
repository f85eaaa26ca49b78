"""Would a learned re-framing make the input framing-independent (issue 31, point 3)?

    python benchmarks/reframing_check.py [--store ../shared/data/chest_xray] [--images 2000]
        [--epochs 40] [--seed 0] [--json PATH]

``pneumo_ray.models.reframing`` learns, with no labels, where a typical training film's frame
lies in a film. This trains it on the training images of 80% of a seeded draw's patients, then
on the other 20% measures what the counterfactual check's framing edits (``edits.crop`` and
``edits.pad``: the same pixels the check feeds the networks) do to the box: the box predicted
on the edited film, mapped back to the film's coordinates, against the box predicted on the
film as taken. IoU 1 is a framing-independent input. Beside it, on the same films: no
re-framing (the edited film's own frame: 0.64 for a crop to 80%) and the body box of
``benchmarks/thorax_box.py`` (the largest bright region, crop edits only).

Also printed: the predicted frame's area (a film framed as the store typically frames it is
1.0; tighter films get a box larger than themselves), by class, on the held-out films: if the
classes are framed differently in the training store, this shows by how much.

Only training images are read (no validation or test images, no network of a bundle): this
runs before any training it would decide.

With ``--model BUNDLE`` the re-framing network is fitted on a draw of the bundle's own
training split instead, the box is measured on its validation images, and the counterfactual
check (``models.counterfactual``, ``--per-class`` validation images of each class) runs twice
on the bundle's networks as trained: on the films as they are, and with every film (edited or
not) re-framed before the networks. No network of the bundle is retrained, so this says what
the input step alone does to the framing shortcut; the validation figures at the bundle's
threshold (both ways) say what it costs.

    python benchmarks/reframing_check.py --model BUNDLE [--per-class 60]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

from pneumo_ray.io import edits  # noqa: E402
from pneumo_ray.io.data import list_store, load_image  # noqa: E402
from pneumo_ray.io.images import ImageDecodeError  # noqa: E402

SIZE = 224  # the films as the networks get them
CROPS = (0.9, 0.8, 0.7)  # the check's framing edits
PADS = (0.9, 0.8)
HELD_OUT = 0.2  # of the drawn patients, for the measure


def edit_windows(kind: str, fraction: float, side: int = SIZE) -> np.ndarray:
    """The edited film as a window of the film ((left, top, right, bottom) in the film's
    coordinates), with the edit's own rounding to whole pixels."""
    inner = max(2, round(fraction * side))
    start = (side - inner) // 2
    if kind == "crop":
        lo, hi = start / side, (start + inner) / side
    else:  # pad: the film shrunk to inner pixels, starting at start
        lo, hi = -start / inner, (side - start) / inner
    return np.array([[lo, lo, hi, hi]])


def body_boxes(films: np.ndarray) -> np.ndarray:
    """thorax_box.py's body box of each film, (left, top, right, bottom); NaN where none."""
    path = Path(__file__).with_name("thorax_box.py")
    spec = importlib.util.spec_from_file_location("thorax_box", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = np.full((len(films), 4), np.nan)
    for i, film in enumerate(films):
        box = module.body_box(film)  # (top, left, bottom, right)
        if box is not None:
            out[i] = box[1], box[0], box[3], box[2]
    return out


def cell(s: dict | None) -> str:
    return f"{s['median']:.2f} [{s['p10']:.2f}-{s['p90']:.2f}]" if s else "-"


def summary_of(iou: np.ndarray) -> dict:
    iou = np.nan_to_num(iou, nan=0.0)  # no box found: no overlap
    return {
        "median": float(np.median(iou)),
        "p10": float(np.percentile(iou, 10)),
        "p90": float(np.percentile(iou, 90)),
    }


def draw(store: str, images: int, seed: int):
    """A seeded draw of training images, split by patient into fit and held-out films."""
    train = sorted((i for i in list_store(store) if i.split == "train"), key=lambda i: i.uri)
    drawn = random.Random(seed).sample(train, min(images, len(train)))
    patients = sorted({i.patient_id for i in drawn})
    held = set(random.Random(seed + 1).sample(patients, round(HELD_OUT * len(patients))))
    fit, held_out = [], []
    for image in drawn:
        try:
            pixels = load_image(image.uri, SIZE)
        except ImageDecodeError:
            continue
        (held_out if image.patient_id in held else fit).append((image, pixels))
    return fit, held_out


def bundle_draw(bundle, images: int, per_class: int, seed: int):
    """Fit films from the bundle's training split; its validation images (``per_class`` of
    each class) to measure on."""
    from pneumo_ray.io.labels import CLASS_LABELS
    from pneumo_ray.models.counterfactual import select_validation
    from pneumo_ray.training.evaluation import training_split

    train, validation = training_split(bundle.card)
    fit = []
    for image in random.Random(seed).sample(train, min(images, len(train))):
        try:
            fit.append((image, load_image(image.uri, bundle.image_size)))
        except ImageDecodeError:  # training skipped it too
            continue
    labels = np.array([CLASS_LABELS.index(image.label) for image in validation])
    keep = select_validation(labels, per_class, seed)
    held_out = [(validation[i], load_image(validation[i].uri, bundle.image_size)) for i in keep]
    return fit, held_out, labels[keep]


def check_both_ways(bundle, net, films: np.ndarray, label_index: np.ndarray, seed: int) -> dict:
    """The counterfactual check's rows on the films as they are and re-framed, and the
    validation figures at the bundle's threshold both ways."""
    from sklearn.metrics import roc_auc_score

    from pneumo_ray.io.labels import CLASS_LABELS
    from pneumo_ray.models import reframing
    from pneumo_ray.models.counterfactual import cnn_calls, counterfactual_rows

    def reframed(x):
        return reframing.apply_reframing(net, x)

    out = {"validation": {}, "edits": {}}
    is_pneumonia = label_index != CLASS_LABELS.index("normal")
    for way, prepare in (("as taken", None), ("re-framed", reframed)):
        calls = cnn_calls(bundle, films if prepare is None else prepare(films))
        out["validation"][way] = {
            "roc_auc": float(roc_auc_score(is_pneumonia, calls["p_pneumonia"])),
            "sensitivity": float(calls["pneumonia"][is_pneumonia].mean()),
            "specificity": float(1.0 - calls["pneumonia"][~is_pneumonia].mean()),
            "three_class_accuracy": float((calls["class"] == label_index).mean()),
        }
        rows = counterfactual_rows(
            bundle, films, label_index, seed=seed, prepare=prepare, base=calls
        )
        for row in rows:
            key = f"{row['edit']} | {row['label']}"
            out["edits"].setdefault(key, {})[way] = row
    print(f"\nvalidation, {len(films)} images, at the bundle's threshold:")
    for way, figures in out["validation"].items():
        print(f"  {way:<10} " + "  ".join(f"{k} {v:.3f}" for k, v in figures.items()))
    print(f"\n{'edit | class':<34} {'calls moved':>22} {'median |shift|':>22}")
    print(f"{'':<34} {'as taken':>10} {'re-framed':>11} {'as taken':>10} {'re-framed':>11}")
    for key, ways in out["edits"].items():
        a, b = ways["as taken"], ways["re-framed"]
        print(f"{key:<34} {a['binary_flips']:>10.1%} {b['binary_flips']:>11.1%} "
              f"{a['median_abs_shift']:>10.3f} {b['median_abs_shift']:>11.3f}")  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> dict:
    from pneumo_ray.models import reframing
    from pneumo_ray.training.finetune import one_thread

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--store", default=str(Path(__file__).resolve().parents[2] / "shared/data/chest_xray")
    )
    parser.add_argument("--images", type=int, default=2000, help="training images drawn")
    parser.add_argument("--epochs", type=int, default=40, help="re-framing network epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument(
        "--model",
        default=None,
        help="a bundle: its training split and "
        "validation images, and its networks' counterfactual check both ways",
    )
    parser.add_argument(
        "--per-class",
        type=int,
        default=60,
        help="--model: validation images of each class (default 60)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    bundle = label_index = None
    if args.model:
        from pneumo_ray.models.bundle import load_bundle

        bundle = load_bundle(args.model)
        fit, held_out, label_index = bundle_draw(bundle, args.images, args.per_class, args.seed)
    else:
        fit, held_out = draw(args.store, args.images, args.seed)
    films = np.stack([pixels for _, pixels in held_out])
    is_normal = np.array([image.label == "normal" for image, _ in held_out])
    print(f"{len(fit)} training films to fit, {len(held_out)} held-out films of other patients "
          f"({is_normal.sum()} normal); decoded in {time.perf_counter() - started:.0f}s",
          flush=True)  # fmt: skip
    with one_thread():
        net = reframing.train_reframer(
            np.stack([pixels for _, pixels in fit]), epochs=args.epochs, seed=args.seed,
            log=lambda line: print("  " + line, flush=True),
        )  # fmt: skip
        taken = reframing.predict_frames(net, films)
        print(f"trained in {time.perf_counter() - started:.0f}s", flush=True)
        areas = (taken[:, 2] - taken[:, 0]) * (taken[:, 3] - taken[:, 1])
        summary = {
            "fit_films": len(fit),
            "held_out_films": len(held_out),
            "frame_area": {
                "normal": float(np.median(areas[is_normal])),
                "pneumonia": float(np.median(areas[~is_normal])),
            },
            "edits": {},
        }
        bodies = body_boxes(films)
        rows = [("crop", f) for f in CROPS] + [("pad", f) for f in PADS]
        print(f"\n{'edit':<9} {'IoU with the film as taken, median [p10-p90]':>62}")
        print(f"{'':<9} {'no re-framing':>20} {'body box':>20} {'learned re-framing':>20}")
        for kind, fraction in rows:
            window = edit_windows(kind, fraction, films.shape[-1])
            windows = np.repeat(window, len(films), axis=0)
            edited = edits.crop(films, fraction) if kind == "crop" else edits.pad(films, fraction)
            whole = np.tile([0.0, 0.0, 1.0, 1.0], (len(films), 1))
            learned = reframing.in_film(reframing.predict_frames(net, edited), windows)
            row = {
                "none": summary_of(reframing.box_iou(whole, windows)),
                "learned": summary_of(reframing.box_iou(taken, learned)),
            }
            if kind == "crop":
                body = reframing.in_film(body_boxes(edited), windows)
                row["body"] = summary_of(reframing.box_iou(bodies, body))
            summary["edits"][f"{kind} {fraction}"] = row

            cells = [cell(row.get(name)) for name in ("none", "body", "learned")]
            print(f"{kind} {fraction:<4} " + " ".join(f"{c:>20}" for c in cells), flush=True)
    print(f"\npredicted frame area (1.0: framed as the store typically frames), median: normal "
          f"{summary['frame_area']['normal']:.2f}, pneumonia "
          f"{summary['frame_area']['pneumonia']:.2f}")  # fmt: skip
    if bundle is not None:
        summary["check"] = check_both_ways(bundle, net, films, label_index, args.seed)
    print(f"{time.perf_counter() - started:.0f}s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
