"""Config schema: YAML + overrides merge, and start-up errors that name the key."""

from pathlib import Path

import pytest

from ticod.config import Balance, BoxLoss, ConfigError, Precision, RoINorm, Task, load_config, to_dict

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_and_overrides():
    cfg = load_config(overrides=["data.batch_size=3", "loss.task=caption", "deepspeed.precision=fp32"])
    assert cfg.data.batch_size == 3
    assert cfg.loss.task == Task.caption
    assert cfg.deepspeed.precision == Precision.fp32
    assert to_dict(cfg)["loss"]["task"] == "caption"


@pytest.mark.parametrize("name", ["demo.yaml", "ticod_small.yaml", "ticod_large.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.num_classes >= 1


def test_paper_settings():
    large, small = load_config(CONFIGS / "ticod_large.yaml"), load_config(CONFIGS / "ticod_small.yaml")
    assert large.model.backbone.name.startswith("swin_base")
    assert large.loss.caption_weight == pytest.approx(0.2)
    assert large.deepspeed.zero_stage == 2 and large.deepspeed.precision == Precision.bf16
    assert large.model.backbone.grad_checkpointing and large.model.captioner.grad_checkpointing
    assert small.model.backbone.name.startswith("swin_tiny")
    assert small.loss.caption_weight == pytest.approx(0.1)


def test_coco_overfit_keeps_the_caption_settings_its_floors_were_measured_with():
    """configs/coco_overfit.yaml builds on demo.yaml, whose caption settings are tuned on rendered shapes:
    inherited, they cut the real-COCO overfit's box AP from 0.107 to 0.012 and left 1 distinct caption of 80
    (docs/quality.md). Its opt-in test (tests/test_coco_overfit.py) is too slow for CI, so this holds the
    settings its floors were measured with; change them with a new measurement."""
    cfg = load_config(CONFIGS / "coco_overfit.yaml")
    cap = cfg.model.captioner
    assert (cfg.loss.caption_weight, cfg.data.captions_per_image) == (1.0, 1)
    assert (cap.object_tokens, cap.num_beams, cap.length_penalty) == (10, 1, 1.0)


def test_yaml_defaults_chain(tmp_path):
    (tmp_path / "base.yaml").write_text("max_steps: 50\noptim:\n  warmup_steps: 5\n")
    (tmp_path / "child.yaml").write_text("defaults: [base.yaml]\nseed: 7\n")
    cfg = load_config(tmp_path / "child.yaml", ["max_steps=60"])
    assert (cfg.max_steps, cfg.seed, cfg.optim.warmup_steps) == (60, 7, 5)


def test_unknown_key_names_it():
    with pytest.raises(ConfigError, match=r"data\.batch_sise"):
        load_config(overrides=["data.batch_sise=3"])


def test_unknown_key_in_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("model:\n  backbone:\n    nam: swin\n")
    with pytest.raises(ConfigError, match=r"model\.backbone\.nam"):
        load_config(tmp_path / "bad.yaml")


def test_bad_type_names_it():
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        load_config(overrides=["optim.lr=fast"])


def test_bad_enum_names_it():
    with pytest.raises(ConfigError, match=r"deepspeed\.precision"):
        load_config(overrides=["deepspeed.precision=fp8"])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], "deepspeed.offload_optimizer"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
        (["max_steps=10", "optim.warmup_steps=20"], "optim.warmup_steps"),
        (["loss.balance=uncertainty", "loss.task=caption"], "loss.balance"),
        (["model.roi.iou_thresholds=[0.5,0.6]"], "model.roi"),
        (["model.captioner.n_embd=100", "model.captioner.n_head=3"], "model.captioner.n_embd"),
        (["checkpoint.keep_last=0"], "checkpoint.keep_last"),
        (["model.captioner.object_tokens=-1"], "model.captioner.object_tokens"),
        (["model.captioner.object_nms_iou=0"], "model.captioner.object_nms_iou"),
        (["model.captioner.length_penalty=nan"], "model.captioner.length_penalty"),
        (["data.train_min_sizes=[900]", "data.max_size=800"], "data.max_size"),
    ],
)
def test_impossible_combinations(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(overrides=overrides)


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("does/not/exist.yaml")


def test_balance_enum():
    assert load_config(overrides=["loss.balance=uncertainty"]).loss.balance == Balance.uncertainty


def test_empty_override_is_the_empty_string():
    # `data.tokenizer=` (use the shards' own BPE) is read by omegaconf as null, which a str field rejects.
    assert load_config(overrides=["data.tokenizer="]).data.tokenizer == ""
    assert load_config(overrides=["data.tokenizer=''"]).data.tokenizer == ""
    with pytest.raises(ConfigError, match=r"max_steps"):  # not a string: still an error naming the key
        load_config(overrides=["max_steps="])


@pytest.mark.parametrize("name", [None, "demo.yaml", "ticod_small.yaml", "ticod_large.yaml"])
def test_cascade_stage_defaults(name):
    """The paper's cascade: IoU thresholds 0.5/0.6/0.7, stage loss weights 1/0.5/0.25, in every config."""
    roi = load_config(CONFIGS / name if name else None).model.roi
    assert roi.iou_thresholds == [0.5, 0.6, 0.7]
    assert roi.stage_loss_weights == [1.0, 0.5, 0.25]
    assert roi.bbox_stds == [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]]


@pytest.mark.parametrize("name", ["ticod_small.yaml", "ticod_large.yaml"])
def test_swin_configs_take_the_reference_box_head(name):
    """The Swin Cascade R-CNN reference: 4conv1fc + SyncBN, class-specific boxes, GIoU x 10, adaptive aligned
    RoIAlign (aligned is fixed; sampling_ratio 0 is adaptive)."""
    roi = load_config(CONFIGS / name).model.roi
    assert (roi.head, roi.norm, roi.class_agnostic_bbox) == ("4conv1fc", RoINorm.syncbn, False)
    assert (roi.box_loss, roi.box_loss_weight, roi.sampling_ratio) == (BoxLoss.giou, 10.0, 0)


def test_demo_keeps_the_small_box_head():
    roi = load_config(CONFIGS / "demo.yaml").model.roi
    assert (roi.head, roi.class_agnostic_bbox, roi.box_loss) == ("shared2fc", True, BoxLoss.smooth_l1)
    assert roi.box_loss_weight == 1.0 and roi.smooth_l1_beta == pytest.approx(1 / 9)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("model.roi.head=5conv", r"model\.roi\.head"),
        ("model.roi.norm=bn", r"model\.roi\.norm"),
        ("model.roi.box_loss=l2", r"model\.roi\.box_loss"),
        ("model.roi.box_loss_weight=-1", r"model\.roi\.box_loss_weight"),
    ],
)
def test_bad_box_head_options_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(overrides=[override])
