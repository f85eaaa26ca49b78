"""An image's outputs are a function of the image: not of the batch Ray Data put it in, nor of
the order its rows came back in. A rerun of the training job then writes the same bundle
bytes (the same model_version), and the nightly run finds nothing new to score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo_ray.io.images import acquisition_shifted, to_model_input
from pneumo_ray.models.autoencoder import ConvAutoencoder
from pneumo_ray.models.cnn import binary_cnn, multiclass_cnn
from pneumo_ray.models.outputs import CPU_CHUNK, network_outputs
from pneumo_ray.models.predict import ActorPlan, Networks, run_models

SIZE = 32


def _models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    models = {
        "binary": binary_cnn(SIZE),
        "multiclass": multiclass_cnn(SIZE),
        "autoencoder": ConvAutoencoder(SIZE),
    }
    return {name: m.eval().to(memory_format=torch.channels_last) for name, m in models.items()}


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)


def _outputs(models, images: np.ndarray, tta: str = "none") -> dict[str, np.ndarray]:
    x = to_model_input(images).contiguous(memory_format=torch.channels_last)
    return network_outputs(models, x, tta)


@pytest.mark.parametrize("tta", ["none", "flip"])
def test_an_images_outputs_are_the_same_bit_for_bit_in_any_batch(tta):
    models, images = _models(), _images(CPU_CHUNK + 5)
    whole = _outputs(models, images, tta)
    alone = [_outputs(models, images[i : i + 1], tta) for i in (0, 7, CPU_CHUNK + 4)]
    middle = _outputs(models, images[3:10], tta)  # a batch of 7
    for key, value in whole.items():
        assert len(value) == len(images), key
        for row, out in zip((0, 7, CPU_CHUNK + 4), alone, strict=True):
            np.testing.assert_array_equal(out[key][0], value[row], err_msg=key)
        np.testing.assert_array_equal(middle[key], value[3:10], err_msg=key)


def test_run_models_gives_the_same_rows_in_uri_order_whatever_the_blocks(ray_local):
    import ray

    images = _images(45, seed=1)
    rows = [
        {"image": image, "image_uri": f"/store/{i:03d}.jpeg", "label_index": i % 3}
        for i, image in enumerate(images)
    ]
    states = {name: m.state_dict() for name, m in _models().items()}
    networks = Networks(SIZE, states, inpaint=True)
    plan = ActorPlan(min_actors=1, max_actors=1, use_gpu=False, threads=1)
    blocks = ray.data.from_items(rows, override_num_blocks=7)
    first = run_models(blocks, networks, plan, batch_size=10)
    reversed_blocks = ray.data.from_items(rows[::-1], override_num_blocks=3)
    second = run_models(reversed_blocks, networks, plan, batch_size=13)
    assert list(first["image_uri"]) == sorted(r["image_uri"] for r in rows)
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)


def test_an_acquisition_shifted_film_gets_the_same_pixels_in_any_batch():
    images, uris = _images(9, seed=2), np.array([f"/store/{i}.jpeg" for i in range(9)])

    def shifted(rows, seed=0):
        return acquisition_shifted({"image": images[rows], "image_uri": uris[rows]}, seed)["image"]

    whole = shifted(np.arange(9))
    assert whole.shape == images.shape and whole.dtype == np.uint8
    assert not np.array_equal(whole, images)
    np.testing.assert_array_equal(shifted(np.arange(4, 9)), whole[4:])
    np.testing.assert_array_equal(shifted(np.array([8, 2])), whole[[8, 2]])
    assert not np.array_equal(shifted(np.arange(9), seed=1), whole)
