"""Training throughput: Ray Train (DDP over Ray Data shards) vs a plain single-process loop.

Both train the binary CNN for the same number of steps, with the same batch size, input size,
augmentation and step code (pneumo_ray.training.loop.train_step), on the same cores, in one run; the
first steps of each are warm-up and not timed. Prints images/s of each and their ratio.

    python benchmarks/benchmark_train.py [--data ../shared/data/chest_xray] [--image-size 224]
        [--batch-size 32] [--steps 20] [--warmup 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import numpy as np  # noqa: E402
import ray  # noqa: E402
import ray.train  # noqa: E402
import torch  # noqa: E402
from ray.train import RunConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402

from pneumo_ray.config import TrainConfig  # noqa: E402
from pneumo_ray.io import data  # noqa: E402
from pneumo_ray.io.images import BatchAugment, to_model_input  # noqa: E402
from pneumo_ray.io.labels import CLASS_LABELS, limit_per_class  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402
from pneumo_ray.training.loop import ImageLabelCollate, build_network, decide_scaling, train_step  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    return parser.parse_args()


def timed_steps(model, batches, steps: int, warmup: int) -> float:
    """Run warmup + steps training steps; return timed images/s."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-5)
    weights = torch.tensor([1.5, 0.75])
    augment = BatchAugment()
    model.train()
    seen, started = 0, None
    for step, (x, y) in enumerate(batches):
        if step == warmup:
            started = time.perf_counter()
        train_step("binary", model, optimizer, x, y, weights, augment)
        if step >= warmup:
            seen += len(y)
        if step + 1 == warmup + steps:
            break
    return seen / (time.perf_counter() - started)


def plain_loop(images: np.ndarray, labels: np.ndarray, args, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_network("binary", args.image_size).to(memory_format=torch.channels_last)

    def batches():
        for start in range(0, len(images), args.batch_size):
            stop = start + args.batch_size
            yield to_model_input(images[start:stop]), torch.from_numpy(labels[start:stop])

    return timed_steps(model, batches(), args.steps, args.warmup)


def ray_loop(config: dict) -> None:
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = build_network("binary", config["image_size"]).to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    shard = ray.train.get_dataset_shard("train")
    batches = (
        (to_model_input(image), label)
        for image, label in shard.iter_torch_batches(
            batch_size=config["batch_size"], collate_fn=ImageLabelCollate()
        )
    )
    rate = timed_steps(model, batches, config["steps"], config["warmup"])
    # Ray Train V2 keeps metrics only with a checkpoint: report a tiny one.
    with tempfile.TemporaryDirectory() as directory:
        Path(directory, "rate.txt").write_text(str(rate))
        ray.train.report(
            {"images_per_s": rate}, checkpoint=ray.train.Checkpoint.from_directory(directory)
        )


def main(args: argparse.Namespace) -> None:
    init_ray()
    needed = (args.steps + args.warmup) * args.batch_size
    listed = [i for i in data.list_store(args.data) if i.split == "train"]
    images = limit_per_class(listed, needed // 3 + 1, seed=0)[:needed]
    split = data.decode_split(images, args.image_size, seed=0)
    rows = split.dataset.take_all()
    array = np.stack([r["image"] for r in rows])
    labels = np.array([r["label_index"] for r in rows], dtype=np.int64)
    print(
        f"{len(rows)} images at {args.image_size}px, batch {args.batch_size}, "
        f"{args.steps} timed steps after {args.warmup} warm-up",
        flush=True,
    )

    scaling = decide_scaling(TrainConfig.from_flat(data=args.data, output="unused"))
    cores = os.cpu_count() or 1
    plain = plain_loop(array, labels, args, threads=scaling.cpus_per_worker)
    print(
        f"plain PyTorch loop ({scaling.cpus_per_worker} threads): {plain:.1f} images/s", flush=True
    )

    trainer = TorchTrainer(
        ray_loop,
        train_loop_config={
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "threads": scaling.cpus_per_worker,
        },
        scaling_config=scaling.scaling_config(),
        datasets={"train": split.dataset},
        run_config=RunConfig(
            name=f"benchmark-{time.time_ns()}", storage_path=os.path.abspath("out/benchmark_runs")
        ),
    )
    result = trainer.fit()
    rayrate = result.metrics["images_per_s"]
    print(
        f"Ray Train ({scaling.max_workers} worker x {scaling.cpus_per_worker} CPU): "
        f"{rayrate:.1f} images/s",
        flush=True,
    )
    print(
        f"\nratio Ray Train / plain loop: {rayrate / plain:.2f}  "
        f"(target >= 0.80; {cores} cores, {CLASS_LABELS} mixed)"
    )


if __name__ == "__main__":
    main(parse_args())
