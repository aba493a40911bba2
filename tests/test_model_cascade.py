"""Cascade R-CNN head: parity of one stage with torchvision's RoIHeads, and the cascade logic itself."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou

from ticod.config import RoIConfig
from ticod.models.cascade import CascadeRoIHeads

LEVELS = ["0", "1", "2", "3"]
CHANNELS = 8
IMAGE = 64  # square padded batch; strides 4, 8, 16, 32
NUM_CLASSES = 3


def features(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        name: torch.randn(batch, CHANNELS, IMAGE // s, IMAGE // s, generator=g)
        for name, s in zip(LEVELS, (4, 8, 16, 32), strict=True)
    }


def targets() -> list[dict[str, torch.Tensor]]:
    # Image 0 has two objects, image 1 none (a background-only image must train too).
    return [
        {
            "boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]]),
            "labels": torch.tensor([1, 3]),
        },
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]


def proposals() -> list[torch.Tensor]:
    """Jittered copies of the GT (positives at every IoU) plus random boxes (negatives)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for t in targets():
        jitter = [b + torch.randn(12, 4, generator=g) * 4 for b in t["boxes"]]
        xy = torch.rand(20, 2, generator=g) * 40
        wh = torch.rand(20, 2, generator=g) * 20 + 4
        rand = torch.cat([xy, xy + wh], dim=1)
        boxes = torch.cat([*jitter, rand]).clamp(0, IMAGE)
        x0, x1 = boxes[:, 0].minimum(boxes[:, 2]), boxes[:, 0].maximum(boxes[:, 2]) + 1
        y0, y1 = boxes[:, 1].minimum(boxes[:, 3]), boxes[:, 1].maximum(boxes[:, 3]) + 1
        out.append(torch.stack([x0, y0, x1, y1], dim=1))
    return out


def one_stage_pair() -> tuple[CascadeRoIHeads, RoIHeads]:
    """A one-stage cascade set up as torchvision's RoIHeads, and that RoIHeads with the same weights."""
    cfg = RoIConfig(
        iou_thresholds=[0.5],
        stage_loss_weights=[1.0],
        bbox_stds=[[0.1, 0.1, 0.2, 0.2]],  # BoxCoder weights (10, 10, 5, 5): torchvision's default
        class_agnostic_bbox=False,
        batch_size_per_image=16,
        positive_fraction=0.25,
        roi_output_size=7,
        sampling_ratio=2,
        representation_size=32,
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
    )
    torch.manual_seed(0)
    ours = CascadeRoIHeads(cfg, CHANNELS, NUM_CLASSES, LEVELS)
    stage = ours.stages[0]
    # Larger regression weights than the default init so decoded boxes move visibly.
    torch.nn.init.normal_(stage.bbox_pred.weight, std=0.05)
    head = TwoMLPHead(CHANNELS * 49, 32)
    predictor = FastRCNNPredictor(32, NUM_CLASSES + 1)
    head.load_state_dict(stage.box_head.state_dict())
    predictor.cls_score.load_state_dict(stage.cls_score.state_dict())
    predictor.bbox_pred.load_state_dict(stage.bbox_pred.state_dict())
    theirs = RoIHeads(
        MultiScaleRoIAlign(LEVELS, 7, 2),
        head,
        predictor,
        fg_iou_thresh=0.5,
        bg_iou_thresh=0.5,
        batch_size_per_image=16,
        positive_fraction=0.25,
        bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
        score_thresh=0.05,
        nms_thresh=0.5,
        detections_per_img=100,
    )
    return ours, theirs


def test_one_stage_matches_torchvision_roi_heads_in_training():
    ours, theirs = one_stage_pair()
    image_sizes = [(IMAGE, IMAGE), (IMAGE - 8, IMAGE - 4)]
    feats_a = {k: v.clone().requires_grad_() for k, v in features().items()}
    feats_b = {k: v.clone().requires_grad_() for k, v in features().items()}

    torch.manual_seed(123)  # the sampler draws with torch.randperm: same seed, same RoIs
    _, ours_losses = ours.train()(feats_a, proposals(), image_sizes, targets())
    torch.manual_seed(123)
    _, their_losses = theirs.train()(feats_b, proposals(), image_sizes, targets())

    assert their_losses["loss_box_reg"] > 0  # the comparison covers positives, not just background
    torch.testing.assert_close(ours_losses["stage0_cls"], their_losses["loss_classifier"], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours_losses["stage0_box"], their_losses["loss_box_reg"], rtol=0, atol=1e-6)

    (ours_losses["stage0_cls"] + ours_losses["stage0_box"]).backward()
    (their_losses["loss_classifier"] + their_losses["loss_box_reg"]).backward()
    stage = ours.stages[0]
    pairs = [
        (stage.box_head.fc6.weight, theirs.box_head.fc6.weight),
        (stage.cls_score.weight, theirs.box_predictor.cls_score.weight),
        (stage.bbox_pred.weight, theirs.box_predictor.bbox_pred.weight),
        *((feats_a[k], feats_b[k]) for k in LEVELS),
    ]
    for a, b in pairs:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)


def test_one_stage_matches_torchvision_roi_heads_in_inference():
    ours, theirs = one_stage_pair()
    image_sizes = [(IMAGE, IMAGE), (IMAGE - 8, IMAGE - 4)]
    ours_dets, _ = ours.eval()(features(), proposals(), image_sizes)
    their_dets, _ = theirs.eval()(features(), proposals(), image_sizes)
    assert sum(len(d["boxes"]) for d in their_dets) > 0
    for a, b in zip(ours_dets, their_dets, strict=True):
        torch.testing.assert_close(a["boxes"], b["boxes"], rtol=0, atol=1e-5)
        torch.testing.assert_close(a["scores"], b["scores"], rtol=0, atol=1e-6)
        assert torch.equal(a["labels"], b["labels"])


def three_stage_head(**overrides) -> CascadeRoIHeads:
    torch.manual_seed(0)
    cfg = RoIConfig(**{"batch_size_per_image": 32, "representation_size": 32, **overrides})
    return CascadeRoIHeads(cfg, CHANNELS, NUM_CLASSES, LEVELS)


def test_inference_averages_stage_scores_and_takes_last_stage_boxes():
    head = three_stage_head(score_thresh=0.0, detections_per_img=1000, nms_thresh=1.0)
    biases = [
        torch.tensor([0.0, 1.0, 0.0, -1.0]),
        torch.tensor([0.0, 0.0, 2.0, 0.0]),
        torch.tensor([1.0, 0.0, 0.0, 0.0]),
    ]
    for stage, bias in zip(head.stages, biases, strict=True):
        # Constant class logits per stage; no regression in stages 0 and 1 (refinement = identity).
        torch.nn.init.zeros_(stage.cls_score.weight)
        stage.cls_score.bias.data.copy_(bias)
        torch.nn.init.zeros_(stage.bbox_pred.weight)
        torch.nn.init.zeros_(stage.bbox_pred.bias)
    # The last stage shifts every box right by 0.1 of its width: dx = 0.1 * weight_x (1 / 0.033).
    head.stages[2].bbox_pred.bias.data[0] = 0.1 / 0.033
    box = torch.tensor([[8.0, 8.0, 28.0, 24.0]])
    dets, _ = head.eval()(features(1), [box], [(IMAGE, IMAGE)])
    det = dets[0]

    expected = torch.stack([torch.softmax(b, 0) for b in biases]).mean(0)[1:]
    assert torch.equal(det["labels"].sort().values, torch.tensor([1, 2, 3]))
    torch.testing.assert_close(det["scores"][det["labels"].argsort()], expected)
    torch.testing.assert_close(det["boxes"], torch.tensor([[10.0, 8.0, 30.0, 24.0]]).expand(3, 4))


def test_training_refines_boxes_between_stages_without_gradient_through_them():
    head = three_stage_head().train()
    feats = {k: v.requires_grad_() for k, v in features().items()}
    _, losses = head(feats, proposals(), [(IMAGE, IMAGE)] * 2, targets())
    assert set(losses) == {f"stage{i}_{k}" for i in range(3) for k in ("cls", "box")}
    assert all(math.isfinite(v.item()) for v in losses.values())
    # Stage 1's loss reaches the features but none of stage 0's weights: its boxes are detached.
    (losses["stage1_cls"] + losses["stage1_box"]).backward()
    assert feats["0"].grad is not None
    assert all(p.grad is None for p in head.stages[0].parameters())
    assert all(p.grad is not None for p in head.stages[1].parameters())


def test_sampling_flags_gt_boxes_and_refinement_applies_the_stage_regression():
    head = three_stage_head(batch_size_per_image=512)  # room for every positive: both GT boxes sampled
    stage = head.stages[0]
    torch.nn.init.zeros_(stage.bbox_pred.weight)
    torch.nn.init.zeros_(stage.bbox_pred.bias)
    stage.bbox_pred.bias.data[2] = math.log(2.0) * 5.0  # dw = log 2 at weight 5: widths double
    torch.manual_seed(0)
    samples = head.sample(stage, proposals(), targets())
    # The appended GT boxes are flagged (the forward drops their refined copies before the next stage).
    assert torch.equal(samples.proposals[0][samples.is_gt[0]], targets()[0]["boxes"])
    assert not samples.is_gt[1].any()
    logits = torch.zeros(sum(len(p) for p in samples.proposals), NUM_CLASSES + 1)
    deltas = stage.bbox_pred(torch.zeros(len(logits), 32))
    refined = head.refine(stage, deltas, logits, samples.proposals, [(IMAGE, IMAGE)] * 2, samples.labels)
    for props, new in zip(samples.proposals, refined, strict=True):
        cx = (props[:, 0] + props[:, 2]) / 2
        expected_x0 = (cx - (props[:, 2] - props[:, 0])).clamp(0, IMAGE)
        torch.testing.assert_close(new[:, 0], expected_x0)
        torch.testing.assert_close(new[:, 1], props[:, 1])


@pytest.mark.parametrize("class_agnostic", [True, False])
def test_background_only_batch_gives_every_parameter_a_gradient(class_agnostic):
    head = three_stage_head(class_agnostic_bbox=class_agnostic).train()
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}] * 2
    _, losses = head(features(), proposals(), [(IMAGE, IMAGE)] * 2, empty)
    for i in range(3):
        assert losses[f"stage{i}_box"].item() == 0.0
        assert math.isfinite(losses[f"stage{i}_cls"].item())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_each_stage_labels_rois_at_its_own_iou_threshold():
    """RoIs at IoU 0.55, 0.65 and 0.75 with a GT box: foreground in stage 0 (0.5) for all three, in stage 1
    (0.6) for the last two, in stage 2 (0.7) for the last one; everything else is background.

    Run through the training forward with identity refinement, so each stage sees the same RoIs.
    """
    head = three_stage_head(batch_size_per_image=512).train()  # the sampler keeps every RoI
    for stage in head.stages:
        torch.nn.init.zeros_(stage.bbox_pred.weight)
        torch.nn.init.zeros_(stage.bbox_pred.bias)
    gt = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    # Same height and left edge as the GT: IoU = width / 40.
    rois = torch.tensor([[0.0, 0.0, 22.0, 40.0], [0.0, 0.0, 26.0, 40.0], [0.0, 0.0, 30.0, 40.0]])
    torch.testing.assert_close(box_iou(gt, rois)[0], torch.tensor([0.55, 0.65, 0.75]))
    seen = []
    sample = head.sample

    def recording_sample(stage, proposals, targets):
        samples = sample(stage, proposals, targets)
        seen.append(samples)
        return samples

    head.sample = recording_sample
    target = {"boxes": gt, "labels": torch.tensor([2])}
    _, losses = head(features(1), [rois], [(IMAGE, IMAGE)], [target])
    assert len(seen) == 3 and all(math.isfinite(v.item()) for v in losses.values())
    expected = [[2, 2, 2], [0, 2, 2], [0, 0, 2]]
    for i, (samples, labels) in enumerate(zip(seen, expected, strict=True)):
        torch.testing.assert_close(samples.proposals[0], torch.cat([rois, gt]), msg=f"stage {i}")
        assert samples.labels[0].tolist() == [*labels, 2], f"stage {i}"  # the appended GT: always foreground
