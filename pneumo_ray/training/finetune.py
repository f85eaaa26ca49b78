"""Site fine-tuning: retrain a CNN's head on a site's labelled images mixed with training images.

The head is what ``EmbeddingCNN`` puts after the backbone: the 128-unit embedding and the
output layer. The backbone stays as trained (its BatchNorm statistics too), so its pooled
features are computed once per image and view (``head_inputs``) and the head trains on those:
seconds on a CPU, where retraining blocks would take the training job's minutes per epoch.

Why the head: a re-chosen threshold or temperature moves the operating point but keeps the
order of the scores, so it cannot change ROC AUC or the three-class argmax. A head refitted
with a site's labels can (issue 32, point 4); ``benchmarks/site_adaptation.py --curve
--fine-tune`` measures whether it does, cross-fitted by patient (``cross_fitted_logits``).

Settings fixed before any site figure was seen (not chosen on the Kaggle test split):
start from the trained head, Adam at 3e-4 with weight decay 1e-4, 10 epochs in batches of 64,
dropout as in training; the site's images and the training images weigh half each in the
loss, and within each part the classes weigh inversely to their counts (as in training).
Each view of the flip TTA is a training example.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from pneumo_ray.errors import SiteError
from pneumo_ray.io.data import load_image
from pneumo_ray.io.images import ImageDecodeError, to_model_input
from pneumo_ray.io.labels import CLASS_LABELS
from pneumo_ray.models.outputs import CPU_CHUNK

TRAIN_IMAGES_PER_CLASS = 200  # the bundle's training images a site head also sees, per class
MIN_SITE_IMAGES = 100  # labelled site images below which pneumo-adapt does not fine-tune


@dataclass(frozen=True)
class FineTuneSettings:
    """How the head is refitted (the module docstring says why these values)."""

    epochs: int = 10
    lr: float = 3e-4
    weight_decay: float = 1e-4
    batch_size: int = 64
    site_share: float = 0.5  # of the loss, the rest being the training images'
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("fine-tuning needs at least one epoch and a batch of one")
        if not 0.0 < self.site_share <= 1.0:
            raise ValueError(f"site_share must be in (0, 1], got {self.site_share}")


def head_inputs(model: nn.Module, pixels: np.ndarray, tta: str = "none") -> np.ndarray:
    """The backbone's pooled features of each image and view: uint8 ``(N, S, S)`` ->
    float32 ``(N, V, D)``, V = 2 with the flip TTA (the image and its mirror image)."""
    model.eval()
    parts = []
    with torch.inference_mode():
        for chunk in to_model_input(pixels).split(CPU_CHUNK):  # (B, 1, S, S)
            views = [chunk, torch.flip(chunk, dims=(3,))] if tta == "flip" else [chunk]
            feats = [model.features(model.normalize(v)).flatten(1) for v in views]  # V x (B, D)
            parts.append(torch.stack(feats, dim=1))  # (B, V, D)
    return torch.cat(parts).numpy()


def head_logits(model: nn.Module, features: np.ndarray) -> np.ndarray:
    """The network's logits from ``head_inputs``: averaged over the views, as
    ``network_outputs`` averages them (``(N,)`` for one output, else ``(N, K)``)."""
    model.eval()
    with torch.inference_mode():
        f = torch.as_tensor(features)  # (N, V, D)
        logits = model.head(model.embed(f.flatten(0, 1)))  # (N * V, K)
        logits = logits.view(f.shape[0], f.shape[1], -1).mean(dim=1)  # (N, K)
    out = logits.numpy()
    return out[:, 0] if model.num_outputs == 1 else out


def example_weights(targets: np.ndarray, is_site: np.ndarray, site_share: float) -> np.ndarray:
    """A weight per example: the site's part and the training part of the loss weigh
    ``site_share`` and the rest; within each part, each class weighs the same in all."""
    weights = np.zeros(len(targets), dtype=np.float64)
    for part, share in ((True, site_share), (False, 1.0 - site_share)):
        in_part = is_site == part
        classes = np.unique(targets[in_part])
        for c in classes:
            rows = in_part & (targets == c)
            weights[rows] = share / len(classes) / rows.sum()
    return (weights / weights.sum() * len(targets)).astype(np.float32)


@contextlib.contextmanager
def one_thread():
    """Torch on one CPU thread for a while: the head's steps are small matrix products, which
    a second thread slows down when the cores are busy (0.46 s a step against 0.017 s on one
    thread, measured here beside a training job)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def fine_tune_head(
    model: nn.Module,
    site_features: np.ndarray,
    site_targets: np.ndarray,
    train_features: np.ndarray,
    train_targets: np.ndarray,
    settings: FineTuneSettings = FineTuneSettings(),
) -> nn.Module:
    """A copy of ``model`` whose embedding and output layers are refitted on the site's
    examples and the training examples (``head_inputs`` features, int class targets: 0/1
    for one output). The backbone and ``model`` itself are left as they were."""
    tuned = copy.deepcopy(model)
    features = np.concatenate([site_features, train_features])  # (N, V, D)
    targets = np.concatenate([site_targets, train_targets]).astype(np.int64)
    is_site = np.arange(len(targets)) < len(site_targets)
    weights = example_weights(targets, is_site, settings.site_share)
    views = features.shape[1]
    x = torch.as_tensor(features.reshape(-1, features.shape[2]))  # (N * V, D)
    y = torch.as_tensor(np.repeat(targets, views))
    w = torch.as_tensor(np.repeat(weights, views))
    params = [*tuned.embed.parameters(), *tuned.head.parameters()]
    optimizer = torch.optim.Adam(params, lr=settings.lr, weight_decay=settings.weight_decay)
    tuned.embed.train(), tuned.dropout.train(), tuned.head.train()
    with torch.random.fork_rng(), one_thread():  # seeded order and dropout
        torch.manual_seed(settings.seed)
        for _ in range(settings.epochs):
            for rows in torch.randperm(len(y)).split(settings.batch_size):
                logits = tuned.head(tuned.dropout(tuned.embed(x[rows])))  # (B, K)
                if tuned.num_outputs == 1:
                    loss = nn.functional.binary_cross_entropy_with_logits(
                        logits[:, 0], y[rows].float(), reduction="none"
                    )
                else:
                    loss = nn.functional.cross_entropy(logits, y[rows], reduction="none")
                optimizer.zero_grad()
                (loss * w[rows]).sum().div(w[rows].sum()).backward()
                optimizer.step()
    return tuned.eval()


def cross_fitted_logits(
    model: nn.Module,
    features: np.ndarray,
    labelled: np.ndarray,
    targets: np.ndarray,
    groups: np.ndarray,
    train_features: np.ndarray,
    train_targets: np.ndarray,
    settings: FineTuneSettings = FineTuneSettings(),
) -> np.ndarray:
    """Logits of every image from heads fine-tuned on the labelled images ``labelled`` (rows
    of ``features``, with ``targets``), no image's logits from a head that saw its group
    (patient): the labelled images are split in two by group; each half gets the logits of
    the head fitted on the other half (out-of-fold, for the operating point to be set on),
    and every other image the mean logits of the two heads."""
    labelled = np.asarray(labelled)
    patients = np.unique(groups[labelled])
    rng = np.random.default_rng(settings.seed)
    second = set(rng.permutation(patients)[: len(patients) // 2].tolist())
    fold = np.array([int(g in second) for g in groups[labelled]])
    logits = None
    unlabelled = np.setdiff1d(np.arange(len(features)), labelled)
    for f in (0, 1):
        fit, held = labelled[fold != f], labelled[fold == f]
        head = fine_tune_head(
            model, features[fit], targets[fold != f], train_features, train_targets, settings
        )
        out = head_logits(head, features)
        if logits is None:
            logits = np.zeros_like(out)
        logits[held] = out[held]
        logits[unlabelled] += out[unlabelled] / 2
    return logits


def training_examples(bundle, per_class: int = TRAIN_IMAGES_PER_CLASS, seed: int = 0):
    """A seeded draw of the bundle's training images (its card's split), ``per_class`` of each
    class, decoded at its size: uint8 ``(N, S, S)`` and their class indices. Images training
    skipped as unreadable are skipped; a training store that cannot be read is a SiteError."""
    import random

    from pneumo_ray.training.evaluation import training_split

    train = training_split(bundle.card)[0]
    rng, pixels, targets = random.Random(seed), [], []
    for index, label in enumerate(CLASS_LABELS):
        of_label = sorted((i for i in train if i.label == label), key=lambda i: i.uri)
        for image in rng.sample(of_label, min(per_class, len(of_label))):
            try:
                pixels.append(load_image(image.uri, bundle.image_size))
            except ImageDecodeError:  # training skipped it too
                continue
            except OSError as exc:
                raise SiteError(
                    f"fine-tuning mixes in the bundle's training images, and {image.uri} "
                    f"cannot be read ({exc}): run where the training store is readable"
                ) from exc
            targets.append(index)
    return np.stack(pixels), np.asarray(targets, dtype=np.int64)


def fine_tune_site_head(
    bundle,
    outputs: dict[str, np.ndarray],
    pixels: np.ndarray,
    groups: np.ndarray,
    settings: FineTuneSettings = FineTuneSettings(),
) -> tuple[dict[str, np.ndarray], dict]:
    """``pneumo-adapt --fine-tune``: a three-class site head (``models.cnn.SiteHead``) for
    ``bundle``, in place, refitted on the site's labelled images (``pixels`` in the rows of
    ``outputs``, ``groups`` their patients) and ``TRAIN_IMAGES_PER_CLASS`` training images of
    each class. Returns ``outputs`` with out-of-fold three-class logits (each image's from a
    head that did not see its patient: the operating point is then set on them) and the
    card's record. The KNN and the scope check keep the trained head (their references were
    built from it); the binary network is not touched: refitting its head did not help on
    run 10 (specificity 0.913 without it, 0.900 with it, at 200 labels).

    A SiteError below ``MIN_SITE_IMAGES`` labelled images or without every class."""
    from pneumo_ray.models.cnn import SiteHead

    labels = np.asarray(outputs["label_index"], dtype=np.int64)
    counts = {label: int((labels == k).sum()) for k, label in enumerate(CLASS_LABELS)}
    if len(labels) < MIN_SITE_IMAGES:
        raise SiteError(
            f"--fine-tune needs at least {MIN_SITE_IMAGES} labelled images of the site; got "
            f"{len(labels)} (without --fine-tune the operating point alone is re-chosen)"
        )
    if min(counts.values()) == 0:
        raise SiteError(
            f"--fine-tune refits the three-class head: every class is needed; got {counts}"
        )
    model = bundle.multiclass
    site_features = head_inputs(model, pixels, bundle.tta)
    train_pixels, train_targets = training_examples(bundle, seed=settings.seed)
    train_features = head_inputs(model, train_pixels, bundle.tta)
    rows = np.arange(len(labels))
    cross = cross_fitted_logits(
        model, site_features, rows, labels, np.asarray(groups), train_features, train_targets,
        settings,
    )  # fmt: skip
    tuned = fine_tune_head(model, site_features, labels, train_features, train_targets, settings)
    bundle.multiclass_site = SiteHead(tuned).eval()
    record = {
        "images": len(labels),
        "patients": len(set(np.asarray(groups).tolist())),
        "class_counts": counts,
        "training_images": len(train_targets),
        "settings": dataclasses.asdict(settings),
        "rule": "the three-class network's embedding and output layers refitted on the site's "
        "labelled images and the training images (half the loss each); the three-class "
        "columns come from it, the KNN and the scope check from the trained head; the "
        "operating point was set on out-of-fold logits (two folds by patient)",
    }
    return {**outputs, "multiclass_logits": cross.astype(np.float32)}, record
