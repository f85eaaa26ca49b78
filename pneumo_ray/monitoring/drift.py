"""What a scoring run saw, against what the bundle saw on validation: drift of outputs and images.

    training: the bundle's outputs and image statistics on the validation split
              -> drift_reference.parquet in the bundle (and the drift rule in the card)
    scoring:  every committed row -> RunProfile (fixed bins: bounded memory at any store size)
              -> per statistic: population stability index, chi-square test, verdict

A statistic has drifted when it moved far (PSI >= the card's ``psi``) *and* the move is more
than sampling noise (chi-square p-value < the card's ``p_value``): a large store makes any small
difference significant, and a small one makes PSI noisy, so each gate guards the other.
Numeric statistics are binned at the reference's quantiles (equal reference shares per bin).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pneumo_ray.io.images import IMAGE_STATS
from pneumo_ray.io.labels import BINARY_LABELS, CLASS_LABELS

DRIFT_RULE = {
    "psi": 0.25,
    "p_value": 0.01,
    "bins": 10,
    "rule": "drift when PSI >= psi (a large move) and the chi-square test of the binned counts "
    "gives p < p_value (not sampling noise); numeric statistics binned at the reference's "
    "quantiles",
}
TOP_FLAGGED = 12
SAMPLE_ROWS = 20_000  # rows of a run kept for its class balance and labelling list
PLOT_BINS = 30


@dataclass(frozen=True)
class Statistic:
    """One monitored quantity: a column of the scored rows and of the reference."""

    name: str
    title: str
    categories: tuple[str, ...] = ()  # empty: numeric

    @property
    def numeric(self) -> bool:
        return not self.categories


STATISTICS = (
    Statistic("p_pneumonia", "p_pneumonia (the binary score)"),
    Statistic("pred_binary", "binary call", BINARY_LABELS),
    Statistic("pred_class", "three-class prediction", CLASS_LABELS),
    Statistic("anomaly_score", "anomaly score"),
    Statistic("is_anomaly", "anomaly flag", ("false", "true")),
    Statistic("image_mean", "mean intensity (0-1)"),
    Statistic("image_contrast", "contrast (pixel standard deviation)"),
    Statistic("image_sharpness", "sharpness (Laplacian standard deviation)"),
    Statistic("image_kib", "file size (KiB)"),
    # the share of images out of scope (issue 33): a night that suddenly holds CT slices
    Statistic("in_scope", "in scope (a frontal chest X-ray of a child)", ("false", "true")),
)
OUT_OF_SCOPE_EXAMPLES = 8  # out-of-scope images the report shows
REFERENCE_COLUMNS = (
    "image_uri",
    "p_pneumonia",
    "pred_binary",
    "pred_class",
    "anomaly_score",
    "is_anomaly",
    *IMAGE_STATS,
    "image_bytes",
    "in_scope",
)


def reference_table(
    uris: np.ndarray, outputs: dict[str, np.ndarray], stats: dict[str, np.ndarray], sizes
) -> pa.Table:
    """The bundle's drift reference: its output columns and image statistics per validation
    image (``outputs``: Bundle.finish of the validation pass; ``sizes``: file bytes)."""
    columns = {
        "image_uri": pa.array([str(u) for u in uris], pa.string()),
        "p_pneumonia": pa.array(np.asarray(outputs["p_pneumonia"], np.float32)),
        "pred_binary": pa.array([str(v) for v in outputs["pred_binary"]], pa.string()),
        "pred_class": pa.array([str(v) for v in outputs["pred_class"]], pa.string()),
        "anomaly_score": pa.array(np.asarray(outputs["anomaly_score"], np.float32)),
        "is_anomaly": pa.array(np.asarray(outputs["is_anomaly"], bool)),
        **{name: pa.array(np.asarray(stats[name], np.float32)) for name in IMAGE_STATS},
        "image_bytes": pa.array(np.asarray(sizes, np.int64)),
        # null (a scope check not run) counts as in scope
        "in_scope": pa.array(
            [v is not False and v != 0 for v in outputs.get("in_scope", [True] * len(uris))],
            pa.bool_(),
        ),
    }
    return pa.table([columns[name] for name in REFERENCE_COLUMNS], names=list(REFERENCE_COLUMNS))


def _values(table: pa.Table, stat: Statistic) -> np.ndarray:
    """The statistic's values in a table of scored rows (or the reference), nulls dropped."""
    if stat.name not in table.column_names and stat.name != "image_kib":
        return np.array([])  # a reference from before the statistic existed
    if stat.name == "image_kib":
        column = table.column("image_bytes").to_numpy(zero_copy_only=False)
        return column.astype(np.float64) / 1024.0
    values = table.column(stat.name).to_pylist()
    if stat.numeric:
        return np.array([v for v in values if v is not None], dtype=np.float64)
    return np.array([str(v).lower() for v in values if v is not None], dtype=object)


def compare_counts(reference: np.ndarray, run: np.ndarray, rule: dict) -> dict:
    """PSI and chi-square p-value of binned counts; the verdict under ``rule``."""
    from scipy.stats import chi2_contingency

    keep = (reference + run) > 0
    ref, got = reference[keep].astype(np.float64), run[keep].astype(np.float64)
    if not got.sum() or not ref.sum():
        return {"psi": None, "p_value": None, "drift": False}
    expected = (ref + 0.5) / (ref + 0.5).sum()  # +0.5: an empty bin is rare, not impossible
    actual = (got + 0.5) / (got + 0.5).sum()
    psi = float(np.sum((actual - expected) * np.log(actual / expected)))
    p_value = 1.0 if keep.sum() < 2 else float(chi2_contingency(np.vstack([ref, got]))[1])
    drift = psi >= rule["psi"] and p_value < rule["p_value"]
    return {"psi": round(psi, 4), "p_value": p_value, "drift": bool(drift)}


class _Histogram:
    """Counts of one statistic over fixed bins, for the reference and the run."""

    def __init__(self, stat: Statistic, reference: np.ndarray, bins: int) -> None:
        self.stat = stat
        if stat.numeric:
            count = max(2, min(bins, len(reference) // 10))
            quantiles = np.quantile(reference, np.linspace(0, 1, count + 1)[1:-1])
            self.edges = np.unique(quantiles)  # interior edges; ties merge bins
            # Plots: the reference's range and a quarter of it each side (a probability: 0-1);
            # values beyond fall in the end bins.
            low, high = float(reference.min()), float(reference.max())
            pad = 0.25 * (high - low) or 0.5 * abs(high) or 1.0
            low, high = (0.0, 1.0) if stat.name == "p_pneumonia" else (low - pad, high + pad)
            self.plot_edges = np.linspace(low, high, PLOT_BINS + 1)
        self.reference = self._bin(reference)
        self.run = np.zeros_like(self.reference)
        self.reference_plot = self._plot_bin(reference)
        self.run_plot = np.zeros_like(self.reference_plot)
        self.reference_mean = float(np.mean(reference)) if stat.numeric else None
        self.run_sum, self.run_n = 0.0, 0

    def _bin(self, values: np.ndarray) -> np.ndarray:
        if not self.stat.numeric:
            index = {c: i for i, c in enumerate(self.stat.categories)}
            codes = np.array([index[v] for v in values if v in index], dtype=np.int64)
            return np.bincount(codes, minlength=len(self.stat.categories))
        codes = np.searchsorted(self.edges, values, side="right")
        return np.bincount(codes, minlength=len(self.edges) + 1)

    def _plot_bin(self, values: np.ndarray) -> np.ndarray:
        if not self.stat.numeric:
            return self._bin(values)
        inner = self.plot_edges[1:-1]  # outliers count in the end bins
        return np.bincount(np.searchsorted(inner, values, side="right"), minlength=PLOT_BINS)

    def add(self, values: np.ndarray) -> None:
        self.run += self._bin(values)
        self.run_plot += self._plot_bin(values)
        if self.stat.numeric and len(values):
            self.run_sum += float(values.sum())
            self.run_n += len(values)


def in_scope_rows(table: pa.Table) -> pa.Table:
    """The rows not marked out of scope (a table without the column: all of them)."""
    if "in_scope" not in table.column_names:
        return table
    outside = pc.fill_null(pc.equal(table.column("in_scope"), False), False)
    return table.filter(pc.invert(outside))


def drift_between(
    reference: pa.Table, rows: pa.Table, names: tuple[str, ...], rule: dict | None = None
) -> dict[str, dict]:
    """The drift rule's verdict on each statistic ``names`` of ``rows`` against ``reference``
    (both tables of REFERENCE_COLUMNS), as a scoring run's report would give it."""
    rule = {**DRIFT_RULE, **(rule or {})}
    verdicts = {}
    for stat in STATISTICS:
        if stat.name not in names:
            continue
        scoped = stat.name != "in_scope"  # every other statistic over the images in scope
        values = _values(in_scope_rows(reference) if scoped else reference, stat)
        if not len(values):
            continue
        histogram = _Histogram(stat, values, rule["bins"])
        histogram.add(_values(in_scope_rows(rows) if scoped else rows, stat))
        verdicts[stat.name] = compare_counts(histogram.reference, histogram.run, rule)
    return verdicts


class RunProfile:
    """The distributions of one scoring run's committed rows, in fixed bins (memory does not
    grow with the store), and its most suspicious flagged images."""

    def __init__(self, reference: pa.Table | None, rule: dict | None = None) -> None:
        self.rule = {**DRIFT_RULE, **(rule or {})}
        self.reference_images = 0 if reference is None else reference.num_rows
        self.histograms: dict[str, _Histogram] = {}
        if reference is not None and reference.num_rows:
            inside = in_scope_rows(reference)  # as the run's rows are counted
            for stat in STATISTICS:
                values = _values(reference if stat.name == "in_scope" else inside, stat)
                if len(values):
                    self.histograms[stat.name] = _Histogram(stat, values, self.rule["bins"])
        self.images = 0
        self.flagged = {"binary": 0, "anomaly": 0, "either": 0}
        self.reference_flagged = (
            _flag_counts(*_flags(in_scope_rows(reference))) if reference is not None else None
        )
        self.top: list[tuple[float, int, dict]] = []  # min-heap on p_pneumonia
        self._order = 0
        # A uniform sample of the run's (image_uri, p_pneumonia), bounded (reservoir sampling,
        # seeded): the site's class balance and its labelling list are estimated from it.
        self.out_of_scope: dict[str, int] = {}  # reason kind -> images
        self.out_of_scope_examples: list[dict] = []
        self.sample_uris: list[str] = []
        self.sample_p: list[float] = []
        self._rng = np.random.default_rng(0)

    def add(self, rows: pa.Table) -> None:
        """Count the rows scored without error (a committed part): the share in scope over
        all of them, every other statistic over those in scope (an out-of-scope image's
        outputs say nothing of the site's children)."""
        ok = rows.filter(pc.is_null(rows.column("error")))
        if not ok.num_rows:
            return
        self._count_out_of_scope(ok)
        if "in_scope" in self.histograms:
            self.histograms["in_scope"].add(_values(ok, self.histograms["in_scope"].stat))
        ok = in_scope_rows(ok)
        if not ok.num_rows:
            return
        self.images += ok.num_rows
        for name, histogram in self.histograms.items():
            if name != "in_scope":
                histogram.add(_values(ok, histogram.stat))
        binary, anomaly = _flags(ok)
        flags = _flag_counts(binary, anomaly)
        for key in self.flagged:
            self.flagged[key] += flags[key]
        self._keep_top(ok, binary | anomaly)
        self._keep_sample(ok)

    def _count_out_of_scope(self, rows: pa.Table) -> None:
        """Out-of-scope images by the kind of reason (its text before the colon), and the
        first few of them."""
        flags = rows.column("in_scope").to_pylist()
        reasons = rows.column("scope_reason").to_pylist()
        for i, (flag, reason) in enumerate(zip(flags, reasons, strict=True)):
            if flag is not False:
                continue
            kind = str(reason or "out of scope").split(":", 1)[0]
            self.out_of_scope[kind] = self.out_of_scope.get(kind, 0) + 1
            if len(self.out_of_scope_examples) < OUT_OF_SCOPE_EXAMPLES:
                self.out_of_scope_examples.append(
                    {name: rows.column(name)[i].as_py()
                     for name in ("image_uri", "scope_score", "scope_reason", "p_pneumonia")}
                )  # fmt: skip

    def _keep_sample(self, rows: pa.Table) -> None:
        """Algorithm R over the rows in order: each row seen so far is in the sample with
        probability SAMPLE_ROWS / rows seen."""
        uris = rows.column("image_uri").to_pylist()
        p = np.array([v or 0.0 for v in rows.column("p_pneumonia").to_pylist()], np.float64)
        seen = self.images - len(uris)  # rows before these
        for i, (uri, value) in enumerate(zip(uris, p, strict=True)):
            if len(self.sample_uris) < SAMPLE_ROWS:
                self.sample_uris.append(uri)
                self.sample_p.append(float(value))
                continue
            slot = int(self._rng.integers(0, seen + i + 1))
            if slot < SAMPLE_ROWS:
                self.sample_uris[slot], self.sample_p[slot] = uri, float(value)

    def _keep_top(self, rows: pa.Table, flagged: np.ndarray) -> None:
        p = np.array([v or 0.0 for v in rows.column("p_pneumonia").to_pylist()], np.float64)
        for i in np.flatnonzero(flagged):
            key = float(p[i])
            if len(self.top) >= TOP_FLAGGED and key <= self.top[0][0]:
                continue
            row = {name: rows.column(name)[int(i)].as_py() for name in _TOP_COLUMNS}
            self._order += 1
            item = (key, self._order, row)
            if len(self.top) < TOP_FLAGGED:
                heapq.heappush(self.top, item)
            else:
                heapq.heapreplace(self.top, item)

    def top_flagged(self) -> list[dict]:
        """The flagged images with the highest p_pneumonia, highest first."""
        return [row for _, _, row in sorted(self.top, key=lambda item: (-item[0], item[1]))]

    def drift(self) -> dict[str, dict]:
        """Per statistic: reference and run shares, PSI, p-value and the verdict."""
        report = {}
        for name, h in self.histograms.items():
            result = compare_counts(h.reference, h.run, self.rule)
            result["title"] = h.stat.title
            if h.stat.numeric:
                result["reference_mean"] = round(h.reference_mean, 6)
                result["run_mean"] = round(h.run_sum / h.run_n, 6) if h.run_n else None
            else:
                result["reference_share"] = _shares(h.stat.categories, h.reference)
                result["run_share"] = _shares(h.stat.categories, h.run)
            report[name] = result
        return report

    def flagged_rates(self) -> dict[str, dict]:
        """Shares of images flagged (binary call pneumonia, anomaly, either): run and
        reference."""
        rates = {}
        for key, count in self.flagged.items():
            ref = self.reference_flagged
            rates[key] = {
                "run": round(count / self.images, 4) if self.images else None,
                "reference": round(ref[key] / ref["images"], 4) if ref and ref["images"] else None,
            }
        return rates


_TOP_COLUMNS = (
    "image_uri",
    "p_pneumonia",
    "pred_binary",
    "pred_class",
    "p_normal",
    "p_bacterial",
    "p_viral",
    "knn_label",
    "knn_neighbors",
    "knn_distances",
    "anomaly_score",
    "is_anomaly",
    "heatmap_uri",
)


def _flags(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the binary call is pneumonia; the anomaly flag is set."""
    binary = np.array([v == BINARY_LABELS[1] for v in table.column("pred_binary").to_pylist()])
    anomaly = np.array([bool(v) for v in table.column("is_anomaly").to_pylist()])
    return binary, anomaly


def _flag_counts(binary: np.ndarray, anomaly: np.ndarray) -> dict[str, int]:
    return {
        "images": len(binary),
        "binary": int(binary.sum()),
        "anomaly": int(anomaly.sum()),
        "either": int((binary | anomaly).sum()),
    }


def _shares(categories: tuple[str, ...], counts: np.ndarray) -> dict[str, float | None]:
    total = counts.sum()
    return {
        c: (round(float(n / total), 4) if total else None)
        for c, n in zip(categories, counts, strict=True)
    }
