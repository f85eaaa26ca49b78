"""MLflow tracking of the training job (--mlflow-tracking-uri), against a local file store."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from pneumo_ray.training.tracking import NullTracker, tracker


@pytest.fixture(scope="module")
def mlflow_run(trained):
    """The MLflow run the session's training job recorded (conftest passes the flag)."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    bundle, _ = trained
    client = MlflowClient(str(bundle.parent / "mlruns"))
    experiment = client.get_experiment_by_name("pneumo_ray")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    return client, runs[0], bundle


def test_parameters_epochs_and_test_metrics_are_recorded(mlflow_run):
    client, run, bundle = mlflow_run
    card = json.loads((bundle / "card.json").read_text())
    config = card["training"]["config"]
    assert run.info.status == "FINISHED"
    assert run.data.params["image_size"] == str(config["image_size"])
    assert run.data.params["binary.lr"] == str(config["binary"]["lr"])
    assert run.data.tags["model_version"] == card["model_version"]
    for network in ("binary", "multiclass", "autoencoder"):
        history = card["training"]["history"][network]
        logged = client.get_metric_history(run.info.run_id, f"{network}/val_loss")
        assert [m.step for m in logged] == [h["epoch"] for h in history]
        assert [m.value for m in logged] == pytest.approx([h["val_loss"] for h in history])
    auc = card["metrics"]["test"]["binary"]["roc_auc"]
    assert run.data.metrics["test/binary/roc_auc"] == pytest.approx(auc)


def test_the_report_and_the_bundle_are_artifacts(mlflow_run):
    client, run, bundle = mlflow_run
    card = json.loads((bundle / "card.json").read_text())
    bundled = {a.path.split("/", 1)[1] for a in client.list_artifacts(run.info.run_id, "bundle")}
    assert bundled == {"card.json", *card["files"]}
    report = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/metrics.json" in report and any(p.endswith(".png") for p in report)
    local = client.download_artifacts(run.info.run_id, "bundle/card.json")
    assert json.loads(Path(local).read_text())["model_version"] == card["model_version"]


def test_without_the_flag_mlflow_is_not_even_imported():
    sys.modules.pop("mlflow", None)
    quiet = tracker(None)
    assert type(quiet) is NullTracker
    quiet.start({"output": "/o"})
    quiet.log_history("binary", [{"epoch": 1, "val_loss": 0.5}])
    quiet.finish({}, "/o")
    assert "mlflow" not in sys.modules
