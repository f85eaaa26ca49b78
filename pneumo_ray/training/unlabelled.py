"""Adapt a bundle to a site from the site's own unlabelled images (issue 32): a hospital's
first nights, before anyone has labelled a film.

    pneumo-adapt --model BUNDLE --unlabelled SITE_IMAGES [--max-images 2000] --output ADAPTED

Two steps, each taken only when the site's images say it is needed:

1. **BatchNorm statistics (AdaBN; Li et al. 2016)**, when the site's *images* differ from the
   bundle's validation images: the drift rule of the nightly report (PSI and chi-square) over
   the image statistics (mean intensity, contrast, sharpness, file size) against the bundle's
   drift reference. Then the running mean and variance of every BatchNorm layer that trained
   are re-estimated on the site's images (one cumulative pass, as training re-estimates them
   after each epoch); the frozen stem and early blocks of a fine-tuned EfficientNet-Lite keep
   their ImageNet statistics, which never came from the training site either; weights, biases
   and every other parameter stay as trained. A store of the training site's own films does not
   fire the rule, so its networks stay as they were (the probe of issue 32 lost 0.014 of
   specificity there by adapting regardless). The image statistics, not the outputs, gate this
   step: a site with more normal children moves the outputs, and re-estimating BatchNorm on a
   different mix of classes is a known way to hurt it.
2. **The class balance (Saerens, Latinne and Decaestecker 2002)**: the site's share of each
   class is estimated by EM on the calibrated posteriors of its images, and the probabilities
   move from the training prior to the site's (for p_pneumonia, and for the three-class
   probabilities with their normal share from it and bacterial and viral in the training
   proportion), when the estimate differs from the training prior by more than
   sampling noise (3 standard errors of a share over this many images). The binary threshold
   stays where the card has it: it is a cut-off on the posterior probability, which now
   answers for the site's mix of children.

The adapted bundle is a new bundle (its own model_version); the drift reference becomes its
outputs on the site's images, the baseline its nightly runs are compared with; the card's
``site_adaptations`` records what was estimated, on which images (count and fingerprint), and
the values before. Labels, when a site has some, adapt this bundle further (``pneumo-adapt
--data``): their temperatures and score maps replace the estimated class balance.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable

import numpy as np

from pneumo_ray.errors import SiteError
from pneumo_ray.io.labels import BINARY_LABELS, CLASS_LABELS
from pneumo_ray.models.bundle import DRIFT_REFERENCE_FILE, Bundle
from pneumo_ray.models.calibration import (
    PRIOR_RANGE,
    beyond_noise,
    clamped,
    em_class_prior,
    training_class_prior,
)
from pneumo_ray.models.labelling import DEFAULT_LABELLING_RULE, write_labelling_list
from pneumo_ray.monitoring.drift import IMAGE_STATS, drift_between, reference_table
from pneumo_ray.training.evaluation import log

MIN_IMAGES = 20  # fewer: an error (BatchNorm statistics and a class balance need a sample)
FEW_IMAGES = 200  # fewer: a warning (both estimates are rough)
SHIFT_STATISTICS = (*IMAGE_STATS, "image_kib")  # what gates the BatchNorm step
CNNS = ("binary", "multiclass")

NetworksRun = Callable[[Bundle], dict[str, np.ndarray]]
"""Runs a bundle's networks over the site's images: raw outputs, IMAGE_STATS and image_uri."""


# --- the class balance ------------------------------------------------------------------------


def estimate_class_prior(bundle: Bundle, raw: dict[str, np.ndarray]) -> dict:
    """The site's class balance from the bundle's calibrated posteriors on its images (no class
    prior of an earlier adaptation in them), with whether each moves past sampling noise."""
    card_prior = bundle.card.get("calibration", {}).pop("class_prior", None)
    try:
        calibrated = bundle.calibrated(raw)
    finally:
        if card_prior is not None:
            bundle.card["calibration"]["class_prior"] = card_prior
    trained = training_class_prior(bundle.card)
    n = len(calibrated["p_pneumonia"])
    p = calibrated["p_pneumonia"]
    pairs = np.stack([1 - p, p], axis=1)
    estimated = em_class_prior(pairs, [1 - trained["binary"], trained["binary"]])
    binary_site, one_class = clamped(estimated)
    if one_class:
        log(
            f"warning: the {n} images look like one class (estimated pneumonia share "
            f"{estimated[1]:.3f}); the class balance is kept within {PRIOR_RANGE[0]}-"
            f"{PRIOR_RANGE[1]}: check that the store holds the films it should"
        )
    # Three classes: the site's normal share from the binary estimate, bacterial and viral in
    # the training store's proportion. EM over the three-class posteriors alone collapses
    # where two classes overlap (on the Kaggle test split it put every pneumonia in viral:
    # bacterial 0.000), and nothing unlabelled can tell bacterial from viral apart better.
    pneumonia = np.asarray(trained["multiclass"][1:]) / sum(trained["multiclass"][1:])
    multiclass_site = np.array([binary_site[0], *(binary_site[1] * pneumonia)])
    binary_site = float(binary_site[1])
    moved = beyond_noise([trained["binary"]], [binary_site], n)
    return {
        "binary": {
            "training": trained["binary"],
            "site": binary_site,
            "applied": moved,
        },
        "multiclass": {
            "training": trained["multiclass"],
            "site": multiclass_site.tolist(),
            "applied": moved,
            "rule": "normal share from the binary estimate; bacterial and viral in the "
            "training proportion",
        },
        "images": n,
    }


# --- BatchNorm statistics --------------------------------------------------------------------


def batchnorm_layers(model) -> list:
    """The BatchNorm layers that trained (a frozen one, its weight without gradient, keeps the
    statistics it came with)."""
    from torch import nn

    return [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.weight is None or m.weight.requires_grad)
    ]


def batchnorm_states(bundle: Bundle, pixels: np.ndarray, batch: int = 64) -> dict[str, dict]:
    """Both CNNs' state dicts with their trained BatchNorm layers' running statistics
    re-estimated on ``pixels`` (uint8 ``(N, S, S)``); the bundle's networks are left as
    they were."""
    import copy

    import torch

    from pneumo_ray.io.images import to_model_input
    from pneumo_ray.training.loop import recalibrate_batchnorm

    states = {}
    for name in CNNS:
        model = copy.deepcopy(getattr(bundle, name)).to(bundle.device)
        batches = [
            to_model_input(pixels[start : start + batch]).to(bundle.device)
            for start in range(0, len(pixels), batch)
        ]
        if bundle.device.type == "cpu":
            batches = [x.contiguous(memory_format=torch.channels_last) for x in batches]
        recalibrate_batchnorm(model, batches)
        states[name] = {key: value.cpu() for key, value in model.state_dict().items()}
    return states


def input_shift(bundle: Bundle, raw: dict[str, np.ndarray], sizes: list[int]) -> dict:
    """The drift rule's verdict on each image statistic of the site's images against the
    bundle's drift reference: {statistic: {psi, p_value, drift}}; {} without a reference."""
    if bundle.drift_reference is None:
        return {}
    finished = bundle.finish(raw)
    table = reference_table(
        raw["image_uri"], finished, {name: raw[name] for name in IMAGE_STATS}, sizes
    )
    return drift_between(
        bundle.drift_reference, table, SHIFT_STATISTICS, bundle.card.get("monitoring")
    )


# --- the whole adaptation --------------------------------------------------------------------


def check_images(count: int) -> None:
    """SiteError under MIN_IMAGES usable images; a warning under FEW_IMAGES."""
    if count < MIN_IMAGES:
        raise SiteError(
            f"{count} usable image(s): adapting from unlabelled images needs at least "
            f"{MIN_IMAGES} (BatchNorm statistics and a class balance are estimated from them)"
        )
    if count < FEW_IMAGES:
        log(
            f"warning: {count} images: BatchNorm statistics and a class balance estimated "
            f"from fewer than {FEW_IMAGES} images are rough"
        )


def adapt_unlabelled(
    bundle: Bundle,
    pixels: np.ndarray,
    uris: list[str],
    sizes: list[int],
    run_networks: NetworksRun,
    source: dict,
    states_of: Callable[[Bundle, np.ndarray], dict[str, dict]] = batchnorm_states,
) -> dict:
    """Adapt ``bundle`` in place to the site whose images are ``pixels`` (uint8 ``(N, S, S)``,
    named ``uris``, ``sizes`` bytes): BatchNorm statistics when the image statistics drift,
    then the class balance when it moved past noise. ``run_networks`` gives the networks'
    raw outputs on the same images (in actors, or in-process); ``states_of`` re-estimates the
    BatchNorm statistics (in a Ray task, or in-process). Returns the card's record."""
    check_images(len(uris))
    previous = {
        "model_version": bundle.model_version,
        "calibration": bundle.card.get("calibration"),
        "monitoring_reference": bundle.card.get("monitoring", {}).get("reference"),
        "metrics": bundle.card.pop("metrics", None),  # the networks' figures before
    }
    raw = _aligned(run_networks(bundle), uris)
    before = _call_shares(bundle.finish(raw))
    shift = input_shift(bundle, raw, sizes)
    drifted = sorted(name for name, verdict in shift.items() if verdict["drift"])
    layers = {name: len(batchnorm_layers(getattr(bundle, name))) for name in CNNS}
    if drifted:
        log(f"the site's images differ from validation in {', '.join(drifted)}: "
            f"re-estimating BatchNorm statistics on {len(uris)} images")  # fmt: skip
        for name, state in states_of(bundle, pixels).items():
            getattr(bundle, name).load_state_dict(state)
        raw = _aligned(run_networks(bundle), uris)
    else:
        log("the site's images match validation's (no image statistic drifts): "
            "BatchNorm statistics kept")  # fmt: skip
    prior = estimate_class_prior(bundle, raw)
    applied = {k: v for k, v in prior.items() if isinstance(v, dict) and v["applied"]}
    calibration = bundle.card.setdefault("calibration", {})
    calibration.pop("class_prior", None)
    if applied:
        calibration["class_prior"] = {
            name: {"training": value["training"], "site": value["site"]}
            for name, value in applied.items()
        }
    finished = bundle.finish(raw)
    bundle.drift_reference = reference_table(
        raw["image_uri"], finished, {name: raw[name] for name in IMAGE_STATS}, sizes
    )
    bundle.card.setdefault("monitoring", {})["reference"] = (
        f"{DRIFT_REFERENCE_FILE}: the adapted bundle's outputs and image statistics on the "
        f"{len(uris)} unlabelled images of the site (pneumo-adapt --unlabelled)"
    )
    record = {
        "kind": "unlabelled",
        **source,
        "images": len(uris),
        "fingerprint": _fingerprint(uris, sizes),
        "image_shift": shift,
        "batchnorm": {
            "adapted": bool(drifted),
            "why": (f"drift in {', '.join(drifted)}" if drifted else "no image statistic drifted"),
            "layers": layers if drifted else {},
            "rule": "running mean and variance of every BatchNorm layer that trained, one "
            "cumulative pass over the site's images; frozen layers keep their statistics",
        },
        "class_prior": prior,
        "calls": {"before": before, "adapted": _call_shares(finished)},
        "adapted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "previous": {k: v for k, v in previous.items() if v is not None},
    }
    bundle.card.setdefault("site_adaptations", []).append(record)
    return record


def _aligned(raw: dict[str, np.ndarray], uris: list[str]) -> dict[str, np.ndarray]:
    """``raw``'s rows in the order of ``uris`` (actors return them in any order)."""
    where = {str(uri): i for i, uri in enumerate(raw["image_uri"])}
    missing = [uri for uri in uris if uri not in where]
    if missing:
        raise ValueError(f"the networks gave no output for {len(missing)} image(s): {missing[:3]}")
    order = np.array([where[uri] for uri in uris])
    return {key: np.asarray(value)[order] for key, value in raw.items()}


def _call_shares(finished: dict[str, np.ndarray]) -> dict:
    """Share of each binary and three-class call, and the median p_pneumonia."""
    binary = np.asarray(finished["pred_binary"]).astype(str)
    classes = np.asarray(finished["pred_class"]).astype(str)
    return {
        "pneumonia_share": float(np.mean(binary == BINARY_LABELS[1])),
        "class_shares": {label: float(np.mean(classes == label)) for label in CLASS_LABELS},
        "median_p_pneumonia": float(np.median(finished["p_pneumonia"])),
    }


def _fingerprint(uris: list[str], sizes: list[int]) -> str:
    digest = hashlib.sha256()
    for uri, size in sorted(zip(uris, sizes, strict=True)):
        digest.update(f"{uri}\t{size}\n".encode())
    return digest.hexdigest()


# --- the job ---------------------------------------------------------------------------------


def list_site_images(inputs: list[str], limit: int, seed: int) -> tuple[list[str], list[int], int]:
    """Up to ``limit`` images of the inputs (folders, prefixes or manifests, as the scoring
    job lists them), a seeded draw when there are more: (URIs, sizes, images listed)."""
    from pneumo_ray.io.listing import iter_listing

    sizes: dict[str, int] = {}
    for page in iter_listing(inputs, report=log):
        for uri, size in zip(page.column("image_uri").to_pylist(),
                             page.column("image_bytes").to_pylist(), strict=True):  # fmt: skip
            sizes.setdefault(uri, size)
    listed = sorted(sizes)
    if len(listed) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(listed), limit, replace=False))
        listed = [listed[i] for i in keep]
    return listed, [sizes[uri] for uri in listed], len(sizes)


def adapt_unlabelled_store(
    model: str,
    inputs: list[str],
    output: str,
    max_images: int = 2000,
    seed: int = 0,
    labelling_list: str | None = None,
    labelling_images: int = 50,
    labelling_rule: str = DEFAULT_LABELLING_RULE,
    plan=None,
) -> dict:
    """Load a bundle, adapt it to the unlabelled images of ``inputs`` (``adapt_unlabelled``:
    its networks in model actors, the BatchNorm pass in a Ray task) and write it to
    ``output``; with ``labelling_list``, also the images whose labels would help next."""
    import ray

    from pneumo_ray.io import data, stores
    from pneumo_ray.models.bundle import BundleError, load_bundle, write_bundle
    from pneumo_ray.models.predict import collect, plan_actors, run_models

    started = time.perf_counter()
    model, output = stores.normalize(model), stores.normalize(output)
    inputs = [stores.normalize(uri) for uri in inputs]
    if output.rstrip("/") == model.rstrip("/"):
        raise BundleError(
            f"--output {output} is the bundle being adapted: write the adapted bundle elsewhere "
            "(the one it comes from stays as it was)"
        )
    bundle = load_bundle(model)
    uris, sizes, listed = list_site_images(inputs, max_images, seed)
    log(
        f"adapting bundle {bundle.model_version} to {len(uris)} unlabelled images"
        + (f" (a seeded draw of {listed})" if listed > len(uris) else "")
        + f" of {', '.join(inputs)}"
    )
    check_images(len(uris))
    decoded = data.decode_uris(uris, bundle.image_size, seed)
    for uri, why in decoded.failed:
        log(f"skipped unreadable image {uri}: {why}")
    columns = collect(decoded.dataset.select_columns(["image_uri", "image"]))
    where = {str(uri): i for i, uri in enumerate(columns["image_uri"])}
    size_of = dict(zip(uris, sizes, strict=True))
    uris = [uri for uri in uris if uri in where]
    pixels = columns["image"][[where[uri] for uri in uris]]
    plan = plan or plan_actors(None, None)

    def run_networks(adapted: Bundle) -> dict[str, np.ndarray]:
        return run_models(decoded.dataset, adapted, plan, outputs="networks")

    def states_of(adapted: Bundle, images: np.ndarray) -> dict[str, dict]:
        task = ray.remote(batchnorm_states).options(
            num_cpus=1 if plan.use_gpu else plan.threads, num_gpus=1 if plan.use_gpu else 0
        )
        return ray.get(task.remote(adapted, images))

    source = {
        "inputs": inputs,
        "listed_images": listed,
        "seed": seed,
        "skipped_images": [{"image_uri": u, "error": e} for u, e in decoded.failed],
    }
    record = adapt_unlabelled(
        bundle, pixels, uris, [size_of[u] for u in uris], run_networks, source, states_of
    )
    card = write_bundle(bundle, output)
    print_summary(record, bundle)
    if labelling_list:
        p = bundle.drift_reference.column("p_pneumonia").to_numpy()
        reference_uris = bundle.drift_reference.column("image_uri").to_pylist()
        rows = write_labelling_list(
            stores.normalize(labelling_list), reference_uris, p, bundle.binary_threshold,
            labelling_images, labelling_rule, seed,
        )  # fmt: skip
        log(
            f"labelling list: {rows} images to label ({labelling_rule}) in {labelling_list}; "
            "fill in its label column (normal, bacterial or viral) and patient_id, then "
            f"pneumo-adapt --model {output} --data {labelling_list} --output ..."
        )
    log(f"adapted bundle {card['model_version']} written to {output} in "
        f"{time.perf_counter() - started:.0f}s")  # fmt: skip
    return card


def print_summary(record: dict, bundle: Bundle) -> None:
    """What the adaptation estimated and what it changed, on the site's images."""
    prior, calls = record["class_prior"], record["calls"]
    binary, three = prior["binary"], prior["multiclass"]

    def shares(values) -> str:
        return "/".join(f"{v:.3f}" for v in values)

    lines = [
        f"\nSite: {record['images']} unlabelled images. BatchNorm statistics: "
        + ("re-estimated (" if record["batchnorm"]["adapted"] else "kept (")
        + record["batchnorm"]["why"]
        + ").",
        f"class balance (EM): pneumonia {binary['training']:.3f} in training -> "
        f"{binary['site']:.3f} estimated here ("
        + ("applied" if binary["applied"] else "within sampling noise: not applied")
        + "); "
        f"normal/bacterial/viral {shares(three['training'])} -> {shares(three['site'])} ("
        + ("applied" if three["applied"] else "not applied")
        + ")",
        f"{'':36s}{'before':>12s}{'adapted':>12s}",
        f"{'called pneumonia':36s}{calls['before']['pneumonia_share']:>12.4f}"
        f"{calls['adapted']['pneumonia_share']:>12.4f}",
        f"{'median p_pneumonia':36s}{calls['before']['median_p_pneumonia']:>12.4f}"
        f"{calls['adapted']['median_p_pneumonia']:>12.4f}",
    ]
    print("\n".join(lines), flush=True)
