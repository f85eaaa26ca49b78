from __future__ import annotations

import pytest

from pneumo_ray.config import ConfigError, NetworkConfig, TrainConfig


def config(**overrides) -> TrainConfig:
    return TrainConfig.from_flat(data="/s", output="/o", **overrides)


@pytest.mark.parametrize(
    ("overrides", "flag"),
    [
        ({"anomaly_score": "ssim"}, "--anomaly-score"),
        ({"anomaly_k": 0}, "--anomaly-k"),
        ({"knn_k": 0}, "--knn-k"),
        ({"binary_threshold": "half"}, "--binary-threshold"),
        ({"target_sensitivity": 0.3}, "--target-sensitivity"),
        ({"binary": NetworkConfig(10, 1e-3, weight_decay=-1.0)}, "--weight-decay"),
        ({"multiclass": NetworkConfig(10, 1e-3, lr_schedule="step")}, "--lr-schedule"),
        ({"lr_scaling": "cubic"}, "--lr-scaling"),
    ],
)
def test_bad_settings_name_their_flag(overrides, flag):
    with pytest.raises(ConfigError, match=flag):
        config(**overrides)


def test_settings_that_shape_a_network_change_its_run_key():
    base = config()
    assert config().run_key("binary") == base.run_key("binary")
    cosine = config(binary=NetworkConfig(10, 3e-5, lr_schedule="cosine"))
    assert cosine.run_key("binary") != base.run_key("binary")
    assert cosine.run_key("multiclass") == base.run_key("multiclass")
    # Thresholds and scores are chosen after training: they do not restart it.
    assert config(target_sensitivity=0.9).run_key("binary") == base.run_key("binary")


@pytest.mark.parametrize(
    ("scaling", "batch", "factor"),
    [("none", 256, 1.0), ("sqrt", 128, 2.0), ("linear", 128, 4.0), ("linear", 32, 1.0)],
)
def test_learning_rates_follow_the_batch_as_asked(scaling, batch, factor):
    scaled = config(lr_scaling=scaling, batch_size=batch)
    assert scaled.lr_factor == pytest.approx(factor)
    unscaled = config(batch_size=batch)
    # a scaled rate is another training run; no scaling keeps the key runs before it had
    assert (scaled.run_key("binary") == unscaled.run_key("binary")) == (factor == 1.0)
    assert config().lr_factor == 1.0


def test_knn_k_flag_takes_auto_or_a_number(capsys):
    from pneumo_ray.cli import train_parser

    parse_args = train_parser().parse_args
    assert parse_args(["--data", "/s", "--output", "/o"]).knn_k is None
    assert parse_args(["--data", "/s", "--output", "/o", "--knn-k", "auto"]).knn_k is None
    assert parse_args(["--data", "/s", "--output", "/o", "--knn-k", "25"]).knn_k == 25
    with pytest.raises(SystemExit):
        parse_args(["--data", "/s", "--output", "/o", "--knn-k", "many"])
    assert "expected auto or a whole number" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"), [("3", (3, 3)), ("1-4", (1, 4)), (2, (2, 2)), (None, None)]
)
def test_num_workers_takes_a_count_or_a_range(text, expected):
    assert config(num_workers=text).cluster.num_workers == expected


@pytest.mark.parametrize("text", ["0", "4-2", "0-3", "a-b", "1-2-3", "-1"])
def test_bad_worker_counts_name_the_flag(text):
    with pytest.raises(ConfigError, match="--num-workers"):
        config(num_workers=text)
    from pneumo_ray.scoring.score import ScoreConfig

    with pytest.raises(ConfigError, match="--num-workers"):
        ScoreConfig(model="/m", inputs=["/i"], output="/o", num_workers=text)


def test_bad_precision_and_decode_name_their_flags():
    from pneumo_ray.scoring.score import ScoreConfig

    with pytest.raises(ConfigError, match="--precision"):
        config(precision="fp8")
    with pytest.raises(ConfigError, match="--decode"):
        ScoreConfig(model="/m", inputs=["/i"], output="/o", decode="fpga")


def test_changed_data_at_the_same_uri_is_a_new_run():
    base = config()
    before = {"train": "aaa", "val": "bbb"}
    after = {"train": "aaa-rewritten", "val": "bbb"}
    assert base.run_key("binary", before) == base.run_key("binary", dict(before))
    assert base.run_key("binary", before) != base.run_key("binary", after)


def test_settings_sit_in_their_groups_and_the_card_keeps_them_by_flag_name():
    settings = TrainConfig.from_flat(
        data="/s", output="/o", knn_k=5, tta="flip", use_gpu=False, limit=3
    )
    assert settings.validation.knn_k == 5 and settings.robustness.tta == "flip"
    assert settings.cluster.use_gpu is False and settings.limit == 3
    flat = settings.to_dict()  # the card's training.config and MLflow's parameters
    assert (flat["knn_k"], flat["tta"], flat["use_gpu"], flat["limit"]) == (5, "flip", False, 3)
    assert flat["binary"]["lr"] == 3e-5 and not {"validation", "robustness", "cluster"} & set(flat)
    with pytest.raises(TypeError):
        TrainConfig.from_flat(data="/s", output="/o", no_such_setting=1)


def test_each_group_is_checked_once_every_override_is_in_place():
    # A network given directly is checked as the flags' are, and the refusal names the flag.
    with pytest.raises(ConfigError, match="--binary-epochs"):
        TrainConfig.from_flat(data="/s", output="/o", binary=NetworkConfig(0, 1e-3))
    with pytest.raises(ConfigError, match="--precision"):
        TrainConfig.from_flat(data="/s", output="/o", precision="fp64")
    with pytest.raises(ConfigError, match="--pretrained needs a pretrained --architecture"):
        TrainConfig.from_flat(data="/s", output="/o", pretrained="imagenet")
