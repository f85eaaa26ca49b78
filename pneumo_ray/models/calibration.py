"""Temperature scaling, the combined binary score, and expected calibration error.

Temperature scaling (Guo et al., ICML 2017) divides a network's logits by one number T fitted
on validation to minimize the negative log-likelihood: the ranking (and so the AUC and the
argmax) is unchanged, only how sure the probabilities are. It cannot move scores that sit too
high as a whole, which is what another site's images do; a site's logistic score map (Platt
scaling of the final score, ``sigmoid(a logit(p) + b)``, fitted on the site's labelled images by
pneumo-adapt) can, and is monotone too. numpy only: the scoring driver and evaluation use it
without torch.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from pneumo_ray.io.labels import CLASS_LABELS

ECE_BINS = 15
LOG_T_RANGE = (-4.0, 4.0)  # T from about 0.02 to 55


def sigmoid(logit: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(logit, dtype=np.float64)))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    if logits.ndim == 1:  # binary: one logit, labels 0/1
        z = logits / temperature
        # log(1 + exp(-z)) for positives, log(1 + exp(z)) for negatives, stably
        return float(np.mean(np.logaddexp(0.0, np.where(labels == 1, -z, z))))
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimizing the NLL of ``logits / T``: binary (N,) logits with 0/1 labels, or
    (N, K) logits with class indices."""
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels).astype(np.int64)
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        return 1.0  # nothing to fit against
    result = minimize_scalar(
        lambda log_t: _nll(logits, labels, float(np.exp(log_t))),
        bounds=LOG_T_RANGE,
        method="bounded",
        options={"xatol": 1e-4},
    )
    return float(np.exp(result.x))


def combined_score(p_binary: np.ndarray, p_normal: np.ndarray) -> np.ndarray:
    """The one binary score from both CNNs: the mean of the binary network's p_pneumonia and
    the three-class network's 1 - p_normal."""
    return (np.asarray(p_binary) + 1.0 - np.asarray(p_normal)) / 2.0


NOISE_SE = 3.0  # a class share moves only when its estimate is this many standard errors off
PRIOR_RANGE = (0.02, 0.98)  # an estimated class share is kept within this range
SCORE_MAPPED = ("p_pneumonia", "p_pneumonia_cnn")  # the scores a site's map may apply to
PROBABILITY_CLIP = 1e-7  # logit(p) of a saturated float stays finite


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
    return np.log(p) - np.log1p(-p)


def fit_score_map(p: np.ndarray, is_positive: np.ndarray) -> dict[str, float]:
    """The logistic map ``sigmoid(a logit(p) + b)`` minimizing the NLL of these labels (Platt
    scaling of a probability); the identity (a 1, b 0) without both classes."""
    from scipy.optimize import minimize

    z = logit(p)
    y = np.asarray(is_positive, dtype=bool)
    if len(y) == 0 or y.all() or not y.any():
        return {"a": 1.0, "b": 0.0}

    def nll(w: np.ndarray) -> float:
        s = w[0] * z + w[1]
        return float(np.mean(np.logaddexp(0.0, np.where(y, -s, s))))

    a, b = minimize(nll, np.array([1.0, 0.0]), method="Nelder-Mead",
                    options={"xatol": 1e-6, "fatol": 1e-10}).x  # fmt: skip
    return {"a": float(a), "b": float(b)}


def apply_score_map(p: np.ndarray, score_map: dict[str, float]) -> np.ndarray:
    return sigmoid(score_map["a"] * logit(p) + score_map["b"])


def prior_corrected(probs: np.ndarray, training: np.ndarray, site: np.ndarray) -> np.ndarray:
    """Posteriors ``(N, K)`` under the ``training`` class prior -> under the ``site``'s
    (Saerens, Latinne and Decaestecker 2002): each class's probability times site / training,
    renormalized."""
    weighted = np.asarray(probs, dtype=np.float64) * (np.asarray(site) / np.asarray(training))
    return weighted / weighted.sum(axis=1, keepdims=True)


def binary_prior_corrected(p: np.ndarray, training: float, site: float) -> np.ndarray:
    """``prior_corrected`` of a positive-class probability with its complement."""
    p = np.asarray(p, dtype=np.float64)
    pairs = np.stack([1.0 - p, p], axis=1)
    return prior_corrected(pairs, [1.0 - training, training], [1.0 - site, site])[:, 1]


def em_class_prior(
    posteriors: np.ndarray, training: np.ndarray, iterations: int = 1000, tol: float = 1e-9
) -> np.ndarray:
    """The class prior of the images whose posteriors ``(N, K)`` (under the ``training``
    prior) are given, by EM (Saerens et al. 2002): posteriors re-weighted by the current
    estimate over the training prior; the estimate is their mean; until it stops moving."""
    posteriors = np.asarray(posteriors, dtype=np.float64)
    training = np.asarray(training, dtype=np.float64)
    prior = training.copy()
    for _ in range(iterations):
        updated = prior_corrected(posteriors, training, prior).mean(axis=0)
        if np.max(np.abs(updated - prior)) < tol:
            return updated
        prior = updated
    return prior


def clamped(prior: np.ndarray) -> tuple[np.ndarray, bool]:
    """A class prior kept within PRIOR_RANGE (renormalized), and whether it had to be: an
    estimate that says a site's images are nearly all one class (a store of one kind of film,
    or of films the networks cannot read) must not make every call the same."""
    prior = np.asarray(prior, dtype=np.float64)
    low, high = PRIOR_RANGE
    if prior.min() >= low and prior.max() <= high:
        return prior, False
    prior = np.clip(prior, low, high)
    return prior / prior.sum(), True


def beyond_noise(training: np.ndarray, site: np.ndarray, images: int) -> bool:
    """Whether any class share of ``site`` is more than NOISE_SE standard errors of a share
    of ``images`` images away from ``training``."""
    training, site = np.asarray(training, np.float64), np.asarray(site, np.float64)
    se = np.sqrt(training * (1 - training) / max(images, 1))
    return bool(np.any(np.abs(site - training) > NOISE_SE * se))


def training_class_prior(card: dict) -> dict:
    """The class shares the bundle's calibrated probabilities answer for: the training store's
    (validation is drawn from the same pool by patient, and the temperatures were fitted
    there)."""
    counts = card["training"]["class_counts"]
    three = np.array([counts.get(label, 0) for label in CLASS_LABELS], dtype=np.float64)
    three /= three.sum()
    return {"binary": float(1 - three[0]), "multiclass": three.tolist()}  # binary: pneumonia


def calibrated_outputs(
    binary_logit: np.ndarray,
    multiclass_logits: np.ndarray,
    temperatures: dict[str, float],
    binary_score: str,
    score_maps: dict[str, dict[str, float]] | None = None,
    class_prior: dict | None = None,
) -> dict[str, np.ndarray]:
    """The CNNs' raw logits -> ``p_pneumonia_cnn`` (the binary network, sigmoid(logit / T)),
    ``probs`` (three-class softmax(logits / T)) and ``p_pneumonia``: ``combined_score`` of
    the two for ``binary_score`` "combined", else ``p_pneumonia_cnn``. ``score_maps`` (a
    site's, by score name) then map p_pneumonia and p_pneumonia_cnn; ``class_prior`` (a site's
    estimated class balance: {"binary"|"multiclass": {"training": ..., "site": ...}}) then
    moves the probabilities from the training prior to the site's."""
    p_cnn = sigmoid(np.asarray(binary_logit) / temperatures["binary"])
    probs = softmax(np.asarray(multiclass_logits) / temperatures["multiclass"])
    p = combined_score(p_cnn, probs[:, 0]) if binary_score == "combined" else p_cnn
    out = {"p_pneumonia": p, "p_pneumonia_cnn": p_cnn, "probs": probs}
    for name, score_map in (score_maps or {}).items():
        out[name] = apply_score_map(out[name], score_map)
    prior = (class_prior or {}).get("binary")
    if prior is not None:
        for name in SCORE_MAPPED:
            out[name] = binary_prior_corrected(out[name], prior["training"], prior["site"])
    prior = (class_prior or {}).get("multiclass")
    if prior is not None:
        out["probs"] = prior_corrected(out["probs"], prior["training"], prior["site"])
    return out


def reliability(
    probability: np.ndarray, is_positive: np.ndarray, bins: int = ECE_BINS
) -> dict[str, np.ndarray]:
    """Per equal-width probability bin: images, mean predicted probability, observed rate."""
    probability = np.asarray(probability, dtype=np.float64)
    is_positive = np.asarray(is_positive, dtype=np.float64)
    which = np.clip((probability * bins).astype(int), 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        predicted = np.bincount(which, probability, minlength=bins) / count
        observed = np.bincount(which, is_positive, minlength=bins) / count
    return {"count": count, "predicted": predicted, "observed": observed}


def expected_calibration_error(
    probability: np.ndarray, is_positive: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the image-weighted mean gap between predicted probability and observed rate over
    ``bins`` equal-width bins of the predicted probability."""
    if len(probability) == 0:
        return float("nan")
    table = reliability(probability, is_positive, bins)
    used = table["count"] > 0
    gaps = np.abs(table["predicted"][used] - table["observed"][used])
    return float(np.sum(table["count"][used] * gaps) / np.sum(table["count"]))
