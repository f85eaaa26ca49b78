"""GPU device check: GPU training and GPU scoring on one machine, in a few minutes.

    python benchmarks/device_check.py --data STORE --fullres FOLDER [--images 5000] [--output DIR]

1. Trains the binary network of the ``gpu`` quality profile (EfficientNet-Lite2 from its
   packaged ImageNet weights at 256 px; ``--architecture seed`` for the design's CNN) for one
   epoch with ``--use-gpu``, once in bf16 and once in fp32 (Ray Train, one GPU worker):
   images/s and peak GPU memory of each.
2. Scores ``--images`` full-resolution X-rays (FOLDER's files replicated by symbolic links)
   with GPU model actors, once with CPU decode (Ray Data tasks) and once with GPU decode
   (nvJPEG in the actors): images/s and peak GPU memory of each.
3. Scores one copy of each original on CPU (CPU actors, CPU decode) and prints the largest
   difference of every output column between that and each GPU run.

Prints a summary and writes it as JSON to DIR/device_check.json. ``--cpu`` runs the same steps
without a GPU (to check the script itself on a CPU-only machine).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.benchmark_score import replicate, untrained_bundle  # noqa: E402
from pneumo_ray.config import ARCHITECTURES, LITE_ARCHITECTURES, TrainConfig  # noqa: E402
from pneumo_ray.io import data  # noqa: E402
from pneumo_ray.io.labels import split_by_patient  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402
from pneumo_ray.scoring.score import ScoreConfig, read_scores, run_scoring  # noqa: E402
from pneumo_ray.training.loop import Scaling, fit_network  # noqa: E402

COMPARED = (
    "p_pneumonia",
    "p_normal",
    "p_bacterial",
    "p_viral",
    "reconstruction_mse",
    "anomaly_score",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="labelled store (Kaggle layout)")
    parser.add_argument("--fullres", required=True, help="folder of full-resolution JPEGs")
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--image-size", type=int, default=256, help="the gpu profile's")
    parser.add_argument(
        "--architecture",
        default="efficientnet_lite2",
        choices=ARCHITECTURES,
        help="the CNNs' (default: the gpu profile's, from ImageNet weights where it has them)",
    )
    parser.add_argument("--batch-size", type=int, default=128, help="scoring batch")
    parser.add_argument("--output", default="out/device_check")
    parser.add_argument("--cpu", action="store_true", help="no GPU: check the script itself")
    return parser.parse_args(argv)


class GpuMemorySampler(threading.Thread):
    """Peak memory.used of GPU 0 over every process, from nvidia-smi (MiB)."""

    def __init__(self, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._halt = interval, 0.0, threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout
                self.peak = max(self.peak, float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            time.sleep(self.interval)

    def __enter__(self) -> GpuMemorySampler:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._halt.set()
        self.join()


def train_binary(args, precision: str, splits) -> dict:
    """One epoch of the binary network on one GPU worker; its figures and weights."""
    config = TrainConfig.from_flat(
        data=args.data,
        output=str(Path(args.output) / f"train-{precision}"),
        image_size=args.image_size,
        epochs=1,
        use_gpu=not args.cpu,
        precision=precision,
        num_workers=1,
        architecture=args.architecture,
        pretrained="imagenet" if args.architecture in LITE_ARCHITECTURES else None,
        backbone_lr_scale=0.1 if args.architecture in LITE_ARCHITECTURES else 1.0,
    )
    scaling = Scaling(1, 1, use_gpu=not args.cpu, cpus_per_worker=4 if not args.cpu else 1)
    train, val = splits
    started = time.perf_counter()
    with GpuMemorySampler() as sampler:
        network = fit_network("binary", config, scaling, train.dataset, val.dataset, [1.5, 0.75])
    epoch = network.history[-1]
    return {
        "precision": precision,
        "seconds_with_ray_start": round(time.perf_counter() - started, 1),
        "train_images_per_s": round(epoch["images_per_s"], 1),
        "val_accuracy": round(epoch["val_accuracy"], 3),
        "torch_peak_gpu_mib": round(epoch.get("gpu_peak_mib", 0.0)),
        "nvidia_smi_peak_gpu_mib": round(sampler.peak),
        "network": network,
    }


def score(args, bundle: str, folder: Path, name: str, use_gpu: bool, decode: str) -> tuple:
    config = ScoreConfig(
        model=bundle,
        inputs=[str(folder)],
        output=str(Path(args.output) / f"scores-{name}"),
        batch_size=args.batch_size,
        use_gpu=use_gpu,
        decode=decode,
        rescore=True,
        heatmaps="none",  # the scoring path as before; heatmaps: benchmark_inference
    )
    with GpuMemorySampler() as sampler:
        summary = run_scoring(config)
    table = read_scores(config.output, latest=True).to_pandas()
    # Replicas are named <index>_<original name>.
    table["original"] = table["image_uri"].str.rsplit("/", n=1).str[-1].str.split("_", n=1).str[1]
    figures = {
        "images": summary.scored + summary.failed,
        "failed": summary.failed,
        "images_per_s": round(summary.images_per_s, 1),
        "nvidia_smi_peak_gpu_mib": round(sampler.peak),
    }
    return figures, table


def largest_differences(reference, table) -> dict:
    """Per column, the largest |GPU - CPU| over every scored row (matched by original)."""
    ref = reference.drop_duplicates("original").set_index("original")
    joined = table.merge(
        ref[list(COMPARED) + ["pred_binary", "pred_class"]],
        left_on="original",
        right_index=True,
        suffixes=("", "_cpu"),
    )
    out = {
        f"max_abs_diff_{c}": float(np.max(np.abs(joined[c] - joined[f"{c}_cpu"]))) for c in COMPARED
    }
    out["pred_binary_agreement"] = float(
        np.mean(joined["pred_binary"] == joined["pred_binary_cpu"])
    )
    out["pred_class_agreement"] = float(np.mean(joined["pred_class"] == joined["pred_class_cpu"]))
    return out


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(num_gpus=0 if args.cpu else None)
    report: dict = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }
    print(f"device check on {report['device']}, {report['cpus']} CPUs", flush=True)

    images = [i for i in data.list_store(args.data) if i.split in ("train", "val")]
    train_images, val_images = split_by_patient(images, 0.15, seed=0)
    splits = (
        data.decode_split(train_images, args.image_size, seed=0),
        data.decode_split(val_images, args.image_size, seed=1),
    )
    report["train_images"] = splits[0].count
    trained = {}
    for precision in ("bf16", "fp32") if not args.cpu else ("fp32",):
        figures = train_binary(args, precision, splits)
        trained[precision] = figures.pop("network")
        report[f"train_{precision}"] = figures
        print(f"training {precision}: {figures}", flush=True)

    binary = next(iter(trained.values())).model(args.image_size)
    # The trained binary network with untrained three-class and autoencoder networks and a
    # KNN over random features: every model runs, as in a real bundle.
    bundle = untrained_bundle(
        args.image_size, str(out / "bundle"), binary=binary, architecture=args.architecture
    )
    originals = len(list(Path(args.fullres).rglob("*.jpeg")))
    many = replicate(Path(args.fullres), args.images, out / "images")
    once = replicate(Path(args.fullres), originals, out / "originals")

    _, reference = score(args, bundle, once, "cpu-reference", use_gpu=False, decode="cpu")
    for decode in ("cpu", "gpu"):
        figures, table = score(args, bundle, many, f"gpu-{decode}-decode", not args.cpu, decode)
        figures.update(largest_differences(reference, table))
        report[f"score_gpu_actors_{decode}_decode"] = figures
        print(f"scoring, GPU actors, {decode} decode: {figures}", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    return report


if __name__ == "__main__":
    main(parse_args())
