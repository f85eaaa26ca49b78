"""The command lines (pneumo_ray.cli): one validation after every override, one line per refusal."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pneumo_ray import cli

REPO = Path(__file__).resolve().parents[1]
TRAIN = ["--data", "/s", "--output", "/o"]
SCORE = ["--model", "/m", "--input", "/i", "--output", "/o"]
EVALUATE = ["--model", "/m", "--data", "/s"]
ADAPT = ["--model", "/m", "--data", "/s", "--output", "/a"]

BAD_VALUES = [
    # (command, flags, the flag the message must name)
    ("train", ["--image-size", "30"], "--image-size"),
    ("train", ["--image-size", "big"], "--image-size"),
    ("train", ["--batch-size", "0"], "--batch-size"),
    ("train", ["--epochs", "0"], "--epochs"),
    ("train", ["--binary-epochs", "0"], "--binary-epochs"),
    ("train", ["--epochs", "5", "--multiclass-epochs", "-1"], "--multiclass-epochs"),
    ("train", ["--autoencoder-epochs", "0"], "--autoencoder-epochs"),
    ("train", ["--lr-binary", "0"], "--lr-binary"),
    ("train", ["--lr-multiclass", "-1e-3"], "--lr-multiclass"),
    ("train", ["--lr-autoencoder", "nan"], "--lr-autoencoder"),
    ("train", ["--multiclass-patience", "-1"], "--multiclass-patience"),
    ("train", ["--lr-schedule", "step"], "--lr-schedule"),
    ("train", ["--weight-decay", "-1"], "--weight-decay"),
    ("train", ["--limit", "0"], "--limit"),
    ("train", ["--val-fraction", "1.5"], "--val-fraction"),
    ("train", ["--num-workers", "4-2"], "--num-workers"),
    ("train", ["--precision", "fp8"], "--precision"),
    ("train", ["--cpus-per-worker", "0"], "--cpus-per-worker"),
    ("train", ["--max-failures", "-1"], "--max-failures"),
    ("train", ["--knn-k", "0"], "--knn-k"),
    ("train", ["--knn-k", "many"], "--knn-k"),
    ("train", ["--knn-features", "pixels"], "--knn-features"),
    ("train", ["--anomaly-percentile", "20"], "--anomaly-percentile"),
    ("train", ["--anomaly-score", "ssim"], "--anomaly-score"),
    ("train", ["--anomaly-k", "0"], "--anomaly-k"),
    ("train", ["--autoencoder-masking", "2"], "--autoencoder-masking"),
    ("train", ["--architecture", "vgg"], "--architecture"),
    ("train", ["--pretrained", "imagenet"], "--pretrained"),  # the seed CNN has none
    ("train", ["--architecture", "resnet18", "--pretrained", "/no/such.pth"], "--pretrained"),
    ("train", ["--normalization", "clahe"], "--normalization"),
    ("train", ["--tta", "rotate"], "--tta"),
    ("train", ["--binary-score", "max"], "--binary-score"),
    ("train", ["--binary-threshold", "half"], "--binary-threshold"),
    ("train", ["--target-sensitivity", "0.3"], "--target-sensitivity"),
    ("score", ["--batch-size", "0"], "--batch-size"),
    ("score", ["--commit-every", "0"], "--commit-every"),
    ("score", ["--lock-ttl", "0"], "--lock-ttl"),
    ("score", ["--num-workers", "0"], "--num-workers"),
    ("score", ["--decode", "fpga"], "--decode"),
    ("score", ["--threads-per-actor", "0"], "--threads-per-actor"),
    ("score", ["--actors-per-gpu", "0"], "--actors-per-gpu"),
    ("train", ["--lr-scaling", "cubic"], "--lr-scaling"),
    ("score", ["--rescore", "--only-new"], "--only-new"),
    ("score", ["--heatmaps", "some"], "--heatmaps"),
    ("score", ["--fail-on-drift=yes"], "--fail-on-drift"),
    ("train", ["--mlflow-tracking-uri", ""], "--mlflow-tracking-uri"),
    ("train", ["--mlflow-tracking-uri", "/t", "--mlflow-experiment", " "], "--mlflow-experiment"),
    ("train", ["--verbose=1"], "--verbose"),
    ("train", ["--log-file"], "--log-file"),
    ("evaluate", ["--bootstrap", "-1"], "--bootstrap"),
    ("evaluate", ["--split", "dev"], "--split"),
    ("adapt", ["--target-sensitivity", "1.5"], "--target-sensitivity"),
    ("adapt", ["--anomaly-percentile", "20"], "--anomaly-percentile"),
    ("adapt", ["--binary-threshold", "half"], "--binary-threshold"),
    ("adapt", ["--knn", "replace"], "--knn"),
    ("adapt", ["--normals", "drop"], "--normals"),
    ("adapt", ["--score-map=yes"], "--score-map"),
]
MAINS = {
    "train": cli.train_main,
    "score": cli.score_main,
    "evaluate": cli.evaluate_main,
    "adapt": cli.adapt_main,
}
REQUIRED = {"train": TRAIN, "score": SCORE, "evaluate": EVALUATE, "adapt": ADAPT}


@pytest.mark.parametrize(("command", "flags", "flag"), BAD_VALUES)
def test_every_bad_value_is_refused_with_one_line_naming_its_flag(command, flags, flag, capsys):
    with pytest.raises(SystemExit) as refused:
        MAINS[command]([*REQUIRED[command], *flags], prog=f"pneumo-{command}")
    assert refused.value.code not in (0, None)
    err = capsys.readouterr().err if isinstance(refused.value.code, int) else refused.value.code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"pneumo-{command}: error:") and flag in lines[0], lines[0]


def test_overrides_apply_in_order_and_are_validated_after():
    args = cli.train_parser().parse_args(
        [*TRAIN, "--epochs", "5", "--binary-epochs", "8", "--weight-decay", "1e-4",
         "--lr-schedule", "cosine", "--multiclass-patience", "0", "--lr-autoencoder", "2e-3",
         "--batch-size", "128", "--lr-scaling", "sqrt"]
    )  # fmt: skip
    config = cli.train_config(args)
    assert config.cluster.lr_scaling == "sqrt" and config.lr_factor == 2.0
    assert (config.binary.epochs, config.multiclass.epochs, config.autoencoder.epochs) == (8, 5, 5)
    assert config.binary.weight_decay == config.multiclass.weight_decay == 1e-4
    assert config.autoencoder.weight_decay == 0.0  # the CNNs' only
    assert {config.network(n).lr_schedule for n in cli.NETWORK_NAMES} == {"cosine"}
    assert config.multiclass.early_stopping_patience is None  # 0 = off
    assert config.autoencoder.lr == 2e-3 and config.binary.lr == 3e-5  # the design's default
    # Without flags, the design's settings, and so the design's run keys.
    plain = cli.train_config(cli.train_parser().parse_args(TRAIN))
    from pneumo_ray.config import TrainConfig

    design = TrainConfig.from_flat(data="/s", output="/o")
    for name in cli.NETWORK_NAMES:
        assert plain.run_key(name) == design.run_key(name)


def test_constants_repeated_for_a_torch_free_help_match_their_modules():
    from pneumo_ray.models.knn import KNN_K_CANDIDATES
    from pneumo_ray.training.evaluation import BOOTSTRAP_REPLICATES

    assert tuple(KNN_K_CANDIDATES) == cli.KNN_K_CANDIDATES
    assert cli.BOOTSTRAP_REPLICATES == BOOTSTRAP_REPLICATES


@pytest.mark.parametrize(
    "command", ["pneumo-train", "pneumo-score", "pneumo-evaluate", "pneumo-adapt"]
)
def test_console_scripts_are_installed_and_refuse_in_one_line(command):
    script = Path(sys.executable).parent / command
    assert script.exists(), f"{command} is not installed beside {sys.executable}"
    shown = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and shown.stdout.startswith(f"usage: {command}")
    refused = subprocess.run([script, "--no-such-flag"], capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"{command}: error: the following arguments are required: "
        + ", ".join(
            {"pneumo-train": ["--data", "--output"],
             "pneumo-score": ["--model", "--input", "--output"],
             "pneumo-evaluate": ["--model", "--data"],
             "pneumo-adapt": ["--model", "--output"]}[command]
        )
    ]  # fmt: skip
    if command == "pneumo-adapt":  # labelled or unlabelled images of the site: one of them
        refused = subprocess.run([script, "--model", "m", "--output", "o"], capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 2
        assert "one of the arguments --data --unlabelled is required" in refused.stderr


def test_job_files_are_thin_wrappers_without_path_edits():
    for name in ("train", "score", "evaluate", "adapt", "quality"):
        text = (REPO / "jobs" / f"{name}.py").read_text()
        assert "sys.path" not in text, name
    for name in ("train", "score", "evaluate", "adapt"):
        result = subprocess.run(
            [sys.executable, f"jobs/{name}.py", "--help"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0 and result.stdout.startswith(f"usage: {name}.py")
