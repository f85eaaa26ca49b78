"""Ray Train: data-parallel training of the three networks over Ray Data shards.

The networks train in turn in one ``TorchTrainer`` run. Workers read their shard of the decoded
images with ``iter_torch_batches``, augment on the fly (the CNNs), train with DDP, and report
each epoch with a checkpoint from rank 0. A rerun with the same settings and storage resumes
from the last checkpoint, and takes a network whose result is kept under its own run key as
trained; a worker lost mid-run is replaced and training goes on from the last checkpoint.
"""

from __future__ import annotations

import collections
import hashlib
import io
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import ray
import ray.train
import torch
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch import nn

from pneumo_ray import faults
from pneumo_ray.config import TrainConfig
from pneumo_ray.io import stores
from pneumo_ray.io.images import BatchAugment, to_model_input
from pneumo_ray.models.anomaly import masked_training_batch
from pneumo_ray.models.autoencoder import reconstruction_error
from pneumo_ray.models.networks import NETWORKS, build_network
from pneumo_ray.models.reframing import FRAME_COLUMN

__all__ = ["NETWORKS", "NetworkData", "build_network", "fit_network", "fit_networks", "train_step"]
STATE_FILE = "state.pt"
SHUFFLE_BUFFER = 512
PREFETCH_BATCHES = 4  # GPU workers: batches collated, pinned and on the device ahead of the step
BN_CALIBRATION_IMAGES = 512  # recent clean training images that re-estimate BatchNorm stats


def class_weights(label_counts: dict[str, int], labels: tuple[str, ...]) -> list[float]:
    """Inverse-frequency weights, n / (k * n_c): each class weighs the same in the loss."""
    total = sum(label_counts.get(label, 0) for label in labels)
    return [total / (len(labels) * max(1, label_counts.get(label, 0))) for label in labels]


def per_sample_loss(
    name: str,
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    masking: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of each image (B,), correct predictions (B,) bool) for one batch.

    ``y`` is the three-class index; the binary network learns ``y > 0`` (pneumonia).
    ``masking``: the share of the autoencoder's images given with patches hidden (it learns
    to fill them in from their context; the target is always the clean image).
    """
    if name == "autoencoder":
        loss = reconstruction_error(model, x, shown=masked_training_batch(x, masking))
        return loss, torch.zeros_like(loss, dtype=torch.bool)
    logits = model(x)
    if name == "binary":
        target = (y > 0).long()
        loss = F.binary_cross_entropy_with_logits(logits, target.float(), reduction="none")
        correct = (logits > 0).long() == target
    else:
        target = y
        loss = F.cross_entropy(logits, target, reduction="none")
        correct = logits.argmax(dim=1) == target
    if weights is not None:
        loss = loss * weights[target]
    return loss, correct


def train_step(
    name: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor | None,
    augment: BatchAugment | None,
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    masking: float = 0.0,
    frames: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch ``x`` (B, 1, S, S) in [0, 1]; returns per-image
    (loss, correct), detached. ``dtype``: autocast dtype (None: fp32); ``scaler``: fp16's loss
    scaling; ``masking``: see ``per_sample_loss``; ``frames`` (B, 4): the films' typical
    frames, which the framing augmentation is drawn relative to (None: the films' edges)."""
    if augment is not None:
        x = augment(x, frames)  # the whole batch at once, on its device
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
        loss, correct = per_sample_loss(name, model, x, y, weights, masking)
    loss = loss.float()
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss.mean()).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.mean().backward()
        optimizer.step()
    return loss.detach(), correct


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor.tolist()


def recalibrate_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Re-estimate every BatchNorm's running statistics on ``batches`` (clean inputs).

    Running averages lag far behind weights that change fast (early epochs, small data), so an
    eval-mode network can look much worse than it is, and the best-epoch choice goes wrong.
    A cumulative pass over recent un-augmented training images fixes the statistics to the
    weights being evaluated. Dropout stays off during the pass.
    """
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and (m.weight is None or m.weight.requires_grad)  # a frozen one is kept as it is
    ]
    if not norms or not batches:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the pass
    model.eval()
    for norm in norms:
        norm.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()


def _progress(message: str) -> None:
    # Straight to the worker's stdout (which Ray forwards to the driver): Ray Train's patched
    # print would emit each line twice when stdout is wrapped.
    print(message, file=sys.__stdout__, flush=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def to_cpu(value):
    """``value`` with every tensor in it (nested dicts, lists, tuples) moved to the CPU.

    Checkpoints and bundles hold CPU tensors only, so that weights trained on GPUs load on a
    CPU-only head or scoring node, and the reverse.
    """
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(item) for item in value)
    return value


def load_state(uri: str) -> dict:
    """A training state saved by ``torch.save`` (on any device), from a local path or s3:// URI,
    onto the CPU."""
    return torch.load(io.BytesIO(stores.read_bytes(uri)), weights_only=True, map_location="cpu")


def save_state(state: dict, uri: str) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    stores.write_bytes(uri, buffer.getvalue())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``--precision`` on ``device``; None means plain fp32.

    ``auto`` is bf16 on GPUs that support it (no loss scaling needed) and fp32 elsewhere: on
    CPU, autocast costs more than it saves for these small convolutions.
    """
    if precision == "auto":
        supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
        precision = "bf16" if supported else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The augmentation seed of one rank in one epoch: ranks draw different augmentations, and a
    resumed epoch draws the same ones as the first try."""
    return (seed * 1_000_003 + rank * 10_007 + epoch) % (2**63)


class ImageLabelCollate(NumpyBatchCollateFn):
    """The columns training needs, as tensors (the URI strings stay behind): image and label,
    and the films' frames (``FRAME_COLUMN``) where the dataset has them."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        image = torch.from_numpy(np.array(batch["image"], copy=True))  # Ray's views are read-only
        label = torch.from_numpy(batch["label_index"].astype(np.int64))
        if FRAME_COLUMN not in batch:
            return image, label
        frames = np.array(batch[FRAME_COLUMN], dtype=np.float32, copy=True)
        return image, label, torch.from_numpy(frames)


@dataclass
class WorkerRun:
    """What one Ray Train worker holds while it trains a network."""

    loop: dict
    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler | None
    scaler: torch.amp.GradScaler | None
    weights: torch.Tensor | None
    augment: BatchAugment | None
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: fp32
    rank: int
    world: int
    state: dict

    @property
    def name(self) -> str:
        return self.loop["network"]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cpu" else x

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def batches(self, shard, shuffle: bool):
        """(images (B, 1, S, S) in [0, 1], labels (B,)) on the worker's device."""
        seed = rank_seed(self.loop["seed"], self.rank, self.state["epoch"]) if shuffle else None
        return training_batches(
            shard, max(1, self.loop["batch_size"] // self.world), self.device, seed
        )


def training_batches(shard, batch_size: int, device: torch.device, shuffle_seed: int | None):
    """A worker's (images (B, 1, S, S) in [0, 1], labels (B,), frames (B, 4) or None) on its
    device (frames stay on the CPU, where the augmentation draws): whole-batch
    collation (``ImageLabelCollate``) and, on GPUs, PREFETCH_BATCHES batches pinned and copied
    to the device ahead on Ray Data's prefetch thread, so the GPU does not wait on the host.
    ``shuffle_seed``: a local shuffle with that seed; None: the shard's order."""
    on_gpu = device.type == "cuda"
    for image, label_index, *frames in shard.iter_torch_batches(
        batch_size=batch_size,
        local_shuffle_buffer_size=SHUFFLE_BUFFER if shuffle_seed is not None else None,
        local_shuffle_seed=shuffle_seed,
        collate_fn=ImageLabelCollate(),
        device=device,
        pin_memory=on_gpu,
        prefetch_batches=PREFETCH_BATCHES if on_gpu else 1,
    ):
        x = image.to(device, non_blocking=on_gpu)  # a no-op when Ray moved it
        label_index = label_index.to(device, non_blocking=on_gpu)
        yield to_model_input(x), label_index, (frames[0].cpu() if frames else None)


def parameter_groups(model: nn.Module, lr: float, backbone_scale: float) -> list[dict]:
    """The optimizer's parameter groups: the trainable parameters, and with a ``backbone_scale``
    below 1 (layer-wise rates for a pretrained backbone) the backbone's (``model.features``)
    in a second group at ``lr * backbone_scale``; the head's group comes first (its rate is
    the one reported). Frozen parameters are left out."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if backbone_scale == 1.0 or not hasattr(model, "features"):
        return [{"params": trainable}]
    backbone = {id(p) for p in model.features.parameters()}
    return [
        {"params": [p for p in trainable if id(p) not in backbone], "lr": lr},
        {"params": [p for p in trainable if id(p) in backbone], "lr": lr * backbone_scale},
    ]


def start_worker_run(loop: dict, restored: dict | None = None, source: str = "") -> WorkerRun:
    """Build the network, optimizer and schedule of one worker; resumed from ``restored``
    (this network's state in the last checkpoint, at ``source``) when there is one."""
    torch.set_num_threads(loop["threads"])
    torch.manual_seed(loop["seed"])  # the same initial weights on every rank
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model = build_network(loop["network"], loop["image_size"], loop["spec"])
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(
        parameter_groups(_unwrap(model), loop["lr"], loop.get("backbone_lr_scale", 1.0)),
        lr=loop["lr"],
        weight_decay=loop["weight_decay"],
    )
    # Per-epoch schedule: constant (the design's) or cosine decay to 0 over the run's epochs.
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=loop["epochs"])
        if loop["lr_schedule"] == "cosine"
        else None
    )
    dtype = autocast_dtype(loop["precision"], device)
    # fp16 needs loss scaling (its range is narrow); bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    weights = loop["class_weights"]
    run = WorkerRun(
        loop=loop,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        scaler=scaler,
        weights=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
        augment=BatchAugment(loop["acquisition_shift"], loop.get("framing", False))
        if loop["augment"]
        else None,
        device=device,
        dtype=dtype,
        rank=rank,
        world=world,
        state={
            "epoch": 0,
            "history": [],
            "best_val_loss": math.inf,
            "best_epoch": -1,
            "bad_epochs": 0,
            "stopped": False,
            "best": None,
        },
    )
    pretrained = loop["spec"].get("pretrained")
    if pretrained and rank == 0 and restored is None:
        _progress(
            f"[{loop['network']}] initial weights: {pretrained} ({loop['spec']['architecture']})"
        )
    if restored is not None:
        _restore(run, restored, source)
    node = ray.get_runtime_context().get_node_id()
    worker_nodes = [node]
    if world > 1:
        worker_nodes = [None] * world
        torch.distributed.all_gather_object(worker_nodes, node)
    run.state["worker_nodes"] = worker_nodes  # where this (possibly resumed) run trained
    return run


def _restore(run: WorkerRun, state: dict, source: str) -> None:
    _unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])  # onto the parameters' device
    if run.schedule is not None:
        run.schedule.load_state_dict(state["schedule"])
    run.state = state
    if run.rank == 0:
        _progress(f"[{run.name}] resuming after epoch {state['epoch']} from {source}")


def _finished(state: dict, loop: dict) -> bool:
    return state["epoch"] >= loop["epochs"] or state["stopped"]


def _checkpointed() -> tuple[dict[str, dict], str]:
    """The states of the networks in the last checkpoint (none without one), and where it is.

    A checkpoint holds every network of the run trained so far: the one in training in full
    (weights, optimizer, schedule), the finished ones without their optimizer."""
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return {}, ""
    with checkpoint.as_directory() as directory:
        saved = load_state(os.path.join(directory, STATE_FILE))
    return saved["states"], checkpoint.path


def train_epoch(run: WorkerRun, shard) -> tuple[list[float], list[torch.Tensor]]:
    """One pass over this rank's shard: ([images, loss sum, correct], recent clean batches
    for the BatchNorm re-estimate)."""
    torch.manual_seed(rank_seed(run.loop["seed"], run.rank, run.state["epoch"]))
    seen, loss_sum, correct_sum = 0, 0.0, 0.0
    recent: collections.deque[torch.Tensor] = collections.deque()
    run.model.train()
    for x, y, frames in run.batches(shard, shuffle=True):
        if len(y) < 2:
            # A last batch of one image breaks BatchNorm's training statistics. Shards are
            # split equally, so every rank skips the same step (DDP stays in lockstep).
            continue
        recent.append(run.prepare(x))
        while sum(len(r) for r in recent) - len(recent[0]) >= BN_CALIBRATION_IMAGES:
            recent.popleft()
        loss, correct = train_step(
            run.name, run.model, run.optimizer, x, y, run.weights, run.augment,
            run.dtype, run.scaler, run.loop["masking"], frames,
        )  # fmt: skip
        seen += len(y)
        loss_sum += float(loss.sum())
        correct_sum += float(correct.sum())
    return [seen, loss_sum, correct_sum], list(recent)


def validate(run: WorkerRun, shard, recent: list[torch.Tensor]) -> list[float]:
    """[loss sum, correct, images] of this rank's validation shard, after re-estimating the
    BatchNorm statistics on recent clean training images."""
    recalibrate_batchnorm(_unwrap(run.model), recent)
    loss_sum = correct = seen = 0.0
    with torch.inference_mode(), run.autocast():
        for x, y, _ in run.batches(shard, shuffle=False):
            loss, right = per_sample_loss(run.name, run.model, run.prepare(x), y, run.weights)
            loss_sum += float(loss.float().sum())
            correct += float(right.sum())
            seen += len(y)
    return [loss_sum, correct, seen]


def record_epoch(run: WorkerRun, totals: list[float], seconds: float, lr: float) -> dict:
    """Turn the all-reduced epoch totals into the epoch's metrics; keep the best weights."""
    seen, loss_sum, correct_sum, val_loss, val_correct, val_seen = totals
    state = run.state
    state["epoch"] += 1
    metrics = {
        "epoch": state["epoch"],
        "train_loss": loss_sum / max(1.0, seen),
        "val_loss": val_loss / max(1.0, val_seen),
        "images_per_s": seen / max(seconds, 1e-9),
        "lr": lr,
    }
    if run.name != "autoencoder":
        metrics["train_accuracy"] = correct_sum / max(1.0, seen)
        metrics["val_accuracy"] = val_correct / max(1.0, val_seen)
    if run.device.type == "cuda":
        metrics["gpu_peak_mib"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    state["history"].append(metrics)
    if metrics["val_loss"] < state["best_val_loss"]:
        state.update(best_val_loss=metrics["val_loss"], best_epoch=state["epoch"], bad_epochs=0)
        state["best"] = to_cpu(_unwrap(run.model).state_dict())
    else:
        state["bad_epochs"] += 1
        patience = run.loop["patience"]
        state["stopped"] = patience is not None and state["bad_epochs"] >= patience
    return metrics


def report_epoch(run: WorkerRun, metrics: dict, finished: dict[str, dict]) -> None:
    """Report the epoch to Ray Train; rank 0 attaches the checkpoint (CPU tensors only): this
    network's state and the ``finished`` networks' before it in the run."""
    if run.rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    shown = " ".join(f"{key}={value:.4g}" for key, value in metrics.items() if key != "epoch")
    stop_note = " (early stop: no val-loss gain)" if run.state["stopped"] else ""
    _progress(f"[{run.name}] epoch {run.state['epoch']}/{run.loop['epochs']} {shown}{stop_note}")
    run.state["model"] = to_cpu(_unwrap(run.model).state_dict())
    run.state["optimizer"] = to_cpu(run.optimizer.state_dict())
    run.state["schedule"] = run.schedule.state_dict() if run.schedule is not None else {}
    saved = {"states": {**finished, run.name: run.state}}
    with tempfile.TemporaryDirectory() as directory:
        save_state(saved, os.path.join(directory, STATE_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
    faults.after_epoch(run.name, run.state["epoch"], _progress)


def train_loop_per_worker(loop: dict) -> None:
    """One Ray Train worker: train each network of ``loop['networks']`` in turn, for its
    epochs, reporting each epoch. One worker group (and one Ray Train start) serves them all;
    a restored checkpoint says which are finished and where the one in training stands."""
    states, source = _checkpointed()
    finished: dict[str, dict] = {}
    for network in loop["networks"]:
        name = network["network"]
        state = states.get(name)
        if state is not None and _finished(state, network):
            rank = ray.train.get_context().get_world_rank()
            if rank == 0:
                _progress(f"[{name}] resuming after epoch {state['epoch']} from {source}")
            _keep_result(finished, network, state, rank)
            continue
        run = start_worker_run(network, state, source)
        train_shard = ray.train.get_dataset_shard(network["train_set"])
        val_shard = ray.train.get_dataset_shard(network["val_set"])
        while not _finished(run.state, network):
            started = time.perf_counter()
            train_totals, recent = train_epoch(run, train_shard)
            lr = run.optimizer.param_groups[0]["lr"]
            if run.schedule is not None:
                run.schedule.step()
            seconds = time.perf_counter() - started
            val_totals = validate(run, val_shard, recent)
            totals = _all_reduce_sum(train_totals + val_totals, run.device)
            report_epoch(run, record_epoch(run, totals, seconds, lr), finished)
        _keep_result(finished, network, run.state, run.rank)


def _keep_result(finished: dict[str, dict], network: dict, state: dict, rank: int) -> None:
    """A finished network's result (its state less the weights in training and the optimizer):
    in ``finished``, for the checkpoints of the networks after it, and (rank 0) under the
    network's own run key, for a later run that trains it with the same settings beside
    networks with other settings."""
    finished[network["network"]] = result = {
        key: value for key, value in state.items() if key not in ("optimizer", "model")
    }
    if rank == 0:
        save_state(result, network["result_uri"])


@dataclass
class TrainedNetwork:
    name: str
    state_dict: dict  # the weights of the best validation epoch
    history: list[dict]
    best_epoch: int
    worker_nodes: list[str]  # Ray node id of each rank, in rank order
    spec: dict | None = None  # architecture and normalization (build_network)

    def model(self, image_size: int) -> nn.Module:
        model = build_network(self.name, image_size, self.spec)
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class Scaling:
    min_workers: int
    max_workers: int
    use_gpu: bool
    cpus_per_worker: int

    @property
    def elastic(self) -> bool:
        return self.max_workers > self.min_workers

    def describe(self) -> str:
        count = (
            f"{self.min_workers}-{self.max_workers} (elastic)"
            if self.elastic
            else str(self.max_workers)
        )
        return (
            f"{count} worker(s), {self.cpus_per_worker} CPU"
            + (" and 1 GPU" if self.use_gpu else "")
            + " each"
        )

    def scaling_config(self) -> ScalingConfig:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1
        return ScalingConfig(
            # A (min, max) range is Ray Train V2's elastic training: it starts once MIN workers
            # fit, asks the autoscaler for MAX, and grows the group as nodes arrive.
            num_workers=(self.min_workers, self.max_workers) if self.elastic else self.max_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=resources,
            # GPU workers pack (fast links between GPUs of a node); CPU workers spread, each
            # then gets a node's cores for its compute-bound share of DDP.
            placement_strategy="PACK" if self.use_gpu else "SPREAD",
        )


def decide_scaling(config: TrainConfig) -> Scaling:
    """Workers and their resources from the flags and what the cluster has now.

    ``--use-gpu`` asks for GPUs whether or not one is up: on an autoscaling cluster the
    request is what makes the autoscaler start GPU nodes. Without the flag, GPUs are used when
    the cluster has some now (a local Ray, a fixed cluster).

    The images are decoded and materialized before the trainers start, so Ray Data needs no
    CPU while they run: a worker may take a whole node's CPUs (one worker on a 2-CPU node
    gets both, and its torch threads match).
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = config.cluster.use_gpu if config.cluster.use_gpu is not None else gpus > 0
    if config.cluster.num_workers is not None:
        low, high = config.cluster.num_workers
    else:
        low = high = max(1, gpus) if use_gpu else 1
    if config.cluster.cpus_per_worker is not None:
        cpus = config.cluster.cpus_per_worker
    else:
        node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
        largest = max(node_cpus, default=1)
        if use_gpu:
            cpus = max(1, min(2, largest))
        else:
            # Nodes an autoscaler has not started yet are unknown: size for those up now, and
            # never below one CPU (a head with 0 CPUs leaves all work to worker nodes).
            per_node = math.ceil(low / max(1, sum(1 for c in node_cpus if c > 0)))
            cpus = max(1, min(largest // per_node, int(resources.get("CPU", 1)) // low))
    return Scaling(low, high, use_gpu=use_gpu, cpus_per_worker=cpus)


def checkpoint_storage(config: TrainConfig) -> str:
    return config.cluster.storage_path or stores.join(config.output, "checkpoints")


def result_uri(config: TrainConfig, network: str, data_fingerprint: dict | None) -> str:
    """Where a network's finished training is kept, under its run key."""
    key = config.run_key(network, data_fingerprint)
    return stores.join(checkpoint_storage(config), "results", f"{key}.pt")


def trained_before(config: TrainConfig, networks: list[str], data_fingerprint: dict | None) -> bool:
    """Whether every one of ``networks`` finished a run with these settings on these data
    (``fit_networks`` then trains none of them again)."""
    return all(stores.exists(result_uri(config, n, data_fingerprint)) for n in networks)


def run_name(keys: list[str]) -> str:
    """The Ray Train run of networks trained together, from their run keys (TrainConfig.run_key):
    the same settings on the same data resume the same run (one network alone: its own key)."""
    if len(keys) == 1:
        return keys[0]
    return "networks-" + hashlib.sha256("|".join(keys).encode()).hexdigest()[:10]


def _run_config(config: TrainConfig, name: str) -> RunConfig:
    storage = checkpoint_storage(config)
    fs, path = stores.resolve(storage)
    return RunConfig(
        name=name,
        storage_path=path,
        storage_filesystem=fs if stores.is_remote(storage) else None,
        failure_config=FailureConfig(max_failures=config.cluster.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )


@dataclass
class NetworkData:
    """What one network trains on: its training and validation datasets, its loss's class
    weights (None: unweighted)."""

    train: ray.data.Dataset
    val: ray.data.Dataset
    weights: list[float] | None = None


def fit_networks(
    config: TrainConfig,
    scaling: Scaling,
    data: dict[str, NetworkData],
    data_fingerprint: dict | None = None,
) -> dict[str, TrainedNetwork]:
    """Train the networks of ``data`` in turn (in its order) in one TorchTrainer run, and
    return each one's best-validation weights (on the CPU, whatever device trained them).

    One worker group serves every network: Ray Train starts once per training job, not once
    per network (about 8 s each on this machine's CPUs). Datasets that several networks share
    are split once."""
    keys = {network: config.run_key(network, data_fingerprint) for network in data}
    datasets: dict[str, ray.data.Dataset] = {}

    def dataset_name(dataset: ray.data.Dataset, kind: str) -> str:
        for name, known in datasets.items():
            if known is dataset:
                return name
        name = f"{kind}_{len(datasets)}"
        datasets[name] = dataset
        return name

    networks = []
    for network, entry in data.items():
        settings = config.network(network)
        networks.append(
            {
                "network": network,
                "result_uri": result_uri(config, network, data_fingerprint),
                "train_set": dataset_name(entry.train, "train"),
                "val_set": dataset_name(entry.val, "val"),
                "image_size": config.image_size,
                "epochs": settings.epochs,
                "lr": config.learning_rate(network),  # --lr-scaling with the batch size
                "weight_decay": settings.weight_decay,
                "lr_schedule": settings.lr_schedule,
                "patience": settings.early_stopping_patience,
                "batch_size": config.batch_size,
                "class_weights": entry.weights,
                "augment": network != "autoencoder",
                "spec": config.network_spec(network),
                "acquisition_shift": config.robustness.acquisition_shift,
                "framing": config.robustness.framing_augmentation,
                "masking": config.robustness.autoencoder_masking
                if network == "autoencoder"
                else 0.0,
                "backbone_lr_scale": config.robustness.backbone_lr_scale
                if network != "autoencoder"
                else 1.0,
                "seed": config.seed,
                "threads": scaling.cpus_per_worker,
                "precision": config.cluster.precision,
            }
        )
    # A network trained before with these settings on these data (its result under its own
    # run key) is not trained again; with none left, Ray Train does not start at all.
    results = {}
    for network in networks:
        name, uri = network["network"], network["result_uri"]
        if stores.exists(uri):
            results[name] = load_state(uri)
            print(f"[{name}] resuming after epoch {results[name]['epoch']} from {uri}", flush=True)
    to_train = [network for network in networks if network["network"] not in results]
    if to_train:
        results.update(_fit(config, scaling, to_train, datasets, run_name(list(keys.values()))))
    trained = {}
    for network in data:
        state = results[network]
        spec = {k: v for k, v in config.network_spec(network).items() if k != "pretrained"}
        trained[network] = TrainedNetwork(
            network, state["best"], state["history"], state["best_epoch"],
            state["worker_nodes"], spec,
        )  # fmt: skip
    return trained


def _fit(
    config: TrainConfig, scaling: Scaling, networks: list[dict], datasets: dict, name: str
) -> dict[str, dict]:
    """One TorchTrainer run of ``networks`` (in turn); each one's final state."""
    used = {network[key] for network in networks for key in ("train_set", "val_set")}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"networks": networks},
        scaling_config=scaling.scaling_config(),
        datasets={key: value for key, value in datasets.items() if key in used},
        dataset_config=DataConfig(datasets_to_split="all"),
        run_config=_run_config(config, name),
    )
    result = trainer.fit()
    names = [network["network"] for network in networks]
    if result.checkpoint is None:
        raise RuntimeError(f"{', '.join(names)}: training reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        states = load_state(os.path.join(directory, STATE_FILE))["states"]
    return {name: states[name] for name in names}


def fit_network(
    network: str,
    config: TrainConfig,
    scaling: Scaling,
    train: ray.data.Dataset,
    val: ray.data.Dataset,
    weights: list[float] | None,
    data_fingerprint: dict | None = None,
) -> TrainedNetwork:
    """One network alone (the benchmarks' and the device check's): fit_networks of one."""
    data = {network: NetworkData(train, val, weights)}
    return fit_networks(config, scaling, data, data_fingerprint)[network]
