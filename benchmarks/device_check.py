"""GPU device check: each limit of a GPU node beside the pipeline that should reach it.

    python benchmarks/device_check.py --data STORE --fullres FOLDER [--images 10000] [--output DIR]

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
     with GPU decode at the default, and once at ``--extra-score-batch``: steady state (rows
     between the 10th and 90th percentile of their scored_at, and every row over the time
     after the first) with start-up apart, and the ratio of the lower of the two to
     min(decode limit, model limit) (target >= 0.8); ``--op-reservation on,off`` runs them
     with Ray Data's per-operator resource reservation on and off.
3. Scores one copy of each original on CPU (CPU actors, CPU decode) and prints the largest
   difference of every output column between that and each GPU run.

Prints each step's figures as it ends and writes them as JSON to DIR/device_check.json after
every step; a step that fails is recorded with its error and the next one runs. ``--steps
train`` or ``score`` runs one half; ``--pretrained none`` builds the networks with random
weights (the same cost) where the pretrained extra is not installed. ``--cpu`` runs the same
steps without a GPU (to check the script itself on a CPU-only machine; its figures mean
nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import numpy as np  # noqa: E402
import ray  # noqa: E402
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
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--image-size", type=int, default=256, help="the gpu profile's")
    parser.add_argument(
        "--architecture",
        default="efficientnet_lite2",
        choices=ARCHITECTURES,
        help="the CNNs' (default: the gpu profile's, from ImageNet weights where it has them)",
    )
    parser.add_argument(
        "--pretrained",
        default="imagenet",
        choices=("imagenet", "none"),
        help="the CNNs' initial weights (none: random, the same cost, for a machine without "
        "the pretrained extra)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=GPU_BATCH, help="scoring batch (the job's GPU default)"
    )
    parser.add_argument(
        "--extra-score-batch",
        type=int,
        default=2 * GPU_BATCH,
        help="one more scoring run at this batch (CPU decode, 2 actors per GPU); 0: none",
    )
    parser.add_argument(
        "--actors-per-gpu", default="1,2,4", help="scoring runs to compare (comma-separated)"
    )
    parser.add_argument(
        "--train-batches", default="64,256", help="training batch sizes (comma-separated)"
    )
    parser.add_argument("--train-repeat", type=int, default=4, help="copies of each image")
    parser.add_argument(
        "--steps", default="train,score", help="what to measure: train, score or both"
    )
    parser.add_argument(
        "--op-reservation",
        default="on",
        help="Ray Data's per-operator resource reservation during the scoring runs: on, off, "
        "or on,off to run each scoring configuration both ways",
    )
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


def pretrained(args) -> str | None:
    """ImageNet weights where the architecture has them and --pretrained asks for them."""
    wanted = args.architecture in LITE_ARCHITECTURES and args.pretrained == "imagenet"
    return "imagenet" if wanted else None


def spec(args) -> dict:
    weights = pretrained(args)
    return {"architecture": args.architecture, "normalization": "none", "pretrained": weights}


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
        pretrained=pretrained(args),
        backbone_lr_scale=0.1 if pretrained(args) else 1.0,
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
    extra time is the steady-state rate (start-up cancels out). The blocks are the job's size
    but made up front (not cut by the job's streaming repartition, which bounds how fast
    blocks reach the decode tasks), so the figure is what the node's CPUs decode."""
    from pneumo_ray.io.data import decode_batch
    from pneumo_ray.scoring.score import DECODE_CPUS, decode_block_rows

    rows = [
        {"image_uri": str(p), "image_bytes": 0, "image_mtime_ns": 0}
        for p in sorted(folder.glob("*.jpeg"))
    ]

    def run(copies: int) -> tuple[int, float]:
        block = decode_block_rows(len(rows) * copies, ray.cluster_resources().get("CPU", 0))
        decoded = (
            ray.data.from_items(rows * copies, override_num_blocks=-(-len(rows) * copies // block))
            .map_batches(
                decode_batch,
                fn_kwargs={"image_size": size},
                batch_size=block,
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
    args,
    bundle: str,
    folder: Path,
    name: str,
    use_gpu: bool,
    decode: str,
    actors_per_gpu: int = 2,
    batch_size: int | None = None,
) -> tuple:
    config = ScoreConfig(
        model=bundle,
        inputs=[str(folder)],
        output=str(Path(args.output) / f"scores-{name}"),
        batch_size=batch_size or args.batch_size,
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
    images = summary.scored + summary.failed
    seconds = images / summary.images_per_s if summary.images_per_s else float("nan")
    start_up = summary.first_scored_s or 0.0
    figures = {
        "images": images,
        "failed": summary.failed,
        "actors_per_gpu": actors_per_gpu,
        "start_up_s": None if summary.first_scored_s is None else round(summary.first_scored_s, 1),
        "whole_job_images_per_s": round(summary.images_per_s, 1),
        "steady_images_per_s": round(steady_rate(scored_at), 1),
        # Every image over the job's time after its first scored row: unlike the 10th-90th
        # percentile span, not fooled by completions that come in a burst at the end.
        "after_start_images_per_s": (
            round(images / (seconds - start_up), 1) if seconds - start_up >= 1.0 else float("nan")
        ),
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


class Report(dict):
    """The figures so far, written to DIR/device_check.json after every step: a step that
    fails is recorded with its error and the check goes on with the next one, so one run on a
    borrowed machine gives every figure it can."""

    def __init__(self, path: Path, **fields) -> None:
        super().__init__(fields)
        self.path = path

    def save(self) -> None:
        self.path.write_text(json.dumps(self, indent=2))

    def step(self, name: str, measure, *args, **kwargs):
        """``measure(*args, **kwargs)``'s figures under ``name`` (a dict, or a tuple whose
        first item is); the whole result, or None if it failed."""
        started = time.perf_counter()
        try:
            result = measure(*args, **kwargs)
        except Exception as error:  # noqa: BLE001  (recorded; the next step still runs)
            traceback.print_exc()
            self[name] = {"error": f"{type(error).__name__}: {error}"}
            seconds = time.perf_counter() - started
            print(f"{name}: FAILED after {seconds:.0f} s: {error}", flush=True)
            self.save()
            return None
        figures = result[0] if isinstance(result, tuple) else result
        self[name] = {k: v for k, v in figures.items() if k != "network"}
        print(f"{name} ({time.perf_counter() - started:.0f} s): {self[name]}", flush=True)
        self.save()
        return result


def training_step(args, device, batch: int, splits) -> dict:
    """The model-only training limit and the training job at one batch size, with their ratio."""
    limit = train_model_limit(args, batch, device)
    figures = train_binary(args, "bf16" if not args.cpu else "fp32", splits, batch)
    figures["model_only_images_per_s"] = round(limit, 1)
    figures["ratio_to_model_only"] = round(figures["steady_images_per_s"] / limit, 3)
    return figures


def scoring_limits(args, bundle: str, many: Path, device) -> dict:
    return {
        "decode_cpu": decode_limit(many, args.image_size),
        "decode_nvjpeg_images_per_s": round(
            nvjpeg_limit(Path(args.fullres), args.image_size, args.batch_size, device), 1
        ),
        "model_only_images_per_s": round(
            model_limit(bundle, args.image_size, args.batch_size, device), 1
        ),
    }


def scoring_run(args, bundle, many, limits, reference, decode, per_gpu, batch) -> tuple:
    """One scoring job on the GPU, its ratio to its limit and its differences from CPU."""
    figures, table = score(
        args, bundle, many, f"gpu-{decode}-{per_gpu}-{batch}", not args.cpu, decode, per_gpu, batch
    )
    figures["batch_size"] = batch
    decode_limit_ = (
        limits["decode_cpu"]["steady_images_per_s"]
        if decode == "cpu"
        else limits["decode_nvjpeg_images_per_s"]
    )
    limit = min(decode_limit_, limits["model_only_images_per_s"])
    figures["limit_images_per_s"] = limit
    # The lower of the two steady-state figures (device run 3 of issue 22 had a 10th-90th
    # percentile rate of 1,057 images/s in a job that took longer than one at 568).
    rates = (figures["steady_images_per_s"], figures["after_start_images_per_s"])
    steady = min((rate for rate in rates if rate == rate), default=float("nan"))  # not NaN
    figures["ratio_to_limit"] = round(steady / limit, 3)
    if reference is not None:
        figures.update(largest_differences(reference, table))
    return figures


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    init_ray(num_gpus=0 if args.cpu else None)
    device = torch.device("cpu" if args.cpu else "cuda")
    report = Report(
        out / "device_check.json",
        device="cpu" if args.cpu else torch.cuda.get_device_name(0),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        architecture=args.architecture,
        pretrained=pretrained(args),
        image_size=args.image_size,
    )
    print(f"device check on {report['device']}, {report['cpus']} CPUs", flush=True)

    steps = set(args.steps.split(","))
    trained = None
    if "train" in steps:
        trained = training(args, device, report)
    if "score" in steps:
        scoring(args, device, report, trained)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report.save()
    print(json.dumps(report, indent=2), flush=True)
    return report


def training(args, device, report: Report):
    """1. The model-only limit beside the training job, per batch size; the trained network."""
    images = [i for i in data.list_store(args.data) if i.split in ("train", "val")]
    train_images, val_images = split_by_patient(images, 0.15, seed=0)
    train = data.decode_split(train_images, args.image_size, seed=0).dataset
    val = data.decode_split(val_images, args.image_size, seed=1).dataset
    # The images repeated before decoding, so every block of the epoch is its own object, as in
    # a real store (a union of one dataset with itself repeats its blocks, and Ray Data's block
    # prefetcher refuses repeated blocks: "Wait requires a list of unique ray_waitables").
    replicated = (
        data.decode_split(train_images * args.train_repeat, args.image_size, seed=0).dataset
        if args.train_repeat > 1
        else train
    )
    report["train_rows_per_epoch"] = replicated.count()
    batches = [int(b) for b in args.train_batches.split(",")]
    trained = None
    for batch in batches:
        figures = report.step(
            f"train_batch_{batch}", training_step, args, device, batch, (replicated, val)
        )
        trained = trained or (figures or {}).get("network")
    if not args.cpu:
        report.step("train_fp32", train_binary, args, "fp32", (train, val), batches[0], epochs=1)
    return trained


def scoring(args, device, report: Report, trained) -> None:
    """2. The decode and model limits beside the scoring job; 3. the differences from CPU."""
    out = Path(args.output)
    # The trained binary network (an untrained one if training failed) with untrained
    # three-class and autoencoder networks and a KNN over random features: every model runs,
    # as in a real bundle (flip TTA, as the quality profiles score).
    bundle = untrained_bundle(
        args.image_size,
        str(out / "bundle"),
        binary=trained.model(args.image_size) if trained else None,
        architecture=args.architecture,
        tta="flip",
    )
    originals = len(list(Path(args.fullres).rglob("*.jpeg")))
    many = replicate(Path(args.fullres), args.images, out / "images")
    once = replicate(Path(args.fullres), originals, out / "originals")
    limits = report.step("score_limits", scoring_limits, args, bundle, many, device)
    if limits is None:
        return
    cpu = report.step(
        "score_cpu_reference", score, args, bundle, once, "cpu-reference", False, "cpu"
    )
    reference = cpu[1] if cpu else None
    runs = [("cpu", int(n), args.batch_size) for n in args.actors_per_gpu.split(",")]
    if args.extra_score_batch:
        runs.append(("cpu", 2, args.extra_score_batch))
    runs.append(("gpu", 2, args.batch_size))
    context = ray.data.DataContext.get_current()
    reservations = args.op_reservation.split(",")
    for reservation in reservations:
        context.op_resource_reservation_enabled = reservation == "on"
        suffix = f"_reservation_{reservation}" if len(reservations) > 1 else ""
        for decode, per_gpu, batch in runs:
            report.step(
                f"score_{decode}_decode_{per_gpu}_per_gpu_batch_{batch}{suffix}",
                scoring_run,
                args,
                bundle,
                many,
                limits,
                reference,
                decode,
                per_gpu,
                batch,
            )


if __name__ == "__main__":
    main(parse_args())
