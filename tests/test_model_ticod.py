"""The joint TICOD model on tiny random-init configs: losses, gradients, task switches, eval outputs."""

from __future__ import annotations

import ast
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_model import (
    BOS,
    EOS,
    NUM_CLASSES,
    batch,
    batch_losses,
    build,
    partially_labelled,
    word_tokenizer,
)
from torchvision.ops import roi_align

from ticod.data.samples import Batch
from ticod.models import TICOD


def train_losses(model: TICOD, b: Batch) -> dict[str, torch.Tensor]:
    return model.train()(b.images, b.targets, b.captions, image_sizes=b.image_sizes)


DET_KEYS = {"rpn_objectness", "rpn_box", "loss_det", "term_det"} | {
    f"stage{i}_{k}" for i in range(3) for k in ("cls", "box")
}
CAP_KEYS = {"caption", "loss_cap", "term_cap"}


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
        ["loss.task=joint", "model.captioner.object_tokens=2"],
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
    assert set(det.train()(b.images, b.targets, image_sizes=b.image_sizes)) == DET_KEYS | {"loss"}
    cap_losses = cap.train()(b.images, captions=b.captions, image_sizes=b.image_sizes)
    assert set(cap_losses) == CAP_KEYS | {"loss"}
    torch.testing.assert_close(cap_losses["loss"], cap_losses["caption"])
    assert set(det.eval()(b.images, image_sizes=b.image_sizes)[0]) == {"boxes", "scores", "labels"}
    assert set(cap.eval()(b.images, image_sizes=b.image_sizes)[0]) == {"caption_ids"}
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


def test_eval_returns_boxes_in_original_pixels_and_decoded_captions():
    tokenizer = word_tokenizer()
    model = build(tokenizer=tokenizer).eval()
    b = batch()
    orig = [(140, 202), (53, 88)]  # image 0 was downscaled by 2, image 1 not resized
    plain = model(b.images, image_sizes=b.image_sizes)
    scaled = model(b.images, image_sizes=b.image_sizes, orig_sizes=orig)
    for i, (p, s) in enumerate(zip(plain, scaled, strict=True)):
        assert set(s) == {"boxes", "scores", "labels", "caption_ids", "caption"}
        assert len(p["boxes"]) > 0 and s["labels"].dtype == torch.int64
        assert s["labels"].min() >= 1 and s["labels"].max() <= NUM_CLASSES
        h, w = b.image_sizes[i]
        assert (p["boxes"][:, 0::2] <= w).all() and (p["boxes"][:, 1::2] <= h).all()  # clipped to the image
        factor = orig[i][0] / b.image_sizes[i][0]
        torch.testing.assert_close(s["boxes"], p["boxes"] * factor)
        assert s["caption"] == tokenizer.decode(s["caption_ids"].tolist(), skip_special_tokens=True).strip()
        assert BOS not in s["caption_ids"].tolist() and EOS not in s["caption_ids"].tolist()
    ids = model.generate_captions(b.images, b.image_sizes, num_beams=2, max_new_tokens=3)
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


# ------------------------------------------------------------------------------------ partial labels
def three_images() -> Batch:
    """Three same-size images (so any sub-batch pads alike), all labelled for boxes and captions."""
    g = torch.Generator().manual_seed(5)
    boxes = [
        [[5.0, 8.0, 40.0, 50.0], [30.0, 20.0, 90.0, 60.0]],
        [[10.0, 10.0, 60.0, 50.0]],
        [[20.0, 5.0, 80.0, 60.0]],
    ]
    return Batch(
        images=torch.randn(3, 3, 64, 96, generator=g),
        image_sizes=[(64, 96)] * 3,
        targets=[
            {"boxes": torch.tensor(b), "labels": torch.tensor([1, 4][: len(b)]) + i}
            for i, b in enumerate(boxes)
        ],
        captions={
            "input_ids": torch.tensor([[BOS, 5, 6, 7, EOS], [BOS, 8, 9, EOS, EOS], [BOS, 10, EOS, EOS, EOS]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
        },
    )


def rows(b: Batch, keep: list[int]) -> Batch:
    """The sub-batch of images ``keep`` (fully labelled, no flags)."""
    return Batch(
        images=b.images[keep],
        image_sizes=[b.image_sizes[i] for i in keep],
        targets=[b.targets[i] for i in keep],
        captions={k: v[keep] for k, v in b.captions.items()},
    )


def partial_losses(model: TICOD, b: Batch, seed: int = 7) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # the RPN/RoI samplers draw random RoIs
    return batch_losses(model.train(), b)


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("absent", ["boxes", "caption"])
def test_a_task_without_labels_in_the_batch_has_zero_loss_and_zero_gradient(absent):
    # Default config: the captioner reads the last backbone stage only, not the FPN.
    model = build()
    flags = {"has_boxes": [absent != "boxes"] * 3, "has_caption": [absent != "caption"] * 3}
    losses = partial_losses(model, partially_labelled(three_images(), **flags))
    losses["loss"].backward()
    assert math.isfinite(losses["loss"].item()) and losses["loss"].item() > 0
    zero_keys = DET_KEYS if absent == "boxes" else CAP_KEYS
    assert set(losses) == DET_KEYS | CAP_KEYS | {"loss"}
    assert all(losses[k].item() == 0.0 for k in zero_keys)
    assert all(losses[k].item() > 0.0 for k in {"loss_det", "loss_cap"} - zero_keys)
    idle, trained = (
        (model.detector, model.captioner) if absent == "boxes" else (model.captioner, model.detector)
    )
    # Every weight of the unlabelled task's branch took part in backward (ZeRO), with an exact 0.
    assert all(g is not None and not g.any() for g in grads(idle).values())
    parts = [trained.fpn, trained.rpn, trained.roi_heads] if absent == "caption" else [trained]
    assert all(sum(g.abs().sum() for g in grads(part).values()) > 0 for part in parts)
    assert sum(g.abs().sum() for g in grads(model.backbone).values() if g is not None) > 0


@pytest.mark.parametrize("fpn_levels", [False, True])
def test_mixed_batch_losses_equal_those_of_the_labelled_images_alone(fpn_levels):
    overrides = (
        ["model.captioner.use_fpn_levels=true", "model.captioner.fpn_levels=['1', '3']"] if fpn_levels else []
    )
    model = build(*overrides)
    full = three_images()
    # Images: [both, captions only, boxes only].
    mixed = partial_losses(model, partially_labelled(full, [True, False, True], [True, True, False]))
    # The samplers draw the same numbers in the same order: only the box-labelled images reach them.
    boxed = partial_losses(model, rows(full, [0, 2]))
    captioned = partial_losses(model, rows(full, [0, 1]))
    for name in DET_KEYS:
        torch.testing.assert_close(mixed[name], boxed[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(mixed["caption"], captioned["caption"], rtol=1e-5, atol=1e-6)
    # The loss over the whole batch differs (the flags are not ignored).
    everything = partial_losses(model, full)
    assert abs(everything["loss_det"] - mixed["loss_det"]) > 1e-4
    assert abs(everything["caption"] - mixed["caption"]) > 1e-4


def test_all_true_flags_are_bit_identical_to_no_flags():
    results = []
    for flags in (None, [True] * 3):
        model = build()
        b = three_images() if flags is None else replace(three_images(), has_boxes=flags, has_caption=flags)
        losses = partial_losses(model, b)
        losses["loss"].backward()
        results.append((losses, grads(model)))
    (plain, plain_grads), (flagged, flagged_grads) = results
    assert all(torch.equal(plain[k], flagged[k]) for k in plain)
    assert all(torch.equal(plain_grads[k], flagged_grads[k]) for k in plain_grads)


@pytest.mark.parametrize("absent", ["boxes", "caption"])
@pytest.mark.parametrize(
    "overrides",
    [
        ["loss.task=joint"],
        ["loss.task=joint", "loss.balance=uncertainty"],
        ["loss.task=joint", "model.captioner.use_fpn_levels=true", "model.captioner.fpn_levels=['1', '3']"],
        ["loss.task=joint", "model.roi.head=4conv1fc", "model.roi.norm=syncbn"],
        ["loss.task=detection"],
        ["loss.task=caption"],
    ],
)
def test_every_parameter_gets_a_gradient_on_a_batch_without_a_task(overrides, absent):
    # ZeRO stages > 0 hang or fail when a step leaves a parameter without a gradient.
    model = build(*overrides)
    flags = {"has_boxes": [absent != "boxes"] * 2, "has_caption": [absent != "caption"] * 2}
    b = partially_labelled(batch(), **flags)
    partial_losses(model, b)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("absent", ["boxes", "caption"])
def test_learned_task_weight_of_an_absent_task_gets_no_gradient(absent):
    # exp(-s)·0 + s would still pull s down (the task's weight up) in batches without its labels.
    model = build("loss.balance=uncertainty")
    flags = {"has_boxes": [absent != "boxes"] * 3, "has_caption": [absent != "caption"] * 3}
    partial_losses(model, partially_labelled(three_images(), **flags))["loss"].backward()
    idle, used = model.loss_combiner.log_var_det, model.loss_combiner.log_var_cap
    if absent == "caption":
        idle, used = used, idle
    assert idle.grad is not None and not idle.grad.any() and used.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ object tokens
OBJECTS = "model.captioner.object_tokens=2"


def test_object_tokens_are_off_without_the_detector():
    model = build(OBJECTS, "loss.task=caption")
    assert model.object_tokens == 0 and model.captioner.objects is None
    train_losses(model, batch())["loss"].backward()  # no objects asked for, none given


def test_object_tokens_read_the_largest_ground_truth_boxes_of_box_labelled_images_only():
    model = build(OBJECTS)
    full = three_images()
    base = partial_losses(model, full)["caption"]

    def caption_loss(change, has_boxes=None):
        b = replace(three_images(), has_boxes=has_boxes)
        change(b.targets)
        return partial_losses(model, b)["caption"]

    def move_first(t):
        t[0]["boxes"][0] += 10.0

    def add_third(box):  # image 0 already has two boxes (areas 1470 and 2400) of object_tokens=2
        def change(t):
            t[0]["boxes"] = torch.cat([t[0]["boxes"], torch.tensor([box])])
            t[0]["labels"] = torch.cat([t[0]["labels"], torch.tensor([3])])

        return change

    def relabel_first(t):
        t[0]["labels"][0] = 2

    assert not torch.allclose(caption_loss(move_first), base)
    assert not torch.allclose(caption_loss(relabel_first), base)  # the true class is read too
    torch.testing.assert_close(caption_loss(add_third([50.0, 30.0, 80.0, 60.0])), base)  # area 900: not read
    assert not torch.allclose(caption_loss(add_third([0.0, 0.0, 90.0, 60.0])), base)  # 5400: read
    # Image 0 not labelled for boxes: its target is not read, whatever it holds.
    unboxed = caption_loss(lambda t: None, [False, True, True])
    torch.testing.assert_close(caption_loss(move_first, [False, True, True]), unboxed)
    assert not torch.allclose(unboxed, base)


def test_the_caption_loss_trains_the_object_projection_and_not_the_box_heads_or_the_fpn():
    """Object tokens read the box heads' feature and class probabilities and the mean RoI feature without
    gradient: the caption loss trains the projection of each part, and neither the box heads, their
    classifiers, nor (through these reads) the FPN."""
    model = build(OBJECTS)
    partial_losses(model, three_images())["caption"].backward()
    heads = model.detector.roi_heads
    assert all(p.grad is None for p in heads.parameters())
    assert all(p.grad is None for p in model.detector.fpn.parameters())
    assert all(proj[0].weight.grad.abs().sum() > 0 for proj in model.captioner.objects.proj)
    assert all(stage.box_head.training for stage in heads.stages)  # put back in training mode


def test_an_object_is_its_box_head_feature_class_probabilities_and_rgb_thumbnail():
    """Each token's input: what the detector knows of the box (:meth:`CascadeRoIHeads.describe`) and the
    box's normalised pixels at 3 x 3; an image's boxes beyond ``object_tokens`` are left out."""
    model = build(OBJECTS).eval()
    b = three_images()
    padded = model.normalize(b.images, b.image_sizes)
    fpn = model.detector.fpn(model.backbone(padded))
    boxes = [
        torch.tensor([[2.0, 3, 40, 25]]),
        torch.zeros((0, 4)),
        torch.tensor([[0.0, 0, 30, 30], [5, 5, 60, 50], [1, 1, 9, 9]]),
    ]
    objects = model._objects(padded, fpn, boxes, b.image_sizes)
    heads = model.detector.roi_heads
    kept = [x[:2] for x in boxes]
    feature, probs = heads.describe(heads.box_roi_pool(fpn, kept, b.image_sizes))
    # The thumbnail's top-left cell of the first box: the mean of its top-left 12.67 x 7.33 pixels.
    thumb = objects.features[0, 0, -27:].reshape(3, 3, 3)
    torch.testing.assert_close(thumb[:, 0, 0], padded[0, :, 3:10, 2:15].mean(dim=(1, 2)), atol=0.03, rtol=0)
    pixels = roi_align(padded, kept, 3, spatial_scale=1.0, sampling_ratio=0, aligned=True).flatten(1)
    assert objects.mask.tolist() == [[1, 0], [0, 0], [1, 1]]
    torch.testing.assert_close(objects.features[objects.mask.bool()], torch.cat([feature, probs, pixels], -1))
    assert model.captioner.objects.parts == [feature.shape[-1], probs.shape[-1], 27]
    # Ground-truth boxes (training) come with their classes: the class part is their one-hot.
    labels = [torch.tensor([3]), torch.zeros(0, dtype=torch.int64), torch.tensor([1, 2, 3])]
    truth = model._objects(padded, fpn, boxes, b.image_sizes, labels)
    k = probs.shape[-1]
    classes = truth.features[truth.mask.bool()][:, feature.shape[-1] : feature.shape[-1] + k]
    torch.testing.assert_close(classes, torch.eye(k)[[3, 1, 2]])


def test_object_tokens_in_eval_are_the_confident_detections():
    model = build(OBJECTS, "model.captioner.object_min_score=0.0", "model.captioner.object_nms_iou=1.0")
    b = three_images()
    with pytest.raises(RuntimeError, match="eval"):
        model.caption_memory(b.images, b.image_sizes)
    model.eval()
    _, _, _, objects = model.caption_memory(b.images, b.image_sizes)
    detections = model(b.images, image_sizes=b.image_sizes)
    assert all(len(d["boxes"]) >= 2 for d in detections)
    for i, d in enumerate(detections):
        assert objects.mask[i].tolist() == [1, 1]
        torch.testing.assert_close(objects.boxes[i], d["boxes"][:2])
    sure = build(OBJECTS, "model.captioner.object_min_score=0.99").eval()
    assert not sure.caption_memory(b.images, b.image_sizes)[3].mask.any()
    assert all("caption_ids" in r for r in sure(b.images, image_sizes=b.image_sizes))


def test_eval_objects_are_distinct_whatever_the_class():
    """One object detected as two classes is one token (the detector's NMS is per class), the survivor the
    more confident; objects that overlap less stay, most confident first."""
    model = build(OBJECTS)
    boxes = torch.tensor(
        [[0.0, 0, 10, 10], [1, 0, 11, 10], [30, 30, 40, 40], [0, 0, 10, 5], [50, 50, 60, 60]]
    )
    detections = [
        {
            "boxes": boxes,
            "scores": torch.tensor([0.6, 0.9, 0.5, 0.8, 0.2]),
            "labels": torch.tensor([1, 2, 1, 1, 3]),
        }
    ]
    torch.testing.assert_close(model._confident_boxes(detections)[0], boxes[[1, 3, 2]])
    model.object_nms_iou = 1.0
    torch.testing.assert_close(model._confident_boxes(detections)[0], boxes[[1, 3, 0, 2]])
