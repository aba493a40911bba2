"""The joint TICOD model on tiny random-init configs: losses, gradients, task switches, eval outputs."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from ticod.config import Config, load_config
from ticod.models import TICOD

NUM_CLASSES = 4
VOCAB, BOS, EOS = 40, 1, 2
# A CPU-sized model: 16-wide Swin with window 4, 32-channel FPN, 64-wide RoI heads, 2-layer GPT-2.
TINY = [
    f"model.num_classes={NUM_CLASSES}",
    "model.fpn_channels=32",
    "model.backbone.name=swin_tiny_patch4_window7_224",
    "model.backbone.pretrained=false",
    "model.backbone.drop_path_rate=0.0",
    "model.backbone.kwargs={embed_dim: 16, depths: [1, 1, 2, 1], num_heads: [1, 2, 2, 4], window_size: 4}",
    "model.rpn.anchor_sizes=[16, 32, 64, 128, 256]",
    "model.rpn.pre_nms_top_n_train=200",
    "model.rpn.post_nms_top_n_train=100",
    "model.rpn.pre_nms_top_n_test=200",
    "model.rpn.post_nms_top_n_test=50",
    "model.rpn.batch_size_per_image=64",
    "model.roi.batch_size_per_image=64",
    "model.roi.representation_size=64",
    "model.captioner.n_layer=2",
    "model.captioner.n_head=2",
    "model.captioner.n_embd=32",
    "model.captioner.n_positions=32",
    "model.captioner.dropout=0.0",
    "model.captioner.max_new_tokens=5",
]


def tiny_config(*overrides: str) -> Config:
    return load_config(None, [*TINY, *overrides])


def build(*overrides: str, tokenizer=None) -> TICOD:
    cfg = tiny_config(*overrides)
    torch.manual_seed(0)
    return TICOD(cfg.model, cfg.loss, VOCAB, BOS, EOS, EOS, tokenizer=tokenizer)


def batch(with_boxes: bool = True) -> dict:
    """Two images of odd sizes zero-padded to the batch maximum, as the data pipeline collates them."""
    g = torch.Generator().manual_seed(4)
    sizes = [(70, 101), (53, 88)]
    images = torch.zeros(2, 3, 70, 101)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    first = (
        torch.tensor([[5.0, 8.0, 40.0, 50.0], [30.0, 20.0, 95.0, 66.0]])
        if with_boxes
        else torch.zeros((0, 4))
    )
    targets = [
        {"boxes": first, "labels": torch.tensor([1, 4])[: len(first)]},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    captions = {
        "input_ids": torch.tensor([[BOS, 5, 6, 7, EOS], [BOS, 8, 9, EOS, EOS]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
    }
    return {"images": images, "image_sizes": sizes, "targets": targets, "captions": captions}


def train_losses(model: TICOD, b: dict) -> dict[str, torch.Tensor]:
    return model.train()(b["images"], b["targets"], b["captions"], image_sizes=b["image_sizes"])


DET_KEYS = {"rpn_objectness", "rpn_box", "loss_det"} | {
    f"stage{i}_{k}" for i in range(3) for k in ("cls", "box")
}
CAP_KEYS = {"caption", "loss_cap"}


@pytest.mark.parametrize("with_boxes", [True, False])
def test_joint_losses_are_named_scalar_finite_and_weighted_once(with_boxes):
    model = build("loss.caption_weight=0.2")
    losses = train_losses(model, batch(with_boxes))
    assert set(losses) == DET_KEYS | CAP_KEYS | {"loss"}
    for name, value in losses.items():
        assert value.shape == () and math.isfinite(value.item()), name
    stages = sum(
        w * (losses[f"stage{i}_cls"] + losses[f"stage{i}_box"]) for i, w in enumerate([1.0, 0.5, 0.25])
    )
    torch.testing.assert_close(losses["loss_det"], losses["rpn_objectness"] + losses["rpn_box"] + stages)
    torch.testing.assert_close(losses["loss"], losses["loss_det"] + 0.2 * losses["caption"])
    if not with_boxes:
        assert all(losses[f"stage{i}_box"].item() == 0.0 for i in range(3))
        assert losses["rpn_box"].item() == 0.0


def test_uncertainty_weighting_uses_learned_log_variances():
    model = build("loss.balance=uncertainty")
    model.loss_combiner.log_var_det.data.fill_(0.5)
    model.loss_combiner.log_var_cap.data.fill_(-1.0)
    losses = train_losses(model, batch())
    expected = math.exp(-0.5) * losses["loss_det"] + 0.5 + math.exp(1.0) * losses["loss_cap"] - 1.0
    torch.testing.assert_close(losses["loss"], expected)


@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.task=joint"],
        ["loss.task=joint", "loss.balance=uncertainty"],
        ["loss.task=joint", "model.captioner.use_fpn_levels=true", "model.captioner.fpn_levels=['1', '3']"],
        ["loss.task=detection"],
        ["loss.task=caption"],
    ],
)
def test_every_parameter_gets_a_gradient_on_a_batch_without_boxes(overrides):
    # ZeRO stages > 0 hang or fail when a step leaves a parameter without a gradient.
    model = build(*overrides)
    train_losses(model, batch(with_boxes=False))["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_task_switches_build_only_the_needed_branch():
    det = build("loss.task=detection")
    cap = build("loss.task=caption")
    assert det.captioner is None and cap.detector is None
    b = batch()
    assert set(det.train()(b["images"], b["targets"], image_sizes=b["image_sizes"])) == DET_KEYS | {"loss"}
    cap_losses = cap.train()(b["images"], captions=b["captions"], image_sizes=b["image_sizes"])
    assert set(cap_losses) == CAP_KEYS | {"loss"}
    torch.testing.assert_close(cap_losses["loss"], cap_losses["caption"])
    assert set(det.eval()(b["images"], image_sizes=b["image_sizes"])[0]) == {"boxes", "scores", "labels"}
    assert set(cap.eval()(b["images"], image_sizes=b["image_sizes"])[0]) == {"caption_ids"}
    with pytest.raises(ValueError, match="use_fpn_levels"):
        build("loss.task=caption", "model.captioner.use_fpn_levels=true")


@pytest.mark.parametrize("loss_name", ["loss_det", "loss_cap"])
def test_each_task_loss_alone_reaches_the_backbone(loss_name):
    model = build()
    train_losses(model, batch())[loss_name].backward()
    # The captioner reads the last stage only: the other stages' output norms feed the FPN alone.
    fpn_only = ("norm0.", "norm1.", "norm2.") if loss_name == "loss_cap" else ()
    backbone_grads = [p.grad for n, p in model.backbone.named_parameters() if not n.startswith(fpn_only)]
    assert all(g is not None for g in backbone_grads)
    assert sum(g.abs().sum() for g in backbone_grads) > 0
    other = model.captioner if loss_name == "loss_det" else model.detector
    assert all(p.grad is None for p in other.parameters())


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"[PAD]": 0, "<s>": BOS, "</s>": EOS, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[PAD]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def test_eval_returns_boxes_in_original_pixels_and_decoded_captions():
    tokenizer = word_tokenizer()
    model = build(tokenizer=tokenizer).eval()
    b = batch()
    orig = [(140, 202), (53, 88)]  # image 0 was downscaled by 2, image 1 not resized
    plain = model(b["images"], image_sizes=b["image_sizes"])
    scaled = model(b["images"], image_sizes=b["image_sizes"], orig_sizes=orig)
    for i, (p, s) in enumerate(zip(plain, scaled, strict=True)):
        assert set(s) == {"boxes", "scores", "labels", "caption_ids", "caption"}
        assert len(p["boxes"]) > 0 and s["labels"].dtype == torch.int64
        assert s["labels"].min() >= 1 and s["labels"].max() <= NUM_CLASSES
        h, w = b["image_sizes"][i]
        assert (p["boxes"][:, 0::2] <= w).all() and (p["boxes"][:, 1::2] <= h).all()  # clipped to the image
        factor = orig[i][0] / b["image_sizes"][i][0]
        torch.testing.assert_close(s["boxes"], p["boxes"] * factor)
        assert s["caption"] == tokenizer.decode(s["caption_ids"].tolist(), skip_special_tokens=True).strip()
        assert BOS not in s["caption_ids"].tolist() and EOS not in s["caption_ids"].tolist()
    ids = model.generate_captions(b["images"], b["image_sizes"], num_beams=2, max_new_tokens=3)
    assert len(ids) == 2 and all(len(x) <= 3 for x in ids)


def test_grad_checkpointing_gives_the_same_loss_and_gradients():
    results = []
    for enable in ("false", "true"):
        model = build(
            f"model.backbone.grad_checkpointing={enable}",
            f"model.roi.grad_checkpointing={enable}",
            f"model.captioner.grad_checkpointing={enable}",
        )
        assert model.detector.roi_heads.grad_checkpointing == (enable == "true")
        torch.manual_seed(7)  # the RPN/RoI samplers draw random RoIs
        losses = train_losses(model, batch())
        losses["loss"].backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters()}))
    (losses_off, grads_off), (losses_on, grads_on) = results
    for name in losses_off:
        torch.testing.assert_close(losses_on[name], losses_off[name], rtol=1e-5, atol=1e-6)
    for name in grads_off:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-6, msg=name)


def test_model_code_is_single_device_code():
    # ticod/models must run anywhere: no launcher, distributed or tracking imports, no environment reads.
    forbidden = ("deepspeed", "torch.distributed", "wandb")
    for path in sorted((Path(__file__).resolve().parents[1] / "ticod" / "models").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                names = []
            assert not [n for n in names if n.startswith(forbidden)], (path.name, names)
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("environ", "getenv"), path.name
