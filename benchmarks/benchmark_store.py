"""Nightly scoring of a big store whose history is mostly committed already.

For each size N: a store of N images (symbolic links, in folders of 10,000, cycling through
the full-resolution X-rays) and committed history for all but --new of them (Parquet parts
written directly, 10,000 rows each, as a hundred nights would have left them). Then
``jobs/score.py`` runs on it as a user runs it (its own driver and embedded Ray), and this
prints: planning time (listing + anti-join), the time from launch (Ray's start included)
until the first image is scored, the driver's peak memory, the peak memory of all its Ray
processes (summed PSS, so shared object-store pages count once) and the total time; and
checks that exactly the new images were scored and committed.

    python benchmarks/benchmark_store.py [--images 10000 100000 1000000] [--new 1000]
        [--image-size 128] [--model BUNDLE] [--work out/benchmark_store] [--inventory]

--inventory: the store is given as a Parquet manifest with sizes and mtimes (as an S3
Inventory report is), which builds in seconds at any size: only the --new images exist as
files; the history's URIs are never read (they are already scored), so they need not exist.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from benchmarks.memory import MemorySampler  # noqa: E402
from pneumo_ray.models.bundle import read_card  # noqa: E402
from pneumo_ray.scoring.ledger import OUTPUT_SCHEMA, commit_part, read_scores  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "chest_xray_fullres"
FOLDER_SIZE = 10_000
PART_ROWS = 10_000


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--new", type=int, default=1000, help="images not in the history")
    parser.add_argument("--source", default=str(DEFAULT_SOURCE))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--model", default=None, help="bundle (default: an untrained one)")
    parser.add_argument("--work", default="out/benchmark_store")
    parser.add_argument("--inventory", action="store_true", help="a Parquet manifest store")
    return parser.parse_args()


def build_store(source: Path, count: int, root: Path) -> list[tuple[str, int, int]]:
    """``count`` symbolic links under ``root``; returns (uri, size, mtime_ns) of each, as a
    listing sees them (the target's size and mtime)."""
    originals = [p.resolve() for p in sorted(source.rglob("*.jpeg"))]
    stats = [os.stat(p) for p in originals]
    entries = []
    for i in range(count):
        folder = root / f"batch{i // FOLDER_SIZE:04d}"
        if i % FOLDER_SIZE == 0:
            folder.mkdir(parents=True)
        j = i % len(originals)
        link = folder / f"{i:07d}_{originals[j].name}"
        link.symlink_to(originals[j])
        entries.append((str(link), stats[j].st_size, stats[j].st_mtime_ns))
    return entries


def build_inventory(source: Path, count: int, new: int, root: Path) -> list[tuple[str, int, int]]:
    """A Parquet manifest of ``count`` URIs with sizes and mtimes; only the last ``new``
    exist (symbolic links)."""
    entries = [(str(root / f"batch{i // FOLDER_SIZE:04d}" / f"{i:07d}.jpeg"), 200_000 + i % 997,
                1_700_000_000_000_000_000 + i) for i in range(count - new)]  # fmt: skip
    entries += build_store(source, new, root / "new")
    pq.write_table(
        pa.table(
            {
                "image_uri": [e[0] for e in entries],
                "size": pa.array([e[1] for e in entries], pa.int64()),
                "mtime_ns": pa.array([e[2] for e in entries], pa.int64()),
            }
        ),
        root / "inventory.parquet",
    )
    return entries


def write_history(output: str, entries: list[tuple[str, int, int]], model_version: str) -> None:
    """Committed rows for ``entries``, in parts of PART_ROWS, one run per part (nights)."""
    rng = np.random.default_rng(0)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    for part, first in enumerate(range(0, len(entries), PART_ROWS)):
        chunk = entries[first : first + PART_ROWS]
        n = len(chunk)
        probs = rng.dirichlet([1, 1, 1], n).astype(np.float32)
        p = rng.random(n, dtype=np.float32)
        neighbours = [[f"/reference/train/{k}.jpeg" for k in rng.integers(0, 4000, 5)]] * n
        columns = {
            "image_uri": [e[0] for e in chunk],
            "p_pneumonia": p,
            "pred_binary": np.where(p >= 0.5, "pneumonia", "normal"),
            "p_pneumonia_cnn": p,
            "p_normal": probs[:, 0],
            "p_bacterial": probs[:, 1],
            "p_viral": probs[:, 2],
            "pred_class": np.array(["normal", "bacterial", "viral"])[probs.argmax(1)],
            "knn_label": np.array(["normal", "bacterial", "viral"])[rng.integers(0, 3, n)],
            "knn_neighbors": neighbours,
            "knn_distances": [[0.1, 0.2, 0.3, 0.4, 0.5]] * n,
            "anomaly_score": rng.random(n, dtype=np.float32),
            "is_anomaly": rng.random(n) > 0.5,
            "reconstruction_mse": rng.random(n, dtype=np.float32),
            "model_version": [model_version] * n,
            "scored_at": [start + dt.timedelta(days=part)] * n,
            "error": [None] * n,
            "error_kind": [None] * n,
            "image_bytes": [e[1] for e in chunk],
            "image_mtime_ns": [e[2] for e in chunk],
            "scored_on": ["node-history"] * n,
        }
        table = pa.table(
            {
                k: pa.array(columns[k], f.type)
                for k, f in zip(OUTPUT_SCHEMA.names, OUTPUT_SCHEMA, strict=True)
            }
        )
        night = (start + dt.timedelta(days=part)).strftime("%Y%m%dT020000Z")
        commit_part(
            output, f"{night}-hist", 0, table, {"failed": 0, "model_version": model_version}
        )


def figure(pattern: str, log: str) -> float:
    match = re.search(pattern, log)
    if not match:
        raise RuntimeError(f"no {pattern!r} in the job's output:\n{log[-3000:]}")
    return float(match.group(1))


def run_size(args: argparse.Namespace, model: str, count: int, work: Path) -> dict:
    root = work / f"n{count}"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    if args.inventory:
        entries = build_inventory(Path(args.source), count, args.new, root / "store")
        store = root / "store" / "inventory.parquet"
    else:
        entries = build_store(Path(args.source), count, root / "store")
        store = root / "store"
    output = str(root / "scores")
    write_history(output, entries[: count - args.new], read_card(model)["model_version"])
    print(
        f"[{count:,}] store and history built in {time.perf_counter() - started:.0f}s", flush=True
    )
    del entries

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, str(REPO / "jobs" / "score.py"), "--model", model,
               "--input", str(store), "--output", output, "--heatmaps", "none"]  # fmt: skip
    started = time.perf_counter()
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)  # fmt: skip
    sampler = MemorySampler(job.pid)
    sampler.start()
    lines, first_scored = [], None
    for line in job.stdout:  # timestamped as it comes: from launch, Ray's start included
        lines.append(line)
        if first_scored is None and "first images scored after" in line:
            first_scored = time.perf_counter() - started
    job.wait()
    total = time.perf_counter() - started
    sampler.stop()
    log = "".join(lines)
    if job.returncode != 0:
        raise RuntimeError(f"the scoring job failed:\n{log[-4000:]}")
    scored = read_scores(output, columns=["image_uri", "scored_on"])
    new_rows = sum(1 for node in scored.column("scored_on").to_pylist() if node != "node-history")
    unique = len(set(scored.column("image_uri").to_pylist()))
    result = {
        "images": count,
        "planning_s": figure(r"planning \(listing \+ anti-join\): ([\d.]+)s", log),
        "first_scored_s": first_scored,
        "first_scored_in_job_s": figure(r"first image scored after ([\d.]+)s", log),
        "driver_peak_mib": figure(r"driver peak memory: (\d+) MiB", log),
        "driver_rss_sampled_mib": sampler.rss / 2**20,
        "ray_pss_peak_mib": sampler.descendants_pss / 2**20,
        "total_s": total,
        "new_rows": new_rows,
        "ok": new_rows == args.new and unique == count and scored.num_rows == count,
    }
    print(
        f"[{count:,}] planning {result['planning_s']:.1f}s, first image scored "
        f"{result['first_scored_s']:.1f}s after launch ({result['first_scored_in_job_s']:.1f}s "
        f"after Ray was up), total {total:.1f}s; driver peak "
        f"{result['driver_peak_mib']:.0f} MiB (sampled RSS {result['driver_rss_sampled_mib']:.0f}"
        f" MiB); Ray processes peak PSS {result['ray_pss_peak_mib']:.0f} MiB; {new_rows} new "
        f"rows committed, every image once: {result['ok']}",
        flush=True,
    )
    shutil.rmtree(root)
    return result


def main(args: argparse.Namespace) -> None:
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        from benchmarks.benchmark_score import untrained_bundle

        model = untrained_bundle(args.image_size, str(work / "bundle"))
    results = [run_size(args, model, count, work) for count in sorted(args.images)]
    kind = "a Parquet inventory" if args.inventory else "a folder of symbolic links"
    print(f"\n{os.cpu_count()} cores; stores as {kind}; {args.new} new images each; {model}")
    print("images     planning_s  first_scored_s  total_s  driver_peak_MiB  ray_pss_peak_MiB  ok")
    for r in results:
        print(
            f"{r['images']:<10,} {r['planning_s']:>10.1f}  {r['first_scored_s']:>14.1f}  "
            f"{r['total_s']:>7.1f}  {r['driver_peak_mib']:>15.0f}  {r['ray_pss_peak_mib']:>16.0f}"
            f"  {r['ok']}"
        )
    if not all(r["ok"] for r in results):
        sys.exit("benchmark_store.py: some run did not commit exactly the new images")


if __name__ == "__main__":
    main(parse_args())
