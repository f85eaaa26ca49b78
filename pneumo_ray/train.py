"""Ray Train: data-parallel training of the three networks over Ray Data shards.

Each network is one ``TorchTrainer`` run. Workers read their shard of the decoded images with
``iter_torch_batches``, augment on the fly (the CNNs), train with DDP, and report each epoch
with a checkpoint from rank 0. A rerun with the same settings and storage resumes from the last
checkpoint; a worker lost mid-run is replaced and training goes on from the last checkpoint.
"""

from __future__ import annotations

import collections
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
from torchvision.transforms import v2

from pneumo_ray import stores
from pneumo_ray.config import TrainConfig
from pneumo_ray.images import augment_batch, to_model_input, train_augmentation
from pneumo_ray.models import ConvAutoencoder, binary_cnn, multiclass_cnn, reconstruction_error

NETWORKS = ("binary", "multiclass", "autoencoder")
STATE_FILE = "state.pt"
SHUFFLE_BUFFER = 512
BN_CALIBRATION_IMAGES = 512  # recent clean training images that re-estimate BatchNorm stats


def build_network(name: str, image_size: int) -> nn.Module:
    if name == "binary":
        return binary_cnn(image_size)
    if name == "multiclass":
        return multiclass_cnn(image_size)
    if name == "autoencoder":
        return ConvAutoencoder(image_size)
    raise ValueError(f"unknown network {name!r}; expected one of {NETWORKS}")


def class_weights(label_counts: dict[str, int], labels: tuple[str, ...]) -> list[float]:
    """Inverse-frequency weights, n / (k * n_c): each class weighs the same in the loss."""
    total = sum(label_counts.get(label, 0) for label in labels)
    return [total / (len(labels) * max(1, label_counts.get(label, 0))) for label in labels]


def per_sample_loss(
    name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss of each image (B,), correct predictions (B,) bool) for one batch.

    ``y`` is the three-class index; the binary network learns ``y > 0`` (pneumonia).
    """
    if name == "autoencoder":
        loss = reconstruction_error(model, x)
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
    augment: v2.Transform | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch ``x`` (B, 1, S, S) in [0, 1]; returns per-image
    (loss, correct), detached."""
    if augment is not None:
        x = augment_batch(x, augment)
    if x.device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    loss, correct = per_sample_loss(name, model, x, y, weights)
    optimizer.zero_grad(set_to_none=True)
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
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
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


class ImageLabelCollate(NumpyBatchCollateFn):
    """The two columns training needs, as tensors (the URI strings stay behind)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        image = torch.from_numpy(np.array(batch["image"], copy=True))  # Ray's views are read-only
        return image, torch.from_numpy(batch["label_index"].astype(np.int64))


def train_loop_per_worker(loop: dict) -> None:
    """One Ray Train worker: train ``loop['network']`` for its epochs, reporting each one."""
    name, image_size = loop["network"], loop["image_size"]
    torch.set_num_threads(loop["threads"])
    torch.manual_seed(loop["seed"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    channels_last = device.type == "cpu"

    model = build_network(name, image_size)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=loop["lr"], weight_decay=loop["weight_decay"]
    )
    # Per-epoch schedule: constant (the design's) or cosine decay to 0 over the run's epochs.
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=loop["epochs"])
        if loop["lr_schedule"] == "cosine"
        else None
    )
    weights = (
        torch.tensor(loop["class_weights"], dtype=torch.float32, device=device)
        if loop["class_weights"]
        else None
    )

    state = {
        "epoch": 0,
        "history": [],
        "best_val_loss": math.inf,
        "best_epoch": -1,
        "bad_epochs": 0,
        "stopped": False,
        "best": None,
    }
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule is not None:
            schedule.load_state_dict(state["schedule"])
        if rank == 0:
            _progress(f"[{name}] resuming after epoch {state['epoch']} from {checkpoint.path}")

    node = ray.get_runtime_context().get_node_id()
    worker_nodes = [node]
    if world > 1:
        worker_nodes = [None] * world
        torch.distributed.all_gather_object(worker_nodes, node)
    state["worker_nodes"] = worker_nodes  # where this (possibly resumed) run trained

    augment = train_augmentation() if loop["augment"] else None
    per_worker_batch = max(1, loop["batch_size"] // world)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    def batches(shard, shuffle: bool):
        for image, label_index in shard.iter_torch_batches(
            batch_size=per_worker_batch,
            local_shuffle_buffer_size=SHUFFLE_BUFFER if shuffle else None,
            local_shuffle_seed=loop["seed"] + state["epoch"] if shuffle else None,
            collate_fn=ImageLabelCollate(),
        ):
            yield to_model_input(image).to(device), label_index.to(device)  # (B, 1, S, S), (B,)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    patience = loop["patience"]
    while state["epoch"] < loop["epochs"] and not state["stopped"]:
        started, seen, loss_sum, correct_sum = time.perf_counter(), 0, 0.0, 0.0
        recent: collections.deque[torch.Tensor] = collections.deque()
        model.train()
        for x, y in batches(train_shard, shuffle=True):
            if len(y) < 2:
                # A last batch of one image breaks BatchNorm's training statistics. Shards are
                # split equally, so every rank skips the same step (DDP stays in lockstep).
                continue
            recent.append(prepare(x))
            while sum(len(r) for r in recent) - len(recent[0]) >= BN_CALIBRATION_IMAGES:
                recent.popleft()
            loss, correct = train_step(name, model, optimizer, x, y, weights, augment)
            seen += len(y)
            loss_sum += float(loss.detach().sum())
            correct_sum += float(correct.sum())
        lr = optimizer.param_groups[0]["lr"]
        if schedule is not None:
            schedule.step()
        train_seconds = time.perf_counter() - started

        recalibrate_batchnorm(_unwrap(model), list(recent))
        val_loss_sum = val_correct = val_seen = 0.0
        with torch.inference_mode():
            for x, y in batches(val_shard, shuffle=False):
                loss, correct = per_sample_loss(name, model, prepare(x), y, weights)
                val_loss_sum += float(loss.sum())
                val_correct += float(correct.sum())
                val_seen += len(y)
        seen_all, loss_all, correct_all, v_loss, v_correct, v_seen = _all_reduce_sum(
            [seen, loss_sum, correct_sum, val_loss_sum, val_correct, val_seen], device
        )
        state["epoch"] += 1
        metrics = {
            "epoch": state["epoch"],
            "train_loss": loss_all / max(1.0, seen_all),
            "val_loss": v_loss / max(1.0, v_seen),
            "images_per_s": seen_all / max(train_seconds, 1e-9),
            "lr": lr,
        }
        if name != "autoencoder":
            metrics["train_accuracy"] = correct_all / max(1.0, seen_all)
            metrics["val_accuracy"] = v_correct / max(1.0, v_seen)
        state["history"].append(metrics)

        unwrapped = _unwrap(model)
        if metrics["val_loss"] < state["best_val_loss"]:
            state.update(best_val_loss=metrics["val_loss"], best_epoch=state["epoch"], bad_epochs=0)
            state["best"] = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
        else:
            state["bad_epochs"] += 1
            state["stopped"] = patience is not None and state["bad_epochs"] >= patience

        if rank == 0:
            shown = " ".join(
                f"{key}={value:.4g}" for key, value in metrics.items() if key != "epoch"
            )
            stop_note = " (early stop: no val-loss gain)" if state["stopped"] else ""
            _progress(f"[{name}] epoch {state['epoch']}/{loop['epochs']} {shown}{stop_note}")
            state["model"] = unwrapped.state_dict()
            state["optimizer"] = optimizer.state_dict()
            state["schedule"] = schedule.state_dict() if schedule is not None else {}
            with tempfile.TemporaryDirectory() as directory:
                torch.save(state, os.path.join(directory, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics, checkpoint=None)


@dataclass
class TrainedNetwork:
    name: str
    state_dict: dict  # the weights of the best validation epoch
    history: list[dict]
    best_epoch: int
    worker_nodes: list[str]  # Ray node id of each rank, in rank order

    def model(self, image_size: int) -> nn.Module:
        model = build_network(self.name, image_size)
        model.load_state_dict(self.state_dict)
        return model.eval()


@dataclass
class Scaling:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: int

    def scaling_config(self) -> ScalingConfig:
        resources = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            resources["GPU"] = 1
        return ScalingConfig(
            num_workers=self.num_workers,
            use_gpu=self.use_gpu,
            resources_per_worker=resources,
            # GPU workers pack (fast links between GPUs of a node); CPU workers spread, each
            # then gets a node's cores for its compute-bound share of DDP.
            placement_strategy="PACK" if self.use_gpu else "SPREAD",
        )


def decide_scaling(config: TrainConfig) -> Scaling:
    """Workers and their resources from the flags and what the cluster has.

    The images are decoded and materialized before the trainers start, so Ray Data needs no
    CPU while they run: a worker may take a whole node's CPUs (one worker on a 2-CPU node
    gets both, and its torch threads match). On a GPU cluster: one worker per GPU.
    """
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = config.use_gpu if config.use_gpu is not None else gpus > 0
    if config.num_workers is not None:
        num_workers = config.num_workers
    else:
        num_workers = max(1, gpus) if use_gpu else 1
    if config.cpus_per_worker is not None:
        cpus = config.cpus_per_worker
    else:
        node_cpus = [int(node["Resources"].get("CPU", 0)) for node in ray.nodes() if node["Alive"]]
        largest = max(node_cpus, default=1)
        if use_gpu:
            cpus = max(1, min(2, largest))
        else:
            per_node = math.ceil(num_workers / max(1, sum(1 for c in node_cpus if c > 0)))
            cpus = max(1, min(largest // per_node, int(resources.get("CPU", 1)) // num_workers))
    return Scaling(num_workers=num_workers, use_gpu=use_gpu, cpus_per_worker=cpus)


def _run_config(config: TrainConfig, network: str) -> RunConfig:
    storage = config.storage_path or stores.join(config.output, "checkpoints")
    fs, path = stores.resolve(storage)
    return RunConfig(
        name=config.run_key(network),
        storage_path=path,
        storage_filesystem=fs if stores.is_remote(storage) else None,
        failure_config=FailureConfig(max_failures=config.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=2),
    )


def fit_network(
    network: str,
    config: TrainConfig,
    scaling: Scaling,
    train: ray.data.Dataset,
    val: ray.data.Dataset,
    weights: list[float] | None,
) -> TrainedNetwork:
    """Train one network with a TorchTrainer and return its best-validation weights."""
    settings = config.network(network)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "network": network,
            "image_size": config.image_size,
            "epochs": settings.epochs,
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "lr_schedule": settings.lr_schedule,
            "patience": settings.early_stopping_patience,
            "batch_size": config.batch_size,
            "class_weights": weights,
            "augment": network != "autoencoder",
            "seed": config.seed,
            "threads": scaling.cpus_per_worker,
        },
        scaling_config=scaling.scaling_config(),
        datasets={"train": train, "val": val},
        dataset_config=DataConfig(datasets_to_split="all"),
        run_config=_run_config(config, network),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"{network}: training reported no checkpoint")
    with result.checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE_FILE), weights_only=True)
    return TrainedNetwork(
        network, state["best"], state["history"], state["best_epoch"], state["worker_nodes"]
    )


def collect_outputs(
    models: dict[str, nn.Module], dataset: ray.data.Dataset, batch_size: int = 128
) -> dict[str, np.ndarray]:
    """Run models over a decoded dataset in this process (no augmentation).

    Returns ``image_uri``, ``label_index`` and each given model's raw output: ``p_pneumonia``
    (binary), ``probs`` and ``embedding`` (multiclass), ``ae_mse`` and ``ae_code``
    (autoencoder: pixel error and pooled latent code).
    """
    from pneumo_ray.models.anomaly import autoencoder_outputs
    from pneumo_ray.models.knn import multiclass_outputs

    columns: dict[str, list] = {}
    with torch.inference_mode():
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            x = to_model_input(batch["image"]).contiguous(memory_format=torch.channels_last)
            out: dict[str, np.ndarray] = {
                "image_uri": batch["image_uri"],
                "label_index": batch["label_index"],
            }
            if "binary" in models:
                out["p_pneumonia"] = torch.sigmoid(models["binary"](x)).numpy()
            if "multiclass" in models:
                probs, embedding = multiclass_outputs(models["multiclass"], x)
                out["probs"], out["embedding"] = probs.numpy(), embedding.numpy()
            if "autoencoder" in models:
                mse, code = autoencoder_outputs(models["autoencoder"], x)
                out["ae_mse"], out["ae_code"] = mse.numpy(), code.numpy()
            for key, value in out.items():
                columns.setdefault(key, []).append(value)
    return {key: np.concatenate(parts) for key, parts in columns.items()}
