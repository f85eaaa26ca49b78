"""GPU device check: each limit of a GPU node beside the pipeline that should reach it.

    python benchmarks/device_check.py --data STORE --fullres FOLDER [--images 5000] [--output DIR]

1. Training. The binary network of the ``gpu`` quality profile (EfficientNet-Lite2 from its
   packaged ImageNet weights at 256 px; ``--architecture seed`` for the design's CNN):
   - the model-only limit: training steps on batches already on the GPU (bf16), per batch
     size in ``--train-batches``;
   - the training job (Ray Train, one GPU worker, bf16) on the training images replicated
     ``--train-repeat`` times, two epochs: the second epoch's images/s is the steady state
     (the first is reported apart), with its ratio to the model-only limit (target >= 0.7);
   - one epoch in fp32 at the first batch size, for the precision comparison.
2. Scoring ``--images`` full-resolution X-rays (FOLDER's files replicated by symbolic links):
   - the decode limit of the node's CPUs (the scoring job's decode tasks alone, the images
     once and twice over: the difference is the steady state);
   - the nvJPEG decode limit (one GPU, in this process);
   - the model-only limit: the bundle's networks on batches already on the GPU;
   - the scoring job with GPU actors and CPU decode, for each of ``--actors-per-gpu``, and
     with GPU decode at the default: steady state (rows between the 10th and 90th percentile
     of their scored_at) with start-up apart, and the ratio to min(decode limit, model limit)
     (target >= 0.8).
3. Scores one copy of each original on CPU (CPU actors, CPU decode) and prints the largest
   difference of every output column between that and each GPU run.

Prints a summary and writes it as JSON to DIR/device_check.json. ``--cpu`` runs the same steps
without a GPU (to check the script itself on a CPU-only machine; its figures mean nothing).
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
from pneumo_ray.scoring.score import (  # noqa: E402
    GPU_BATCH,
    ScoreConfig,
    read_scores,
    run_scoring,
)
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
    parser.add_argument(
        "--batch-size", type=int, default=GPU_BATCH, help="scoring batch (the job's GPU default)"
    )
    parser.add_argument(
        "--actors-per-gpu", default="1,2,4", help="scoring runs to compare (comma-separated)"
    )
    parser.add_argument(
        "--train-batches", default="64,256", help="training batch sizes (comma-separated)"
    )
    parser.add_argument("--train-repeat", type=int, default=4, help="copies of each image")
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


def steady_rate(times) -> float:
    """Images/s in steady state, from the completion time of every image: images complete in
    batches (the same time for a batch's rows), so the rate is the images of the batches that
    completed after the first 10% of them and up to the last 10%, over that span."""
    completed, counts = np.unique(np.asarray(times, dtype=np.float64), return_counts=True)
    first, last = int(0.1 * len(completed)), max(int(0.9 * len(completed)) - 1, 0)
    span = completed[last] - completed[first]
    return float(counts[first + 1 : last + 1].sum() / span) if span > 0 else float("nan")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, images_per_call: int, seconds: float = 5.0) -> float:
    """Images/s of ``step()`` called repeatedly for about ``seconds`` after two warm-ups."""
    step(), step()
    synchronize(device)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step()
        calls += 1
    synchronize(device)
    return calls * images_per_call / (time.perf_counter() - started)


def spec(args) -> dict:
    pretrained = "imagenet" if args.architecture in LITE_ARCHITECTURES else None
    return {"architecture": args.architecture, "normalization": "none", "pretrained": pretrained}


def train_model_limit(args, batch: int, device: torch.device) -> float:
    """Training steps of the binary network on a batch already on the device (bf16 on a GPU;
    no input pipeline, no augmentation): what the GPU itself allows."""
    from pneumo_ray.models.networks import build_network
    from pneumo_ray.training.loop import autocast_dtype, train_step

    model = build_network("binary", args.image_size, spec(args)).to(device).train()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(batch, 1, args.image_size, args.image_size, device=device)
    y = torch.randint(0, 3, (batch,), device=device)
    dtype = autocast_dtype("bf16" if device.type == "cuda" else "fp32", device)

    def step() -> None:
        train_step("binary", model, optimizer, x, y, None, None, dtype)

    return timed(step, device, batch)


def train_binary(args, precision: str, splits, batch: int, epochs: int = 2) -> dict:
    """The training job's binary network on one GPU worker, ``epochs`` epochs over the
    replicated training images; the last epoch is the steady state."""
    config = TrainConfig.from_flat(
        data=args.data,
        output=str(Path(args.output) / f"train-{precision}-{batch}"),
        image_size=args.image_size,
        epochs=epochs,
        batch_size=batch,
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
        network = fit_network("binary", config, scaling, train, val, [1.5, 0.75])
    history = network.history
    return {
        "precision": precision,
        "batch_size": batch,
        "seconds_with_ray_start": round(time.perf_counter() - started, 1),
        "first_epoch_images_per_s": round(history[0]["images_per_s"], 1),
        "steady_images_per_s": round(history[-1]["images_per_s"], 1),
        "val_accuracy": round(history[-1]["val_accuracy"], 3),
        "torch_peak_gpu_mib": round(history[-1].get("gpu_peak_mib", 0.0)),
        "nvidia_smi_peak_gpu_mib": round(sampler.peak),
        "network": network,
    }


def decode_limit(folder: Path, size: int) -> dict:
    """The scoring job's CPU decode tasks alone (no model actors) over ``folder``'s images,
    after a warm-up pass, once and then twice over: the second run's extra images over its
    extra time is the steady-state rate (start-up cancels out)."""
    import ray

    from pneumo_ray.io.data import decode_batch
    from pneumo_ray.scoring.score import DECODE_BATCH, DECODE_CPUS

    rows = [
        {"image_uri": str(p), "image_bytes": 0, "image_mtime_ns": 0}
        for p in sorted(folder.glob("*.jpeg"))
    ]

    def run(copies: int) -> tuple[int, float]:
        decoded = (
            ray.data.from_items(rows * copies)
            .repartition(target_num_rows_per_block=DECODE_BATCH)
            .map_batches(
                decode_batch,
                fn_kwargs={"image_size": size},
                batch_size=DECODE_BATCH,
                batch_format="numpy",
                num_cpus=DECODE_CPUS,
            )
            .drop_columns(["image"])  # the decoded pixels need not travel to this process
        )
        started, images = time.perf_counter(), 0
        for batch in decoded.iter_batches(batch_size=None, batch_format="numpy"):
            images += len(batch["image_uri"])
        return images, time.perf_counter() - started

    run(1)  # warm-up: the decode workers start and import once, outside the measured runs
    once, twice = run(1), run(2)
    return {
        "images": once[0],
        "seconds_once_twice": [round(once[1], 1), round(twice[1], 1)],
        "steady_images_per_s": round((twice[0] - once[0]) / max(twice[1] - once[1], 1e-9), 1),
    }


def nvjpeg_limit(folder: Path, size: int, batch: int, device: torch.device) -> float:
    """Decode (nvJPEG, then the resize the CPU decoder does) of batches of full-resolution
    JPEGs already in memory, on one GPU."""
    from pneumo_ray.models.predict import ImageDecoder

    decoder = ImageDecoder(size, device, gpu=device.type == "cuda")
    blobs = [p.read_bytes() for p in sorted(folder.rglob("*.jpeg"))[:batch]]
    if not blobs:
        raise ValueError(f"{folder}: no JPEG files")

    def step() -> None:
        decoder(blobs, [""] * len(blobs))

    return timed(step, device, len(blobs))


def model_limit(bundle_uri: str, size: int, batch: int, device: torch.device) -> float:
    """The bundle's networks (as a model actor runs them: flip TTA as the card says) on a
    batch already on the device."""
    from pneumo_ray.io.images import to_model_input
    from pneumo_ray.models.bundle import load_bundle
    from pneumo_ray.models.outputs import network_outputs

    bundle = load_bundle(bundle_uri, device)
    x = to_model_input(torch.randint(0, 256, (batch, size, size), dtype=torch.uint8)).to(device)

    def step() -> None:
        network_outputs(bundle.networks, x, bundle.tta, inpaint=bundle.inpaint)

    return timed(step, device, batch)


def score(
    args, bundle: str, folder: Path, name: str, use_gpu: bool, decode: str, actors_per_gpu=2
) -> tuple:
    config = ScoreConfig(
        model=bundle,
        inputs=[str(folder)],
        output=str(Path(args.output) / f"scores-{name}"),
        batch_size=args.batch_size,
        use_gpu=use_gpu,
        decode=decode,
        rescore=True,
        heatmaps="none",  # the scoring path as before; heatmaps: benchmark_inference
        actors_per_gpu=actors_per_gpu,
    )
    with GpuMemorySampler() as sampler:
        summary = run_scoring(config)
    table = read_scores(config.output, latest=True).to_pandas()
    # Replicas are named <index>_<original name>.
    table["original"] = table["image_uri"].str.rsplit("/", n=1).str[-1].str.split("_", n=1).str[1]
    scored_at = table["scored_at"].astype("int64").to_numpy() / 1e6  # microseconds -> s
    figures = {
        "images": summary.scored + summary.failed,
        "failed": summary.failed,
        "actors_per_gpu": actors_per_gpu,
        "start_up_s": None if summary.first_scored_s is None else round(summary.first_scored_s, 1),
        "whole_job_images_per_s": round(summary.images_per_s, 1),
        "steady_images_per_s": round(steady_rate(scored_at), 1),
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
    device = torch.device("cpu" if args.cpu else "cuda")
    report: dict = {
        "device": "cpu" if args.cpu else torch.cuda.get_device_name(0),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "architecture": args.architecture,
        "image_size": args.image_size,
    }
    print(f"device check on {report['device']}, {report['cpus']} CPUs", flush=True)

    # 1. training: the model-only limit beside the training job, per batch size
    images = [i for i in data.list_store(args.data) if i.split in ("train", "val")]
    train_images, val_images = split_by_patient(images, 0.15, seed=0)
    train = data.decode_split(train_images, args.image_size, seed=0).dataset
    val = data.decode_split(val_images, args.image_size, seed=1).dataset
    replicated = (
        train.union(*[train] * (args.train_repeat - 1)).materialize()
        if args.train_repeat > 1
        else train
    )
    report["train_rows_per_epoch"] = replicated.count()
    batches = [int(b) for b in args.train_batches.split(",")]
    trained = None
    for batch in batches:
        limit = train_model_limit(args, batch, device)
        figures = train_binary(args, "bf16" if not args.cpu else "fp32", (replicated, val), batch)
        trained = trained or figures.pop("network")
        figures.pop("network", None)
        figures["model_only_images_per_s"] = round(limit, 1)
        figures["ratio_to_model_only"] = round(figures["steady_images_per_s"] / limit, 3)
        report[f"train_batch_{batch}"] = figures
        print(f"training, batch {batch}: {figures}", flush=True)
    if not args.cpu:
        figures = train_binary(args, "fp32", (train, val), batches[0], epochs=1)
        figures.pop("network")
        report["train_fp32"] = figures
        print(f"training fp32 (one epoch, not replicated): {figures}", flush=True)

    # 2. scoring: the decode and model limits beside the scoring job
    binary = trained.model(args.image_size)
    # The trained binary network with untrained three-class and autoencoder networks and a
    # KNN over random features: every model runs, as in a real bundle (flip TTA, as the
    # quality profiles score).
    bundle = untrained_bundle(
        args.image_size,
        str(out / "bundle"),
        binary=binary,
        architecture=args.architecture,
        tta="flip",
    )
    originals = len(list(Path(args.fullres).rglob("*.jpeg")))
    many = replicate(Path(args.fullres), args.images, out / "images")
    once = replicate(Path(args.fullres), originals, out / "originals")
    limits = {
        "decode_cpu": decode_limit(many, args.image_size),
        "decode_nvjpeg_images_per_s": round(
            nvjpeg_limit(Path(args.fullres), args.image_size, args.batch_size, device), 1
        ),
        "model_only_images_per_s": round(
            model_limit(bundle, args.image_size, args.batch_size, device), 1
        ),
    }
    report["score_limits"] = limits
    print(f"scoring limits: {limits}", flush=True)
    cpu_decode_limit = limits["decode_cpu"]["steady_images_per_s"]
    model_only = limits["model_only_images_per_s"]

    _, reference = score(args, bundle, once, "cpu-reference", use_gpu=False, decode="cpu")
    runs = [("cpu", int(n)) for n in args.actors_per_gpu.split(",")] + [("gpu", 2)]
    for decode, per_gpu in runs:
        name = f"gpu-{decode}-decode-{per_gpu}-per-gpu"
        figures, table = score(args, bundle, many, name, not args.cpu, decode, per_gpu)
        limit = min(
            cpu_decode_limit if decode == "cpu" else limits["decode_nvjpeg_images_per_s"],
            model_only,
        )
        figures["limit_images_per_s"] = limit
        figures["ratio_to_limit"] = round(figures["steady_images_per_s"] / limit, 3)
        figures.update(largest_differences(reference, table))
        report[f"score_{decode}_decode_{per_gpu}_per_gpu"] = figures
        print(f"scoring, {decode} decode, {per_gpu} actors per GPU: {figures}", flush=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    (out / "device_check.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2), flush=True)
    return report


if __name__ == "__main__":
    main(parse_args())
