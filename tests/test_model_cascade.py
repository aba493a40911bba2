"""Cascade R-CNN head: parity of one stage with torchvision's RoIHeads, and the cascade logic itself."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import box_iou

from ticod.config import LossConfig, RoIConfig, Task
from ticod.models.cascade import CascadeRoIHeads
from ticod.models.losses import LossCombiner

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
        ours.box_roi_pool,  # torchvision's MultiScaleRoIAlign has no aligned=True (tests/test_roi_align.py)
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


def test_describe_gives_the_last_box_head_feature_and_the_stage_averaged_probabilities_in_eval_mode():
    """What object tokens read of a box: the eval-mode box-head feature the last classifier reads, and the
    class probabilities averaged over the stages as inference scores them; the heads stay in training mode
    (a SyncBN head would otherwise update its running statistics from the caption's boxes)."""
    head = three_stage_head(head="4conv1fc", norm="syncbn").train()
    pooled = head.box_roi_pool(
        features(1), [torch.tensor([[8.0, 8.0, 28.0, 24.0], [30, 30, 60, 50]])], [(IMAGE, IMAGE)]
    )
    stats = [b.clone() for b in head.stages[0].box_head.buffers()]
    feature, probs = head.describe(pooled)
    assert all(stage.box_head.training for stage in head.stages)
    alone, none = head.describe(pooled, class_probs=False)  # training's true classes: the last head alone
    assert none is None and torch.equal(alone, feature) and head.stages[-1].box_head.training
    assert all(torch.equal(a, b) for a, b in zip(stats, head.stages[0].box_head.buffers(), strict=True))
    head.eval()
    expected = torch.stack([torch.softmax(stage(pooled)[0], -1) for stage in head.stages]).mean(0)
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(feature, head.stages[-1].box_head(pooled))
    assert feature.shape == (2, 32) and not feature.requires_grad and not probs.requires_grad


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


@pytest.mark.parametrize("norm", ["syncbn", "gn", "none"])
def test_4conv1fc_head_is_four_normed_convs_and_one_fc(norm):
    """mmdetection's Shared4Conv1FCBBoxHead: 4 x (3x3 conv, norm, ReLU) at the FPN width, then FC + ReLU."""
    head = three_stage_head(head="4conv1fc", norm=norm).train()
    norm_type = {"syncbn": torch.nn.SyncBatchNorm, "gn": torch.nn.GroupNorm, "none": type(None)}[norm]
    for stage in head.stages:
        convs = [m for m in stage.box_head.modules() if isinstance(m, torch.nn.Conv2d)]
        assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
            (CHANNELS, CHANNELS, (3, 3), (1, 1))
        ] * 4
        assert all((c.bias is None) == (norm != "none") for c in convs)  # no bias before a norm
        blocks = list(stage.box_head)[:4]
        assert all(len(b) == (3 if norm != "none" else 2) for b in blocks)
        assert all(isinstance(b[1] if norm != "none" else None, norm_type) for b in blocks)
        assert all(isinstance(b[-1], torch.nn.ReLU) for b in blocks)
        fcs = [m for m in stage.box_head.modules() if isinstance(m, torch.nn.Linear)]
        assert [(f.in_features, f.out_features) for f in fcs] == [(CHANNELS * 49, 32)]
    _, losses = head(features(), proposals(), [(IMAGE, IMAGE)] * 2, targets())
    sum(losses.values()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in head.parameters())


def test_syncbn_head_trains_on_cpu_under_a_process_group(tmp_path):
    """torch's SyncBatchNorm raises for CPU tensors once a process group exists (gloo); ours normalises per
    process there, with the same parameters and buffers."""
    head = three_stage_head(head="4conv1fc", norm="syncbn").train()
    bn = [m for m in head.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(bn) == 12 and all(m.running_mean.abs().sum() == 0 for m in bn)
    mine = not dist.is_initialized()  # another module's tests may have left the session's group up
    if mine:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        _, losses = head(features(), proposals(), [(IMAGE, IMAGE)] * 2, targets())
    finally:
        if mine:
            dist.destroy_process_group()
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert all(m.running_mean.abs().sum() > 0 for m in bn)  # BatchNorm statistics were taken


def _giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of paired xyxy boxes, from its definition."""
    inter = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp(min=0).prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return inter / union - (hull - union) / hull


@pytest.mark.parametrize("box_loss", ["giou", "smooth_l1"])
def test_box_loss_on_the_gt_class_deltas(box_loss):
    """Class-specific regression reads the deltas of each positive's GT class; GIoU on the decoded boxes,
    smooth-L1 (with the configured beta) on the encoded targets; both summed over the positives / RoIs."""
    stage = three_stage_head(class_agnostic_bbox=False, box_loss=box_loss, smooth_l1_beta=0.05).stages[0]
    props = torch.tensor([[10.0, 10.0, 30.0, 40.0], [5.0, 5.0, 25.0, 15.0], [0.0, 0.0, 8.0, 8.0]])
    gt = torch.tensor([[12.0, 8.0, 34.0, 40.0], [4.0, 6.0, 26.0, 18.0], [0.0, 0.0, 8.0, 8.0]])
    labels = torch.tensor([3, 1, 0])  # the last RoI is background: no box loss
    g = torch.Generator().manual_seed(0)
    deltas = torch.randn(3, NUM_CLASSES + 1, 4, generator=g) * 0.3
    chosen = deltas[[0, 1], [3, 1]]  # (dx, dy, dw, dh) of the GT classes, before the weights (10, 10, 5, 5)
    _, loss = stage.losses(torch.zeros(3, NUM_CLASSES + 1), deltas.reshape(3, -1), labels, props, gt)

    p, t = props[:2], gt[:2]
    wh, ctr = p[:, 2:] - p[:, :2], (p[:, 2:] + p[:, :2]) / 2
    weights = torch.tensor([10.0, 10.0, 5.0, 5.0])
    if box_loss == "giou":
        d = chosen / weights
        c, size = ctr + d[:, :2] * wh, wh * d[:, 2:].exp()
        expected = (1 - _giou(torch.cat([c - size / 2, c + size / 2], 1), t)).sum() / 3
    else:
        t_wh, t_ctr = t[:, 2:] - t[:, :2], (t[:, 2:] + t[:, :2]) / 2
        target = torch.cat([(t_ctr - ctr) / wh, (t_wh / wh).log()], 1) * weights
        diff = (chosen - target).abs()
        expected = torch.where(diff < 0.05, 0.5 * diff**2 / 0.05, diff - 0.025).sum() / 3
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_box_loss_weight_multiplies_every_stage_box_loss():
    losses = {"rpn_objectness": torch.tensor(0.5), "rpn_box": torch.tensor(0.25)}
    losses |= {f"stage{i}_cls": torch.tensor(1.0 + i) for i in range(3)}
    losses |= {f"stage{i}_box": torch.tensor(0.1 * (i + 1)) for i in range(3)}
    combiner = LossCombiner(LossConfig(task=Task.detection), [1.0, 0.5, 0.25], box_loss_weight=10.0)
    expected = 0.75 + sum(w * (1.0 + i + 10.0 * 0.1 * (i + 1)) for i, w in enumerate([1.0, 0.5, 0.25]))
    torch.testing.assert_close(combiner(losses)["loss"], torch.tensor(expected))
