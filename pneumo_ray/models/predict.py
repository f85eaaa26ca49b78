"""One prediction path for training, evaluation and scoring: Ray Data model actors.

    decoded images (or raw bytes) -> ModelActor (CPU or GPU; loads the networks once)
        -> "networks": raw outputs (logits, probabilities, embedding, autoencoder scores), which the
           training job uses to choose thresholds and fit the KNN and normal references
        -> "bundle": every output column of the finished bundle (evaluation, scoring)

The passes over train/validation/test after training run here, on the cluster (on GPUs when
asked), never in the driver. The scoring job's actor is a subclass that writes its rows as an
Arrow table in the Parquet schema.

GPU decode: the decode tasks read each file and pass on the bytes of the JPEGs nvJPEG can
take (``image_data``); they decode everything else (PNG, DICOM, EXIF-rotated or CMYK JPEGs)
themselves, in parallel on the CPUs, and pass on its pixels (``image_decoded`` marks those
rows). The actor decodes the JPEG bytes on its GPU (``torchvision.io.decode_jpeg``); a batch
nvJPEG refuses, or any bytes on an actor without CUDA, go through the CPU decoder there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import ray

from pneumo_ray.io.images import (
    IMAGE_STATS,
    ImageDecodeError,
    decode_image,
    gpu_decodable,
    image_stats,
    to_model_input,
)
from pneumo_ray.models.outputs import network_outputs

if TYPE_CHECKING:
    import torch

# torch is imported where it runs (actors, training workers), never at import: the scoring
# driver imports this module for the actor class and stays about 450 MB smaller without it.

OUTPUTS = ("networks", "bundle")
DECODE_MODES = ("auto", "cpu", "gpu")
# Which copy of a film a row is, where a pass takes several (the training references).
VARIANT_COLUMN = "variant"
PASSTHROUGH = ("image_uri", "label_index", "image_bytes", "image_mtime_ns", VARIANT_COLUMN)


@dataclass
class Networks:
    """Trained networks not yet in a bundle (CPU state dicts), for the post-training passes."""

    image_size: int
    states: dict[str, dict]  # network name -> state dict
    specs: dict[str, dict] | None = None  # network name -> build_network spec
    tta: str = "none"
    inpaint: bool = True  # compute the autoencoder's inpainting error (four more passes)
    patch_memory: np.ndarray | None = None  # PatchCore's bank: patch distances, not features

    def build(self, device: torch.device) -> dict[str, torch.nn.Module]:
        import torch

        from pneumo_ray.models.networks import build_network

        models = {}
        for name, state in self.states.items():
            model = build_network(name, self.image_size, (self.specs or {}).get(name))
            model.load_state_dict(state)
            if name == "patchcore":
                model.set_memory(self.patch_memory)
            model.to(device).eval()
            if device.type == "cpu":
                model.to(memory_format=torch.channels_last)
            models[name] = model
        return models


# Model actors sharing one GPU (--actors-per-gpu): while one runs its networks, another turns
# its last batch into Arrow rows and takes the next one in, so the GPU waits less on the host.
ACTORS_PER_GPU = 2


@dataclass
class ActorPlan:
    min_actors: int
    max_actors: int
    use_gpu: bool
    threads: int
    actors_per_gpu: int = 1  # GPU actors: each asks for 1/actors_per_gpu of a GPU

    @property
    def gpus_per_actor(self) -> float:
        return 1.0 / self.actors_per_gpu if self.use_gpu else 0.0

    def describe(self) -> str:
        count = (
            str(self.max_actors)
            if self.min_actors == self.max_actors
            else f"{self.min_actors}-{self.max_actors} (autoscaling)"
        )
        where = (
            f"GPU ({self.actors_per_gpu} per GPU)"
            if self.use_gpu
            else f"CPU with {self.threads} torch threads each"
        )
        return f"{count} model actor(s) on {where}"

    def map_kwargs(self) -> dict:
        """The resources and pool of ``map_batches`` for model actors of this plan."""
        return {
            "compute": ray.data.ActorPoolStrategy(
                min_size=self.min_actors, max_size=self.max_actors
            ),
            "num_cpus": 0 if self.use_gpu else 1,
            "num_gpus": self.gpus_per_actor,
            "scheduling_strategy": "SPREAD",  # one actor per node before two on one
        }


def plan_actors(
    workers: tuple[int, int] | None,
    use_gpu: bool | None,
    threads: int | None = None,
    actors_per_gpu: int = ACTORS_PER_GPU,
) -> ActorPlan:
    """Actor pool size and torch threads from the flags and what the cluster has now.

    ``use_gpu=True`` asks for GPU actors even when no GPU is up (the autoscaler starts GPU
    nodes for them); None uses GPUs when the cluster has some now. GPU actors take
    1/``actors_per_gpu`` of a GPU each, and by default there are that many per GPU up now.
    A (min, max) range gives an autoscaling actor pool. A CPU actor reserves one logical CPU,
    leaving the rest of its node to the decode tasks; its torch threads use the node's cores
    shared among its actors.
    """
    if actors_per_gpu < 1:
        raise ValueError(f"actors per GPU must be at least 1, got {actors_per_gpu}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    use_gpu = use_gpu if use_gpu is not None else gpus > 0
    nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    if workers is not None:
        low, high = workers
    else:
        low = high = max(1, gpus) * actors_per_gpu if use_gpu else max(1, len(nodes))
    cpus = [int(n["Resources"].get("CPU", 1)) for n in nodes] or [1]
    threads = threads or max(1, min(cpus) // max(1, math.ceil(low / len(cpus))))
    return ActorPlan(low, high, use_gpu, 1 if use_gpu else threads, actors_per_gpu)


# --- decoding inside the actor ---------------------------------------------------------------


def draft_scale(width: int, height: int, size: int) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's JPEG draft mode decodes at for a ``size`` target."""
    scale = min(width // size, height // size)
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def resize_like_pillow(image: torch.Tensor, size: int) -> torch.Tensor:
    """A full-size decoded JPEG ``(1, H, W)`` uint8 (any device) -> ``(size, size)`` uint8, as
    the CPU decoder makes it: draft mode's DCT downscaling (a box average over scale x scale
    pixels), then Pillow's bilinear resize, which antialiases when it shrinks."""
    import torch
    import torch.nn.functional as F

    _, height, width = image.shape
    scale = draft_scale(width, height, size)
    x = image[None].float()  # (1, 1, H, W)
    if scale > 1:
        x = F.avg_pool2d(x, kernel_size=scale, stride=scale, ceil_mode=True)
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)[0, 0]


class ImageDecoder:
    """Bytes -> (B, S, S) uint8 images on the actor's device, GPU (nvJPEG) where it can."""

    def __init__(self, image_size: int, device: torch.device, gpu: bool) -> None:
        self.image_size = image_size
        self.device = device
        self.gpu = gpu and device.type == "cuda"
        self.reported_fallback = False
        if gpu and not self.gpu:
            print(
                "[pneumo_ray] GPU JPEG decode asked for, but this actor has no CUDA device: "
                "falling back to the CPU decoder",
                flush=True,
            )

    def _cpu(self, data: bytes) -> torch.Tensor:
        import torch

        return torch.from_numpy(decode_image(data, self.image_size).copy())

    def _gpu_batch(self, blobs: list[bytes]) -> list[torch.Tensor]:
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        decoded = decode_jpeg(encoded, mode=ImageReadMode.GRAY, device=self.device)
        return [resize_like_pillow(image, self.image_size) for image in decoded]

    def __call__(
        self, blobs: list[bytes | None], errors: list[str], decoded: list[bool] | None = None
    ) -> torch.Tensor:
        """Decode every row whose ``errors`` entry is empty; a failure becomes its error.

        ``decoded``: the rows whose blob is already the decoded ``(S, S)`` pixels (the decode
        task's, for files nvJPEG cannot take); the others are then JPEGs it can. Without it,
        each blob is a file's bytes and its header says where it decodes.
        """
        import torch

        n, size = len(blobs), self.image_size
        images = torch.zeros((n, size, size), dtype=torch.uint8, device=self.device)
        ready = list(decoded) if decoded is not None else [False] * n
        usable = [i for i in range(n) if not errors[i]]
        if pixel_rows := [i for i in usable if ready[i]]:
            pixels = np.stack([np.frombuffer(blobs[i], dtype=np.uint8) for i in pixel_rows])
            images[pixel_rows] = torch.from_numpy(pixels.reshape(-1, size, size)).to(self.device)
        rows = [i for i in usable if not ready[i]]
        # the decode task checked each header where it passed ``decoded``
        on_gpu = {i for i in rows if self.gpu and (decoded is not None or gpu_decodable(blobs[i]))}
        if on_gpu:
            try:
                order = sorted(on_gpu)
                for i, image in zip(order, self._gpu_batch([blobs[i] for i in order]), strict=True):
                    images[i] = image
            except RuntimeError as exc:  # nvJPEG refused one of them: decode these on the CPU
                if not self.reported_fallback:
                    print(f"[pneumo_ray] nvJPEG refused a batch ({exc}); CPU decode", flush=True)
                    self.reported_fallback = True
                on_gpu = set()
        for i in rows:
            if i in on_gpu:
                continue
            try:
                images[i] = self._cpu(blobs[i]).to(self.device)
            except ImageDecodeError as exc:
                errors[i] = str(exc)
        return images


# --- the actor -------------------------------------------------------------------------------


class ModelActor:
    """Ray Data actor: loads the networks (or a whole bundle) once; runs them on each batch.

    ``source``: a bundle URI, a Bundle, or Networks (the last two usually as an ObjectRef).
    ``outputs``: "networks" for the raw outputs of the networks given, "bundle" for every
    output column of a bundle.
    """

    def __init__(
        self,
        source,
        outputs: str,
        use_gpu: bool,
        threads: int,
        gpu_decode: bool = False,
    ) -> None:
        import torch

        from pneumo_ray.models.bundle import Bundle, load_bundle

        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if isinstance(source, ray.ObjectRef):
            source = ray.get(source)
        if isinstance(source, str):
            source = load_bundle(source, self.device)
        if isinstance(source, Bundle):
            self.bundle, self.models = source.to(self.device), None
        else:
            self.bundle, self.models = None, source.build(self.device)
        self.tta, self.inpaint = source.tta, source.inpaint
        if outputs not in OUTPUTS or (outputs == "bundle" and self.bundle is None):
            raise ValueError(f"outputs {outputs!r} needs a bundle source; got {type(source)}")
        self.outputs = outputs
        self.decoder = ImageDecoder(source.image_size, self.device, gpu_decode)
        # None when called outside Ray (a benchmark or test calling the actor directly)
        self.node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
        print(f"[pneumo_ray] model actor ready on node {self.node} ({self.device})", flush=True)

    def images(self, batch: dict[str, np.ndarray]) -> tuple[torch.Tensor | np.ndarray, list]:
        """The batch's decoded images and per-row errors ("" when usable)."""
        errors = (
            [str(e) for e in batch["error"]] if "error" in batch else [""] * len(batch["image_uri"])
        )
        if "image_data" in batch:
            decoded = list(batch["image_decoded"]) if "image_decoded" in batch else None
            return self.decoder(list(batch["image_data"]), errors, decoded), errors
        return batch["image"], errors

    def predict(self, images, notes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The ``outputs`` this actor was made for, for a batch of decoded images (``notes``:
        their metadata's scope objections, for a bundle's scope columns)."""
        if self.outputs == "bundle":
            return self.bundle.predict(images, notes)
        import torch

        models = self.models if self.models is not None else self.bundle.networks
        x = to_model_input(images).to(self.device)  # (B, 1, S, S)
        if self.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        return network_outputs(models, x, self.tta, self.inpaint)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        images, errors = self.images(batch)
        ok = np.array([not e for e in errors], dtype=bool)
        if not ok.all():
            raise ValueError("training and evaluation splits hold decoded images only")
        columns = {key: batch[key] for key in PASSTHROUGH if key in batch}
        columns.update(self.predict(images, batch.get("scope_note")))
        if self.outputs == "networks":  # the training job's drift reference needs them
            columns.update(usable_image_stats(batch, images, ok))
        return columns_to_table(columns)


def usable_image_stats(batch: dict[str, np.ndarray], images, ok: np.ndarray) -> dict:
    """IMAGE_STATS of the rows where ``ok``: the decode tasks' columns when the batch has them
    (CPU decode), else computed here on the actor's device (the actor decoded the bytes)."""
    if all(name in batch for name in IMAGE_STATS):
        return {name: np.asarray(batch[name], dtype=np.float32)[ok] for name in IMAGE_STATS}
    return image_stats(select_rows(images, ok))


def select_rows(images: np.ndarray | torch.Tensor, keep: np.ndarray) -> np.ndarray | torch.Tensor:
    """The rows of a numpy or torch (any device) batch where ``keep`` (numpy bool) is True."""
    if isinstance(images, np.ndarray):
        return images[keep]
    import torch

    if isinstance(images, torch.Tensor):
        return images[torch.from_numpy(keep).to(images.device)]
    return images[keep]


def columns_to_table(columns: dict[str, np.ndarray]) -> pa.Table:
    """numpy columns -> an Arrow table; (B, K) arrays become fixed-size lists."""
    arrays = {}
    for name, values in columns.items():
        values = np.asarray(values)
        if values.ndim == 2:
            flat = pa.array(
                values.reshape(-1).tolist() if values.dtype == object else values.reshape(-1)
            )
            arrays[name] = pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
        else:
            arrays[name] = pa.array(values.tolist() if values.dtype == object else values)
    return pa.table(arrays)


def collect(dataset: ray.data.Dataset) -> dict[str, np.ndarray]:
    """Every row of a (small-column) dataset in the driver, as numpy columns; list columns
    come back as (N, K) arrays."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in dataset.iter_batches(batch_size=4096, batch_format="numpy"):
        for key, value in batch.items():
            if value.dtype == object and len(value) and isinstance(value[0], np.ndarray):
                value = np.stack(value)
            parts.setdefault(key, []).append(value)
    return {key: np.concatenate(value) for key, value in parts.items()}


def run_models(
    dataset: ray.data.Dataset,
    source,
    plan: ActorPlan,
    outputs: str = "networks",
    batch_size: int = 128,
) -> dict[str, np.ndarray]:
    """Run ``source`` (Networks, a Bundle, or a bundle URI) over a decoded, labelled dataset
    in model actors on the cluster; returns the output columns with image_uri and
    label_index, in image_uri order."""
    if outputs not in OUTPUTS:
        raise ValueError(f"outputs must be one of {OUTPUTS}, got {outputs!r}")
    reference = source if isinstance(source, str) else ray.put(source)
    predicted = dataset.map_batches(
        ModelActor,
        fn_constructor_kwargs={
            "source": reference,
            "outputs": outputs,
            "use_gpu": plan.use_gpu,
            "threads": plan.threads,
        },
        batch_size=batch_size,
        batch_format="numpy",
        **plan.map_kwargs(),
    )
    return in_uri_order(collect(predicted))


def in_uri_order(columns: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The rows sorted by image_uri: the actors' rows arrive in whatever order their blocks
    finished, and what is fitted on them (the KNN table, PatchCore's memory draw) is then
    the same on every run."""
    order = np.argsort(columns["image_uri"].astype(str), kind="stable")
    return {key: value[order] for key, value in columns.items()}
