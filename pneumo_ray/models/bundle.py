"""What a trained model set is on disk, and how it predicts.

A bundle is a folder (local or ``s3://``) holding::

    card.json               labels, input size, preprocessing, thresholds, KNN settings, data
                            fingerprint, package versions, test metrics, and each file's sha256
    binary.pt               state dicts; load with torch.load(..., weights_only=True)
    multiclass.pt
    autoencoder.pt
    knn_reference.parquet   KNN reference set: image_uri, label, feature (no pickle)
    normal_reference.parquet  the autoencoder's latent codes of normal training images, for the
                            ``latent`` anomaly score (image_uri, feature; no pickle)
    patchcore.pt            the ``patchcore`` anomaly score's frozen ImageNet feature extractor
    patchcore_memory.parquet  its memory bank: coreset of normal training patches (no pickle)
    drift_reference.parquet the bundle's outputs and image statistics on the validation split:
                            what scoring runs are compared with (pneumo_ray.monitoring.drift)
    scope.pt                the scope check's frozen ImageNet feature extractor
    scope_reference.parquet its Gaussians of the training images and thresholds (no pickle)
    report/                 metrics.json and PNG plots

Loading runs no code from the bundle: weights load with ``weights_only=True``, the KNN is
refitted from Parquet, and every file must match the sha256 the card gives for it.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pneumo_ray.io import stores
from pneumo_ray.io.images import to_model_input
from pneumo_ray.io.labels import BINARY_LABELS, CLASS_LABELS

if TYPE_CHECKING:
    import torch

    from pneumo_ray.models.anomaly import NormalReference
    from pneumo_ray.models.autoencoder import ConvAutoencoder
    from pneumo_ray.models.cnn import ChestCNN, SiteHead
    from pneumo_ray.models.knn import KnnReference
    from pneumo_ray.models.patchcore import PatchFeatures, PatchMemory
    from pneumo_ray.models.scope import ScopeFeatures, ScopeReference

# torch and the models are imported where they run: a scoring driver reads cards (read_card)
# without loading torch, and stays about 450 MB smaller.

BUNDLE_FORMAT = "pneumo_ray.bundle/1"
CARD = "card.json"
WEIGHT_FILES = {
    "binary": "binary.pt",
    "multiclass": "multiclass.pt",
    "autoencoder": "autoencoder.pt",
}
KNN_FILE = "knn_reference.parquet"
NORMAL_REFERENCE_FILE = "normal_reference.parquet"
PATCHCORE_FILE = "patchcore.pt"
PATCHCORE_MEMORY_FILE = "patchcore_memory.parquet"
DRIFT_REFERENCE_FILE = "drift_reference.parquet"  # what scoring runs are compared with
SCOPE_FILE = "scope.pt"
SCOPE_REFERENCE_FILE = "scope_reference.parquet"
SITE_HEAD_FILE = "multiclass_site_head.pt"  # pneumo-adapt --fine-tune's three-class head
WITHHELD = ("pred_binary", "pred_class", "knn_label")  # no call for an image out of scope
REPORT_DIR = "report"


class BundleError(ValueError):
    """A bundle that is missing, incomplete, or whose files do not match its card."""


def package_versions() -> dict[str, str]:
    names = (
        "pneumo_ray",
        "ray",
        "torch",
        "torchvision",
        "scikit-learn",
        "pillow",
        "pyarrow",
        "numpy",
    )
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Bundle:
    """The four models and the card that says how to use them."""

    card: dict
    binary: ChestCNN
    multiclass: ChestCNN
    autoencoder: ConvAutoencoder
    knn: KnnReference
    normal_reference: NormalReference | None = None  # needed by the ``latent`` anomaly score
    drift_reference: pa.Table | None = None  # validation outputs, for scoring runs' drift checks
    patchcore: PatchFeatures | None = None  # the ``patchcore`` anomaly score's extractor
    patch_memory: PatchMemory | None = None  # and its memory bank
    scope: ScopeFeatures | None = None  # the scope check's extractor (issue 33)
    scope_reference: ScopeReference | None = None  # and its Gaussians
    multiclass_site: SiteHead | None = None  # a site's three-class head (pneumo-adapt --fine-tune)

    @property
    def image_size(self) -> int:
        return int(self.card["image_size"])

    @property
    def model_version(self) -> str:
        return str(self.card.get("model_version", "unsaved"))

    @property
    def binary_threshold(self) -> float:
        return float(self.card["models"]["binary"]["threshold"])

    @property
    def anomaly_score_kind(self) -> str:
        return str(self.card["models"]["autoencoder"]["score"])

    @property
    def anomaly_threshold(self) -> float:
        return float(self.card["models"]["autoencoder"]["threshold"])

    @property
    def tta(self) -> str:
        """Test-time augmentation of the CNNs (``none`` in bundles from before it existed)."""
        return str(self.card.get("inference", {}).get("tta", "none"))

    @property
    def binary_score(self) -> str:
        """What p_pneumonia is: ``combined`` or ``network`` (the binary network alone)."""
        return str(self.card["models"]["binary"].get("score", "network"))

    @property
    def inpaint(self) -> bool:
        """Whether the anomaly score needs the inpainting passes (four autoencoder passes)."""
        return self.anomaly_score_kind == "inpaint"

    def temperature(self, name: str) -> float:
        """The temperature fitted on validation for ``binary`` or ``multiclass`` (1: none)."""
        return float(self.card["models"].get(name, {}).get("temperature", 1.0))

    def to(self, device: torch.device | str) -> Bundle:
        for model in self.networks.values():
            model.to(device).eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.binary.parameters()).device

    @property
    def networks(self) -> dict[str, torch.nn.Module]:
        """The networks a prediction runs (the PatchCore extractor only when its score is the
        bundle's)."""
        networks = {
            "binary": self.binary,
            "multiclass": self.multiclass,
            "autoencoder": self.autoencoder,
        }
        if self.anomaly_score_kind == "patchcore":
            networks["patchcore"] = self.patchcore
        if self.scope is not None:
            networks["scope"] = self.scope
        if self.multiclass_site is not None:
            networks["multiclass_site"] = self.multiclass_site
        return networks

    def predict(
        self, images: np.ndarray | torch.Tensor, notes: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """All four models and the scope check on one batch of decoded uint8 images
        ``(B, S, S)`` (numpy, or a tensor already on the bundle's device); ``notes``: the
        metadata's scope objections per image (``io.images.scope_note``), if read.

        Returns one array per output column (see the scoring job's Parquet schema).
        """
        import torch

        from pneumo_ray.models.outputs import network_outputs

        x = to_model_input(images).to(self.device)  # (B, 1, S, S)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        raw = network_outputs(self.networks, x, self.tta, inpaint=self.inpaint)
        return self.finish(raw, notes)

    def calibrated(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``p_pneumonia_cnn`` (the binary network), ``probs`` (three-class) with the card's
        temperatures, and ``p_pneumonia``: the card's binary score of the two; then a site's
        score maps and class balance, where the bundle was adapted to one (pneumo-adapt)."""
        from pneumo_ray.models.calibration import calibrated_outputs

        temperatures = {name: self.temperature(name) for name in ("binary", "multiclass")}
        return calibrated_outputs(
            raw["binary_logit"],
            raw["multiclass_logits"],
            temperatures,
            self.binary_score,
            self.card.get("calibration", {}).get("score_maps"),
            self.card.get("calibration", {}).get("class_prior"),
        )

    def anomaly_scores(self, raw: dict[str, np.ndarray]) -> np.ndarray:
        """The anomaly score the card names, from the autoencoder's raw outputs."""
        kind = self.anomaly_score_kind
        if kind == "latent":
            return self.normal_reference.score(raw["ae_code"])
        if kind == "patchcore":
            from pneumo_ray.models.patchcore import reduce_patches

            return reduce_patches(raw["patch_distances"], self.patch_memory.reduction)
        return raw["ae_inpaint"] if kind == "inpaint" else raw["ae_mse"]

    def call_columns(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The CNNs' columns of ``finish``: calibrated probabilities and the two calls."""
        calibrated = self.calibrated(raw)
        p_pneumonia, probs = calibrated["p_pneumonia"], calibrated["probs"]
        return {
            "p_pneumonia": p_pneumonia.astype(np.float32),
            "pred_binary": np.where(p_pneumonia >= self.binary_threshold, *BINARY_LABELS[::-1]),
            "p_pneumonia_cnn": calibrated["p_pneumonia_cnn"].astype(np.float32),
            "p_normal": probs[:, 0].astype(np.float32),
            "p_bacterial": probs[:, 1].astype(np.float32),
            "p_viral": probs[:, 2].astype(np.float32),
            "pred_class": np.asarray(CLASS_LABELS)[probs.argmax(axis=1)],
        }

    def finish(
        self, raw: dict[str, np.ndarray], notes: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """The networks' raw outputs -> the bundle's output columns: calibrated
        probabilities, thresholds, the KNN's label and neighbours (on the uncalibrated
        softmax it was fitted on), the anomaly score the card names, and the scope check
        (``in_scope``, ``scope_score``, ``scope_reason``; ``withhold_out_of_scope`` then
        takes the calls of images out of scope away, as scoring does)."""
        from pneumo_ray.models.knn import select_features
        from pneumo_ray.models.scope import scope_columns

        mse = raw["ae_mse"]
        anomaly = self.anomaly_scores(raw)
        knn_features = select_features(raw["probs"], raw["embedding"], self.knn.feature_kind)
        knn_labels, neighbour_uris, distances = self.knn.query(knn_features)
        return {
            **self.call_columns(raw),
            "knn_label": knn_labels,
            "knn_neighbors": neighbour_uris,
            "knn_distances": distances,
            "anomaly_score": anomaly.astype(np.float32),
            "is_anomaly": anomaly > self.anomaly_threshold,
            "reconstruction_mse": mse.astype(np.float32),
            **scope_columns(self.scope_reference if "scope_features" in raw else None, raw, notes),
        }


def withhold_out_of_scope(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The bundle's columns with no binary call, class or KNN label where the image is out of
    scope (its probabilities stay, with in_scope false and the reason beside them)."""
    out_of_scope = ~np.asarray(columns["in_scope"], dtype=bool)
    if not out_of_scope.any():
        return columns
    columns = dict(columns)
    for name in WITHHELD:
        values = np.asarray(columns[name], dtype=object).copy()
        values[out_of_scope] = None
        columns[name] = values
    return columns


def _state_dict_bytes(model: torch.nn.Module) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer)
    return buffer.getvalue().to_pybytes()


def write_bundle(bundle: Bundle, uri: str, report_dir: str | None = None) -> dict:
    """Write a bundle to ``uri`` (local or s3://); returns the card as written.

    The card, which names every file's sha256, is written last: a bundle without a card is
    an unfinished one.
    """
    uri = stores.normalize(uri)
    payloads: dict[str, bytes] = {
        WEIGHT_FILES["binary"]: _state_dict_bytes(bundle.binary),
        WEIGHT_FILES["multiclass"]: _state_dict_bytes(bundle.multiclass),
        WEIGHT_FILES["autoencoder"]: _state_dict_bytes(bundle.autoencoder),
    }
    payloads[KNN_FILE] = _parquet_bytes(bundle.knn.to_table())
    if bundle.normal_reference is not None:
        payloads[NORMAL_REFERENCE_FILE] = _parquet_bytes(bundle.normal_reference.to_table())
    if bundle.drift_reference is not None:
        payloads[DRIFT_REFERENCE_FILE] = _parquet_bytes(bundle.drift_reference)
    if bundle.patchcore is not None:
        payloads[PATCHCORE_FILE] = _state_dict_bytes(bundle.patchcore)
        payloads[PATCHCORE_MEMORY_FILE] = _parquet_bytes(bundle.patch_memory.to_table())
    if bundle.scope is not None:
        payloads[SCOPE_FILE] = _state_dict_bytes(bundle.scope)
        payloads[SCOPE_REFERENCE_FILE] = _parquet_bytes(bundle.scope_reference.to_table())
    if bundle.multiclass_site is not None:
        payloads[SITE_HEAD_FILE] = _state_dict_bytes(bundle.multiclass_site)
    files = {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in payloads.items()}
    combined = sha256("".join(files[name]["sha256"] for name in sorted(files)).encode())
    card = {
        **bundle.card,
        "format": BUNDLE_FORMAT,
        "model_version": f"pneumo-{combined[:12]}",
        "files": files,
        "versions": package_versions(),
    }
    stores.delete_dir(stores.join(uri, REPORT_DIR))
    for name, data in payloads.items():
        stores.write_bytes(stores.join(uri, name), data)
    if report_dir:
        stores.upload_dir(report_dir, stores.join(uri, REPORT_DIR))
    stores.write_bytes(stores.join(uri, CARD), stores.json_bytes(card))
    bundle.card = card
    return card


def read_card(uri: str) -> dict:
    """The bundle's card (``card.json``); BundleError where ``uri`` holds no bundle."""
    card_uri = stores.join(stores.normalize(uri), CARD)
    if not stores.exists(card_uri):
        raise BundleError(f"{uri}: not a model bundle (no {CARD}; was training finished?)")
    card = json.loads(stores.read_bytes(card_uri))
    if card.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{card_uri}: format {card.get('format')!r}, expected {BUNDLE_FORMAT}")
    return card


def read_drift_reference(uri: str, card: dict) -> pa.Table | None:
    """The bundle's drift reference (verified against the card), or None for a bundle
    trained before it existed. Needs no torch: the scoring driver reads it."""
    if DRIFT_REFERENCE_FILE not in card.get("files", {}):
        return None
    return pq.read_table(io.BytesIO(_verified(uri, DRIFT_REFERENCE_FILE, card)))


def _verified(uri: str, name: str, card: dict) -> bytes:
    expected = card["files"].get(name)
    if expected is None:
        raise BundleError(f"{uri}: the card lists no {name}")
    file_uri = stores.join(uri, name)
    if not stores.exists(file_uri):
        raise BundleError(f"{file_uri}: missing from the bundle")
    data = stores.read_bytes(file_uri)
    if sha256(data) != expected["sha256"]:
        raise BundleError(
            f"{file_uri}: sha256 {sha256(data)[:12]}... does not match the card's "
            f"{expected['sha256'][:12]}... (file changed or corrupt)"
        )
    return data


def load_bundle(uri: str, device: torch.device | str = "cpu") -> Bundle:
    """Load and verify a bundle; raises BundleError if any file does not match its card."""
    import torch

    from pneumo_ray.models.anomaly import NormalReference
    from pneumo_ray.models.knn import KnnReference
    from pneumo_ray.models.networks import build_network
    from pneumo_ray.models.patchcore import PatchMemory

    uri = stores.normalize(uri)
    card = read_card(uri)
    size = int(card["image_size"])
    models = {
        name: build_network(name, size, card["models"].get(name, {}).get("network"))
        for name in WEIGHT_FILES
    }
    for name, model in models.items():
        data = _verified(uri, WEIGHT_FILES[name], card)
        # map_location: weights saved from any device (a GPU worker's) load on this one.
        state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        model.load_state_dict(state)
        if torch.device(device).type == "cpu":
            model.to(memory_format=torch.channels_last)
    knn = KnnReference.from_table(pq.read_table(io.BytesIO(_verified(uri, KNN_FILE, card))))
    reference = None
    if NORMAL_REFERENCE_FILE in card["files"]:
        table = pq.read_table(io.BytesIO(_verified(uri, NORMAL_REFERENCE_FILE, card)))
        reference = NormalReference.from_table(table)
    if card["models"]["autoencoder"]["score"] == "latent" and reference is None:
        raise BundleError(f"{uri}: the latent anomaly score needs {NORMAL_REFERENCE_FILE}")
    patchcore = memory = None
    if PATCHCORE_FILE in card["files"]:
        spec = {"architecture": card["models"]["patchcore"]["architecture"]}
        patchcore = build_network("patchcore", size, spec)
        data = _verified(uri, PATCHCORE_FILE, card)
        patchcore.load_state_dict(
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        )
        table = pq.read_table(io.BytesIO(_verified(uri, PATCHCORE_MEMORY_FILE, card)))
        memory = PatchMemory.from_table(table)
        patchcore.set_memory(memory.features)
    if card["models"]["autoencoder"]["score"] == "patchcore" and patchcore is None:
        raise BundleError(f"{uri}: the patchcore anomaly score needs {PATCHCORE_FILE}")
    scope = scope_reference = None
    if SCOPE_FILE in card["files"]:  # a bundle from before the scope check has none
        from pneumo_ray.models.scope import ScopeReference

        spec = {"architecture": card["scope"]["architecture"]}
        scope = build_network("scope", size, spec)
        data = _verified(uri, SCOPE_FILE, card)
        scope.load_state_dict(torch.load(io.BytesIO(data), weights_only=True, map_location="cpu"))
        table = pq.read_table(io.BytesIO(_verified(uri, SCOPE_REFERENCE_FILE, card)))
        scope_reference = ScopeReference.from_table(table)
    site_head = None
    if SITE_HEAD_FILE in card["files"]:  # adapted with --fine-tune
        from pneumo_ray.models.cnn import SiteHead

        site_head = SiteHead(models["multiclass"])
        data = _verified(uri, SITE_HEAD_FILE, card)
        site_head.load_state_dict(
            torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        )
    return Bundle(
        card,
        knn=knn,
        normal_reference=reference,
        patchcore=patchcore,
        patch_memory=memory,
        scope=scope,
        scope_reference=scope_reference,
        multiclass_site=site_head,
        **models,
    ).to(device)
