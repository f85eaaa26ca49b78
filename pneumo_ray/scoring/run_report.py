"""The report of one scoring run: ``OUT/_reports/<run>/summary.json`` and ``report.html``.

The HTML is one self-contained file (every plot and image embedded as a data: URI, no script,
no link outside it), so it opens from a local disk or an S3 download with no server. It shows
the counts, the drift verdicts against the bundle's reference with one plot per
monitored statistic, the flagged rates, and the top flagged images with their Grad-CAM
overlays and their KNN neighbours (real training images).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json

import matplotlib

matplotlib.use("Agg")  # jobs run headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pneumo_ray.io import stores  # noqa: E402
from pneumo_ray.monitoring.drift import STATISTICS, RunProfile  # noqa: E402

SUMMARY_FILE = "summary.json"
HTML_FILE = "report.html"
THUMBNAIL = 96
NEIGHBOURS_SHOWN = 5  # of the KNN's k (up to 51): the nearest
SHOWN_ERRORS = 20


def build_summary(run: dict, profile: RunProfile, card: dict) -> dict:
    """summary.json: the run's counts, flagged rates and drift verdicts."""
    drift = profile.drift()
    drifted = [name for name, result in drift.items() if result["drift"]]
    inputs = [str(uri) for uri in run.get("inputs", [])]
    return {
        "site": site_standing(card, inputs, profile, drifted),
        **run,
        "model_version": card.get("model_version"),
        "thresholds": {
            "binary": card["models"]["binary"]["threshold"],
            "anomaly": card["models"]["autoencoder"]["threshold"],
            "anomaly_score": card["models"]["autoencoder"]["score"],
        },
        "reference": {
            "images": profile.reference_images,
            "what": "the bundle's outputs on its validation split (drift_reference.parquet)"
            if profile.reference_images
            else "none: the bundle was trained before pneumo_ray kept one (retrain to check drift)",
        },
        "drift_rule": profile.rule,
        "drift": drift,
        "drifted": drifted,
        "flagged": profile.flagged_rates(),
        "images_profiled": profile.images,
        "scope": {
            "available": "scope.pt" in card.get("files", {}),
            "what": "in scope: a frontal chest X-ray of a child (card: scope); drift and flag "
            "rates are over the images in scope",
            "out_of_scope": dict(sorted(profile.out_of_scope.items(), key=lambda kv: -kv[1])),
            "examples": profile.out_of_scope_examples,
        },
    }


def adapted_to(card: dict, inputs: list[str]) -> bool:
    """Whether the bundle was adapted (pneumo-adapt) to a store that holds, or is held by, one
    of ``inputs``."""

    def inside(a: str, b: str) -> bool:
        a, b = a.rstrip("/"), b.rstrip("/")
        return a == b or a.startswith(b + "/") or b.startswith(a + "/")

    stores_adapted = [
        uri
        for record in card.get("site_adaptations", [])
        for uri in [*record.get("inputs", []), record.get("store")]
        if uri
    ]
    return any(inside(uri, store) for uri in inputs for store in stores_adapted)


def site_standing(card: dict, inputs: list[str], profile: RunProfile, drifted: list[str]) -> dict:
    """Where the bundle stands at this store: adapted to it or not, and, when it was never
    adapted and tonight drifts, the class balance estimated from tonight's p_pneumonia (EM on
    the run's sample) and what to do."""
    from pneumo_ray.models.calibration import em_class_prior, training_class_prior

    adapted = adapted_to(card, inputs)
    standing = {"adapted_to_store": adapted, "act": bool(drifted) and not adapted}
    if not standing["act"] or not profile.sample_p or "training" not in card:
        standing["act"] = False
        return standing
    trained = training_class_prior(card)["binary"]
    p = np.asarray(profile.sample_p, dtype=np.float64)
    site = float(em_class_prior(np.stack([1 - p, p], axis=1), [1 - trained, trained])[1])
    standing.update(
        class_balance={"pneumonia_training": trained, "pneumonia_estimated": site,
                       "from_images": len(p)},
        line=(
            f"bundle {card.get('model_version')} was never adapted to this store and tonight's "
            f"images drift from its reference ({', '.join(drifted)}); estimated pneumonia "
            f"share {site:.2f} (EM on {len(p):,} of tonight's images) against {trained:.2f} in "
            "training. Adapt it from the store's own images: pneumo-adapt --model MODEL "
            f"--unlabelled {' '.join(inputs)} --output ADAPTED; labels for the images on the "
            "labelling list set the operating point further (pneumo-adapt --data LIST)"
        ),
    )  # fmt: skip
    return standing


def write_run_report(report_dir: str, summary: dict, profile: RunProfile) -> str:
    """Write summary.json and report.html under ``report_dir``; returns the HTML's URI."""
    stores.write_bytes(stores.join(report_dir, SUMMARY_FILE), stores.json_bytes(summary))
    uri = stores.join(report_dir, HTML_FILE)
    stores.write_bytes(uri, render_html(summary, profile).encode("utf-8"))
    return uri


# --- plots -----------------------------------------------------------------------------------


def _png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figure_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return _png_data_uri(buffer.getvalue())


def _distribution_plot(profile: RunProfile, name: str, verdict: dict) -> str:
    """Run against reference for one statistic: densities (numeric) or shares (categorical)."""
    h = profile.histograms[name]
    figure, axis = plt.subplots(figsize=(4.6, 2.8))
    ref = h.reference_plot / max(1, h.reference_plot.sum())
    run = h.run_plot / max(1, h.run_plot.sum())
    if h.stat.numeric:
        centers = (h.plot_edges[:-1] + h.plot_edges[1:]) / 2
        width = h.plot_edges[1] - h.plot_edges[0]
        axis.bar(centers, ref, width=width, color="#bbbbbb", label="bundle reference")
        axis.step(centers, run, where="mid", color="#d62728", linewidth=1.8, label="this run")
        axis.set_ylabel("share of images")
    else:
        x = np.arange(len(h.stat.categories))
        axis.bar(x - 0.2, ref, width=0.4, color="#bbbbbb", label="bundle reference")
        axis.bar(x + 0.2, run, width=0.4, color="#d62728", label="this run")
        axis.set_xticks(x, h.stat.categories)
        axis.set_ylabel("share of images")
    psi = verdict["psi"]
    state = "DRIFT" if verdict["drift"] else "ok"
    axis.set_title(
        f"{h.stat.title}: {state}" + (f" (PSI {psi:.2f})" if psi is not None else ""),
        fontsize=9,
        color="#b00000" if verdict["drift"] else "black",
    )
    axis.legend(fontsize=7)
    axis.tick_params(labelsize=7)
    figure.tight_layout()
    return _figure_uri(figure)


def _thumbnail_uri(image_uri: str) -> str | None:
    """A small JPEG of an image (a KNN neighbour), or None when it cannot be read here."""
    from PIL import Image

    from pneumo_ray.io.images import decode_image

    try:
        pixels = decode_image(stores.read_bytes(image_uri), THUMBNAIL)
    except Exception:  # a neighbour the driver cannot read is named, not shown
        return None
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- HTML ------------------------------------------------------------------------------------

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f4f4f4}.drift{color:#b00000;font-weight:bold}.ok{color:#176117}
.banner{padding:10px 14px;border-radius:4px;font-size:15px;margin:12px 0}
.banner.drift{background:#fde8e8;border:1px solid #e0a0a0}
.banner.ok{background:#e8f6e8;border:1px solid #a0d0a0}
.plots img{margin:4px}.case{border:1px solid #ddd;margin:10px 0;padding:8px}
.case img{max-width:100%}.neighbours img{width:96px;height:96px;margin-right:4px}
.neighbours figure{display:inline-block;margin:0 6px 0 0;font-size:11px;text-align:center}
code{font-size:12px}
"""


def _e(value) -> str:
    return html.escape(str(value))


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _e(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def render_html(summary: dict, profile: RunProfile) -> str:
    """The self-contained report page."""
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>pneumo_ray scoring run {_e(summary.get('run_id'))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Scoring run {_e(summary.get('run_id'))}</h1>",
        f"<p>Model <code>{_e(summary.get('model_version'))}</code>; output "
        f"<code>{_e(summary.get('output'))}</code>; report written "
        f"{_e(dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC'))}.</p>",
        _banner(summary),
        "<h2>Counts</h2>",
        _counts(summary),
        "<h2>Flagged rates</h2>",
        _flagged(summary),
        "<h2>Out of scope</h2>",
        _scope(summary),
        "<h2>Drift against the bundle's reference</h2>",
        _drift(summary, profile),
        "<h2>Top flagged images</h2>",
        _cases(profile),
        _errors(summary),
        "</body></html>",
    ]
    return "\n".join(parts)


def _scope(summary: dict) -> str:
    """Out-of-scope images by reason, and a few of them."""
    scope = summary["scope"]
    if not scope["available"]:
        note = (
            "<p>The scope check was not available: this bundle has no scope reference (trained "
            "before it existed); DICOM metadata rules still apply.</p>"
        )
    else:
        note = f"<p>{_e(scope['what'])}.</p>"
    if not scope["out_of_scope"]:
        return note + "<p>No image was out of scope.</p>"
    table = _table(
        ["reason", "images"], [[_e(kind), _fmt(n)] for kind, n in scope["out_of_scope"].items()]
    )
    figures = []
    for example in scope["examples"]:
        thumbnail = _thumbnail_uri(example["image_uri"])
        picture = f"<img alt='' src='{thumbnail}'>" if thumbnail else ""
        figures.append(
            f"<figure>{picture}<figcaption><code>{_e(example['image_uri'])}</code><br>"
            f"{_e(example['scope_reason'])}</figcaption></figure>"
        )
    return note + table + f"<div class='neighbours'>{''.join(figures)}</div>"


def _banner(summary: dict) -> str:
    if not summary["reference"]["images"]:
        return f"<div class='banner drift'>No drift check: {_e(summary['reference']['what'])}</div>"
    if not summary["images_profiled"]:
        return "<div class='banner ok'>No new images were scored in this run.</div>"
    if summary["drifted"]:
        names = ", ".join(summary["drift"][n]["title"] for n in summary["drifted"])
        site = summary.get("site", {})
        advice = (
            f"<div class='banner drift'>{_e(site['line'])}"
            + (f" Labelling list: {_e(site['labelling_list'])}" if site.get("labelling_list")
               else "")
            + "</div>"
            if site.get("act")
            else ""
        )  # fmt: skip
        return f"<div class='banner drift'>DRIFT detected in: {_e(names)}</div>" + advice
    return "<div class='banner ok'>No drift: every statistic is within the card's rule.</div>"


def _counts(summary: dict) -> str:
    permanent = summary.get("failed", 0) - summary.get("transient", 0)
    rows = [
        ["images listed", _fmt(summary.get("listed"))],
        ["already scored (skipped)", _fmt(summary.get("skipped"))],
        ["scored", _fmt(summary.get("scored"))],
        ["errors: permanent (corrupt, not an image, missing)", _fmt(permanent)],
        ["errors: transient (retried next run)", _fmt(summary.get("transient"))],
        ["parts committed", _fmt(summary.get("parts"))],
        ["throughput (images/s)", _fmt(summary.get("images_per_s"), 1)],
        ["heatmaps written", _fmt(summary.get("heatmaps"))],
    ]
    return _table(["", "images"], rows)


def _flagged(summary: dict) -> str:
    names = {
        "binary": f"binary call pneumonia (p_pneumonia >= {summary['thresholds']['binary']:.3f})",
        "anomaly": f"anomaly ({summary['thresholds']['anomaly_score']} score > "
        f"{summary['thresholds']['anomaly']:.4g})",
        "either": "either (flagged)",
    }
    rows = [
        [_e(names[key]), _fmt(rate["run"]), _fmt(rate["reference"])]
        for key, rate in summary["flagged"].items()
    ]
    return _table(["flag", "this run", "bundle reference"], rows)


def _drift(summary: dict, profile: RunProfile) -> str:
    if not summary["drift"]:
        return "<p>No reference in this bundle: nothing to compare against.</p>"
    rule = summary["drift_rule"]
    rows = []
    for name, result in summary["drift"].items():
        if name in profile.histograms and profile.histograms[name].stat.numeric:
            where = f"mean {_fmt(result['reference_mean'], 4)} / {_fmt(result['run_mean'], 4)}"
        else:
            where = ", ".join(
                f"{k} {_fmt(v, 2)} / {_fmt(result['run_share'][k], 2)}"
                for k, v in result["reference_share"].items()
            )
        verdict = "<span class='drift'>DRIFT</span>" if result["drift"] else "<span class='ok'>ok"
        verdict += "" if result["drift"] else "</span>"
        p_value = "-" if result["p_value"] is None else f"{result['p_value']:.2g}"
        rows.append([_e(result["title"]), where, _fmt(result["psi"]), p_value, verdict])
    table = _table(["statistic", "reference / this run", "PSI", "p-value", "verdict"], rows)
    plots = "".join(
        f"<img class='plot' alt='{_e(name)}' src='{_distribution_plot(profile, name, result)}'>"
        for name, result in summary["drift"].items()
    )
    return (
        f"<p>Rule (from the bundle's card): {_e(rule['rule'])}; psi {rule['psi']}, p_value "
        f"{rule['p_value']}. Reference: {summary['reference']['images']} validation images.</p>"
        + table
        + f"<div class='plots'>{plots}</div>"
    )


def _cases(profile: RunProfile) -> str:
    rows = profile.top_flagged()
    if not rows:
        return "<p>No image was flagged.</p>"
    cards = []
    for row in rows:
        heatmap = ""
        if row.get("heatmap_uri"):
            try:
                png = stores.read_bytes(row["heatmap_uri"])
                heatmap = f"<img alt='Grad-CAM' src='{_png_data_uri(png)}'>"
            except OSError:
                heatmap = f"<p>heatmap not readable: <code>{_e(row['heatmap_uri'])}</code></p>"
        neighbours = []
        nearest = zip(
            (row.get("knn_neighbors") or [])[:NEIGHBOURS_SHOWN],
            (row.get("knn_distances") or [])[:NEIGHBOURS_SHOWN],
            strict=False,
        )
        for uri, distance in nearest:
            thumb = _thumbnail_uri(uri)
            name = _e(uri.rsplit("/", 1)[-1])
            picture = f"<img alt='{name}' src='{thumb}'>" if thumb else ""
            neighbours.append(
                f"<figure>{picture}<figcaption>{name}<br>d={distance:.3f}</figcaption></figure>"
            )
        cards.append(
            "<div class='case'>"
            f"<b>{_e(row['image_uri'])}</b><br>p_pneumonia {_fmt(row['p_pneumonia'])}; "
            f"three-class {_e(row['pred_class'])} (normal {_fmt(row['p_normal'], 2)}, bacterial "
            f"{_fmt(row['p_bacterial'], 2)}, viral {_fmt(row['p_viral'], 2)}); KNN "
            f"{_e(row['knn_label'])}; anomaly score {_fmt(row['anomaly_score'], 4)}"
            f"{' (flagged)' if row['is_anomaly'] else ''}<br>{heatmap}"
            f"<div class='neighbours'>Nearest KNN neighbours (training images):<br>"
            f"{''.join(neighbours)}</div></div>"
        )
    return "".join(cards)


def _errors(summary: dict) -> str:
    errors = summary.get("errors") or []
    if not errors:
        return ""
    rows = [[f"<code>{_e(uri)}</code>", _e(why)] for uri, why in errors[:SHOWN_ERRORS]]
    more = len(errors) - SHOWN_ERRORS
    tail = f"<p>... and {more} more (the error column of the Parquet).</p>" if more > 0 else ""
    return "<h2>Errors</h2>" + _table(["image", "error"], rows) + tail


def read_summary(report_dir: str) -> dict:
    """A run's summary.json."""
    return json.loads(stores.read_bytes(stores.join(report_dir, SUMMARY_FILE)))


__all__ = ["STATISTICS", "build_summary", "read_summary", "render_html", "write_run_report"]
