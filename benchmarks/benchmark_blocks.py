"""What the scoring pipeline's stream itself passes, per decode block size, with null work.

    python benchmarks/benchmark_blocks.py [--rows 40000] [--cpus 16] [--blocks 32,64,128,256]

The scoring job's own stages (pneumo_ray.scoring.score.decode_stage: the work list read from
Parquet, cut by a streaming repartition into blocks, one decode task per block; then the
resources of a pool of two model actors with half a GPU each, ActorPlan.map_kwargs). Here the
decode tasks only make arrays of the right size and the actors return at once, in an embedded
Ray that declares ``--cpus`` CPUs and one GPU (logical resources: no GPU is needed). The rows/s
printed is therefore what the stream can carry at each block size, the ceiling above any decode
CPUs or GPU. The device check found the job at 560-1,000 images/s on a 16-CPU H200 node with
blocks of 32 rows, its decode tasks mostly idle, waiting for blocks (issue 22);
``decode_block_rows`` is the block size the job now uses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import ray  # noqa: E402

from pneumo_ray.models.predict import ActorPlan  # noqa: E402
from pneumo_ray.scoring.score import GPU_BATCH, decode_block_rows, decode_stage  # noqa: E402


def null_decode(batch: dict, image_size: int) -> dict:
    rows = len(batch["image_uri"])
    return {
        "image_uri": batch["image_uri"],
        "image": np.zeros((rows, image_size, image_size), np.uint8),
    }


class NullActor:
    def __call__(self, batch: dict) -> dict:
        return {"image_uri": batch["image_uri"]}


def stream_rate(listing: str, block: int, image_size: int) -> tuple[float, float]:
    """(whole-run rows/s, steady rows/s) of the pipeline over ``listing`` with ``block``-row
    decode blocks; steady: rows that reached the driver between 10% and 90% of the run."""
    stream = decode_stage(
        ray.data.read_parquet([listing]), null_decode, {"image_size": image_size}, block
    )
    dataset = stream.map_batches(
        NullActor,
        batch_size=GPU_BATCH,
        batch_format="numpy",
        **ActorPlan(2, 2, use_gpu=True, threads=1, actors_per_gpu=2).map_kwargs(),
    )
    started, rows, arrivals = time.perf_counter(), 0, []
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        rows += len(batch["image_uri"])
        arrivals.append((time.perf_counter() - started, rows))
    seconds = time.perf_counter() - started
    middle = [a for a in arrivals if 0.1 * seconds <= a[0] <= 0.9 * seconds] or arrivals
    span = middle[-1][0] - middle[0][0]
    steady = (middle[-1][1] - middle[0][1]) / span if span > 0 else float("nan")
    return rows / seconds, steady


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=40_000)
    parser.add_argument("--cpus", type=int, default=16, help="logical CPUs of the embedded Ray")
    parser.add_argument("--blocks", default="32,64,128,256")
    parser.add_argument("--image-size", type=int, default=256)
    args = parser.parse_args(argv)
    ray.init(
        address="local",
        num_cpus=args.cpus,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    blocks = [int(b) for b in args.blocks.split(",")]
    with tempfile.TemporaryDirectory(prefix="pneumo_ray_blocks_") as scratch:
        listing = str(Path(scratch) / "todo.parquet")
        uris = [f"/store/{i:08d}.jpeg" for i in range(args.rows)]
        pq.write_table(pa.table({"image_uri": uris, "image_bytes": [0] * args.rows}), listing)
        stream_rate(listing, blocks[-1], args.image_size)  # warm-up: workers start once
        print(
            f"{args.rows:,} rows, {args.cpus} logical CPUs and 1 GPU; the job's block for them: "
            f"{decode_block_rows(args.rows, args.cpus)} rows"
        )
        print(f"{'block rows':>10}  {'whole run rows/s':>16}  {'steady rows/s':>13}")
        for block in blocks:
            whole, steady = stream_rate(listing, block, args.image_size)
            print(f"{block:>10}  {whole:>16,.0f}  {steady:>13,.0f}", flush=True)


if __name__ == "__main__":
    main()
