"""Experiment tracking: the training job's parameters, epochs, report and bundle in MLflow.

With ``--mlflow-tracking-uri`` the training job opens one MLflow run when it starts, logs the
settings as parameters, each network's epochs (train/val loss and accuracy, images/s, learning
rate; step = epoch) as soon as that network has trained, and at the end the test metrics, the
report folder and the bundle (card, weights, references) as artifacts. A run that fails is
ended as FAILED. Without the flag MLflow is never imported and nothing changes.

The driver logs (not the Ray Train workers): one writer, whatever the number of workers, and
nothing to install on worker nodes.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator

from pneumo_ray.io import stores

DEFAULT_EXPERIMENT = "pneumo_ray"


def _flatten(prefix: str, value) -> Iterator[tuple[str, object]]:
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _flatten(f"{prefix}.{key}" if prefix else str(key), inner)
    else:
        yield prefix, value


def _numbers(prefix: str, value) -> Iterator[tuple[str, float]]:
    """The finite numeric leaves of nested metrics, as ``a/b/c`` names (lists are skipped)."""
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _numbers(f"{prefix}/{key}" if prefix else str(key), inner)
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        yield prefix, float(value)


class NullTracker:
    """No tracking: every call does nothing."""

    def start(self, params: dict) -> None:
        pass

    def log_history(self, network: str, history: list[dict]) -> None:
        pass

    def finish(self, card: dict, bundle_uri: str) -> None:
        pass

    def fail(self) -> None:
        pass


class MlflowTracker(NullTracker):
    """One MLflow run per training job, at ``tracking_uri`` in ``experiment``."""

    def __init__(self, tracking_uri: str, experiment: str = DEFAULT_EXPERIMENT) -> None:
        if "://" not in tracking_uri or tracking_uri.startswith("file:"):
            # MLflow 3 refuses its file store unless asked; a local folder is what a laptop or a
            # shared mount holds, and what the tests use.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # its INFO lines: not news
        self.mlflow = mlflow
        self.tracking_uri, self.experiment = tracking_uri, experiment
        self.run_id: str | None = None

    def start(self, params: dict) -> None:
        mlflow = self.mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_experiment(self.experiment)
        run = mlflow.start_run(run_name=f"train {os.path.basename(params.get('output', ''))}")
        self.run_id = run.info.run_id
        flat = {key: str(value)[:6000] for key, value in _flatten("", params)}
        mlflow.log_params(flat)
        print(
            f"[pneumo_ray] MLflow run {self.run_id} in experiment {self.experiment!r} at "
            f"{self.tracking_uri}",
            flush=True,
        )

    def log_history(self, network: str, history: list[dict]) -> None:
        for metrics in history:
            step = int(metrics["epoch"])
            values = {f"{network}/{k}": float(v) for k, v in metrics.items() if k != "epoch"}
            self.mlflow.log_metrics(values, step=step)

    def finish(self, card: dict, bundle_uri: str) -> None:
        mlflow = self.mlflow
        metrics = dict(_numbers("test", card.get("metrics", {}).get("test", {})))
        if metrics:
            mlflow.log_metrics(metrics)
        mlflow.set_tag("model_version", card.get("model_version", ""))
        with tempfile.TemporaryDirectory(prefix="pneumo_ray_mlflow_") as scratch:
            names = ["card.json", *card.get("files", {})]
            for name in names:
                target = os.path.join(scratch, "bundle", name)
                _mkdirs(target)
                with open(target, "wb") as handle:
                    handle.write(stores.read_bytes(stores.join(bundle_uri, name)))
            report = stores.join(bundle_uri, "report")
            if stores.exists(report):
                root = stores.normalize(report)
                for entry in stores.list_files(root):
                    relative = stores.parts_below(root, entry.uri)
                    target = os.path.join(scratch, "report", *relative)
                    _mkdirs(target)
                    with open(target, "wb") as handle:
                        handle.write(stores.read_bytes(entry.uri))
            mlflow.log_artifacts(scratch)
        mlflow.end_run()

    def fail(self) -> None:
        if self.run_id is not None and self.mlflow.active_run() is not None:
            self.mlflow.end_run(status="FAILED")


def _mkdirs(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)


def tracker(tracking_uri: str | None, experiment: str = DEFAULT_EXPERIMENT) -> NullTracker:
    """MLflow tracking when a tracking URI is given, else none."""
    return MlflowTracker(tracking_uri, experiment) if tracking_uri else NullTracker()
