"""Outputs that load on any device, precision and per-rank seeds, and the GPU decode path
(its CPU fallback here)."""

from __future__ import annotations

import io
from unittest import mock

import numpy as np
import pytest
import torch
import torch.serialization

from pneumo_ray.io.images import decode_image, gpu_decodable
from pneumo_ray.models.bundle import WEIGHT_FILES, load_bundle, write_bundle
from pneumo_ray.models.predict import ImageDecoder
from pneumo_ray.training.loop import autocast_dtype, load_state, rank_seed, to_cpu

from ..conftest import CHEST_XRAY
from .test_bundle import tiny_bundle


def saved_as_if_on_cuda(payload) -> bytes:
    """What torch.save writes for ``payload`` on a GPU worker: every storage tagged cuda:0.
    Loading such a file without map_location on a CPU-only machine raises."""
    buffer = io.BytesIO()
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        torch.save(payload, buffer)
    return buffer.getvalue()


def test_a_checkpoint_saved_on_a_gpu_loads_on_a_cpu_only_machine(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "history": [{"epoch": 1}], "epoch": 1}
    path = tmp_path / "state.pt"
    path.write_bytes(saved_as_if_on_cuda(state))
    if not torch.cuda.is_available():  # the failure the loader must avoid
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    loaded = load_state(str(path))
    assert loaded["model"]["w"].device.type == "cpu"
    assert torch.equal(loaded["model"]["w"], torch.arange(4.0)) and loaded["epoch"] == 1


def test_a_bundle_whose_weights_were_saved_on_a_gpu_loads_on_cpu(tmp_path):
    bundle = tiny_bundle()
    with mock.patch.object(torch.serialization, "location_tag", lambda storage: "cuda:0"):
        write_bundle(bundle, str(tmp_path / "b"))
    data = (tmp_path / "b" / WEIGHT_FILES["binary"]).read_bytes()
    assert b"cuda:0" in data  # the file really claims GPU storages
    loaded = load_bundle(str(tmp_path / "b"))
    assert all(p.device.type == "cpu" for p in loaded.binary.parameters())
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(
        loaded.predict(images)["p_pneumonia"], bundle.predict(images)["p_pneumonia"], rtol=1e-5
    )


def test_checkpoint_state_holds_cpu_copies():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    state = to_cpu({"model": model.state_dict(), "optimizer": optimizer.state_dict()})
    tensors = [state["model"]["weight"], *state["optimizer"]["state"][0].values()]
    assert all(t.device.type == "cpu" for t in tensors)
    state["model"]["weight"].zero_()  # a copy: the live weights are untouched
    assert model.weight.abs().sum() > 0
    assert state["optimizer"]["param_groups"][0]["lr"] == optimizer.param_groups[0]["lr"]


def test_precision_defaults_to_fp32_on_cpu_and_honours_the_flag():
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) == torch.float16


def test_every_rank_draws_its_own_augmentation_and_a_resumed_epoch_the_same():
    seeds = {rank_seed(0, rank, epoch) for rank in range(4) for epoch in range(5)}
    assert len(seeds) == 20
    assert rank_seed(3, 1, 2) == rank_seed(3, 1, 2)


def test_gpu_decode_falls_back_to_the_training_decoder_without_cuda(capsys):
    files = sorted((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))[:4]
    blobs = [f.read_bytes() for f in files] + [b"not an image"]
    decoder = ImageDecoder(64, torch.device("cpu"), gpu=True)
    assert "falling back to the CPU decoder" in capsys.readouterr().out
    errors = [""] * len(blobs)
    images = decoder(blobs, errors)
    for i, blob in enumerate(blobs[:4]):
        np.testing.assert_array_equal(images[i].numpy(), decode_image(blob, 64))
    assert errors[:4] == [""] * 4 and "not a readable image" in errors[4]
    assert gpu_decodable(blobs[0]) and not gpu_decodable(blobs[4])


def test_the_decoder_takes_rows_a_decode_task_decoded_as_they_are():
    files = sorted((CHEST_XRAY / "test" / "PNEUMONIA").glob("*.jpeg"))[:3]
    pixels = [decode_image(f.read_bytes(), 64) for f in files]
    blobs = [pixels[0].tobytes(), files[1].read_bytes(), pixels[2].tobytes(), b""]
    errors = ["", "", "", "missing file"]
    images = ImageDecoder(64, torch.device("cpu"), gpu=False)(
        blobs, errors, decoded=[True, False, True, False]
    )
    for i in range(3):
        np.testing.assert_array_equal(images[i].numpy(), pixels[i])
    assert images[3].sum() == 0 and errors == ["", "", "", "missing file"]


def fake_cluster(monkeypatch, gpus: int, nodes: int = 1, cpus: int = 16) -> None:
    """What plan_actors reads from Ray: a cluster of ``nodes`` nodes with ``gpus`` GPUs."""
    from pneumo_ray.models import predict

    monkeypatch.setattr(
        predict.ray, "cluster_resources", lambda: {"CPU": cpus * nodes, "GPU": gpus}
    )
    monkeypatch.setattr(
        predict.ray,
        "nodes",
        lambda: [{"Alive": True, "Resources": {"CPU": cpus, "GPU": gpus / nodes}}] * nodes,
    )


@pytest.mark.parametrize(("per_gpu", "fraction"), [(1, 1.0), (2, 0.5), (4, 0.25)])
def test_gpu_actors_ask_for_the_fraction_of_a_gpu_they_share(monkeypatch, per_gpu, fraction):
    from pneumo_ray.models.predict import plan_actors

    fake_cluster(monkeypatch, gpus=2)
    plan = plan_actors(None, None, actors_per_gpu=per_gpu)
    kwargs = plan.map_kwargs()
    assert plan.use_gpu and kwargs["num_gpus"] == fraction and kwargs["num_cpus"] == 0
    # by default, that many actors on each GPU up now
    assert (plan.min_actors, plan.max_actors) == (2 * per_gpu, 2 * per_gpu)
    assert kwargs["compute"].min_size == 2 * per_gpu
    assert f"{per_gpu} per GPU" in plan.describe()


def test_cpu_actors_take_no_gpu_and_an_explicit_pool_size_wins(monkeypatch):
    from pneumo_ray.models.predict import plan_actors

    fake_cluster(monkeypatch, gpus=0, nodes=2, cpus=8)
    plan = plan_actors(None, None, actors_per_gpu=4)
    assert not plan.use_gpu and plan.map_kwargs()["num_gpus"] == 0
    assert (plan.min_actors, plan.threads) == (2, 8)  # one per node, its cores
    fake_cluster(monkeypatch, gpus=1)
    assert plan_actors((3, 6), True, actors_per_gpu=3).map_kwargs()["num_gpus"] == pytest.approx(
        1 / 3
    )


def test_actors_per_gpu_is_checked_where_it_is_given():
    from pneumo_ray.errors import ConfigError
    from pneumo_ray.scoring.score import ScoreConfig

    with pytest.raises(ConfigError, match="--actors-per-gpu"):
        ScoreConfig("model", ["in"], "out", actors_per_gpu=0)


def test_gpu_actors_get_larger_batches_unless_one_is_asked_for():
    from pneumo_ray.scoring.score import CPU_BATCH, GPU_BATCH, model_batch_size

    assert (model_batch_size(None, False), model_batch_size(None, True)) == (CPU_BATCH, GPU_BATCH)
    assert GPU_BATCH > CPU_BATCH
    assert model_batch_size(16, True) == model_batch_size(16, False) == 16


def test_decode_blocks_spread_small_work_lists_and_grow_to_a_gpu_batch_for_large_ones():
    from pneumo_ray.scoring.score import (
        DECODE_BLOCK_MAX,
        DECODE_BLOCK_MIN,
        DECODE_CPUS,
        GPU_BATCH,
        decode_block_rows,
    )

    slots = int(16 / DECODE_CPUS)  # decode tasks a 16-CPU node runs at once
    assert decode_block_rows(100, 16) == DECODE_BLOCK_MIN  # fewer rows than slots x minimum
    assert decode_block_rows(slots * 100, 16) == 100  # one block per decode slot
    assert decode_block_rows(slots * 100 + slots - 1, 16) == 100
    assert decode_block_rows(1_000_000, 16) == DECODE_BLOCK_MAX == GPU_BATCH
    # An autoscaling cluster's head may have no CPUs yet: blocks as large as allowed.
    assert decode_block_rows(10_000, 0) == DECODE_BLOCK_MAX
    assert decode_block_rows(10, 0) == DECODE_BLOCK_MIN
